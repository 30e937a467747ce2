"""Triton GEMV for batch-1 decode on 2-, 3- and 4-bit affine grids: y = x W^T at few instructions per weight.

The general kernel (:mod:`triton_gemv`) is issue-bound on the H100, not bandwidth-bound: to keep up with HBM at
2 bits the SMs must retire ~40 weights per clock, i.e. spend about 3 instructions per weight. This kernel covers
what decode spends its time on (uniform 2/4-bit sym/asym grids and affine 2-bit level sets such as nz2:
``lut[c] = a c + b``; one scale per row or power-of-two groups) at M = 1, and per weight spends:

* one LOP3: ``(src & (MASK << p)) | 0x3F800000`` is the float ``1 + c 2^(p - 23)``, where ``src`` is the word
  shifted so that the code sits at bits p .. p + bits - 1, p in a window at the top of the mantissa (one shift
  serves 3 codes at 4 bits, 5 at 2 bits);
* one FFMA against the activation pre-scaled by ``2^(23 - p)`` (exact: a power of two). The ``1`` terms are
  taken out once per word (``- sum x'``, shared by all rows); the window keeps >= 16 bits of every ``c x``
  (relative error ~1e-4, below a float16 output's rounding).

3-bit rows are read in units of 32 codes (three int32 words, the unit a "word" stands for below): runs of three
codes of one word share a shift, and codes 10 and 21, which straddle two words, take one shift from each.

Scale, min and the affine map are applied once per word: ``sum_j w_j x_j = s (a sum c_j x_j + b sum x_j) + m sum
x_j``. Tiles are [words, rows] with one word per thread and all rows of it in the same thread, so activations are
loaded and scaled once for all rows; the word index runs fastest in every tensor and load (the row stride is not
specialized, so loads are not vectorized), which gives words, activations and scales one layout in Triton 3.6 and
3.9 alike: no shared-memory layout conversion in the loop (checked in the SASS).

Split-K (narrow outputs): program (i, j) walks the j-th of SPLIT_K runs of words and adds its partial sums into a
zeroed float32 y atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import INTERPRET, autotune, bench


@triton.jit
def _slot_shift(i: tl.constexpr, BITS: tl.constexpr):
    """(left shift, mantissa position) that brings code slot i of a word to bits p .. p + BITS, with p in the top
    window [TOP - (CPS - 1) BITS, TOP] of the float32 mantissa: a few shifts per word serve CPS codes each."""
    TOP: tl.constexpr = 23 - BITS
    CPS: tl.constexpr = 3 if BITS == 4 else 5  # codes per shift: the window keeps >= 16 bits of c x exact
    p: tl.constexpr = TOP - (CPS - 1 - i % CPS) * BITS
    return p - i * BITS, p


@triton.jit
def _slot3(j: tl.constexpr):
    """(word, left shift, p) that bring code j of a 3-bit unit (bits 3j .. 3j + 2 of its three words) to bits
    p .. p + 2, p in {14, 17, 20}; runs of three codes of one word share the shift. Word -1: code 10 or 21, which
    straddles two words (:func:`_straddler`)."""
    if j == 10 or j == 21:
        return -1, 0, 20
    word: tl.constexpr = 0 if j < 10 else 1 if j < 21 else 2
    k: tl.constexpr = j - (0 if j < 10 else 11 if j < 21 else 22)  # the code's index among its word's own codes
    p: tl.constexpr = 14 + 3 * (k % 3)
    return word, p - (3 * j - 32 * word), p


@triton.jit
def _straddler(w0, w1, w2, j: tl.constexpr):
    """Code 10 (bits 30, 31 of w0 and 0 of w1) or 21 (bit 31 of w1 and 0, 1 of w2) at bits 20 .. 22."""
    if j == 10:
        return ((w0 >> 10) & 0x300000) | ((w1 << 22) & 0x400000)
    else:
        return ((w1 >> 11) & 0x100000) | ((w2 << 21) & 0x600000)


@triton.jit(do_not_specialize=["row_words", "n_groups"])
def _gemv_affine_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, y_ptr, N, row_words, n_groups, lut_a, lut_b,
                        mask_bits, one_bits,
                        BITS: tl.constexpr, HAS_MIN: tl.constexpr, GROUP_SHIFT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr):
    # mask_bits / one_bits (the code mask and float 1.0's bits) come in as arguments so that the compiler keeps
    # them in registers instead of rematerializing immediates in the loop. 3 bits: row_words counts units of three
    # words.
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    UNIT: tl.constexpr = 3 if BITS == 3 else 1  # int32 words per unit
    pid = tl.program_id(0)
    steps = tl.cdiv(tl.cdiv(row_words, BLOCK_W), SPLIT_K)
    w_lo = tl.program_id(1) * steps * BLOCK_W
    w_hi = tl.minimum(row_words, w_lo + steps * BLOCK_W)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    rows = codes_ptr + offs_n[None, :] * (row_words * UNIT)
    offs_w = w_lo + tl.arange(0, BLOCK_W)
    at = rows + UNIT * offs_w[:, None]
    first = (offs_w < w_hi)[:, None] & n_mask[None, :]
    nxt = tl.load(at, mask=first, other=0, eviction_policy="evict_first")
    nxt1 = nxt
    nxt2 = nxt
    if BITS == 3:
        nxt1 = tl.load(at + 1, mask=first, other=0, eviction_policy="evict_first")
        nxt2 = tl.load(at + 2, mask=first, other=0, eviction_policy="evict_first")
    for w0 in range(w_lo, w_hi, BLOCK_W):
        # the next step's words are requested before this step's are decoded (registers double-buffer them):
        # the decode is long enough that waiting for each load in turn would leave HBM idle
        words = nxt
        words1 = nxt1
        words2 = nxt2
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_mask = offs_w < w_hi
        mask = w_mask[:, None] & n_mask[None, :]
        offs_nxt = offs_w + BLOCK_W
        at = rows + UNIT * offs_nxt[:, None]
        later = (offs_nxt < w_hi)[:, None] & n_mask[None, :]
        nxt = tl.load(at, mask=later, other=0, eviction_policy="evict_first")
        if BITS == 3:
            nxt1 = tl.load(at + 1, mask=later, other=0, eviction_policy="evict_first")
            nxt2 = tl.load(at + 2, mask=later, other=0, eviction_policy="evict_first")
        # t = sum_j (a c_j + b) x_j per row and word, as one FFMA per code:
        # v_j = 1 + c_j 2^(p_j - 23) against x'_j = a x_j 2^(23 - p_j), started at b sum x - sum x'
        t = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        z = tl.zeros((BLOCK_W,), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for i in tl.static_range(PER):
            if BITS == 3:
                word, sh, p = _slot3(i)
                w = words if word <= 0 else words1 if word == 1 else words2
            else:
                word = 0
                sh, p = _slot_shift(i, BITS)
                w = words
            # the shifts inline: Triton 3.6 passes a constexpr handed on to a helper as a runtime value
            if word == -1:
                src = _straddler(words, words1, words2, i)
            elif sh > 0:
                src = w << sh
            elif sh < 0:
                src = w >> -sh
            else:
                src = w
            xr = tl.load(x_ptr + offs_w * PER + i, mask=w_mask, other=0.0, eviction_policy="evict_last")
            xr = xr.to(tl.float32)
            x_sum += xr
            xi = xr * (lut_a * (1 << (23 - p)))
            z -= xi
            v = ((src & (mask_bits << p)) | one_bits).to(tl.float32, bitcast=True)
            t = tl.fma(v, xi[:, None], t)
        z += x_sum * lut_b
        t += z[:, None]
        p_off = ((offs_w * PER) >> GROUP_SHIFT)[:, None] + offs_n[None, :] * n_groups
        s = tl.load(scale_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(t, s, acc)
        if HAS_MIN:
            acc = tl.fma(tl.load(min_ptr + p_off, mask=mask, other=0.0).to(tl.float32),
                         x_sum[:, None], acc)
    v = tl.sum(acc, axis=0)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + offs_n, v, mask=n_mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, v.to(y_ptr.dtype.element_ty), mask=n_mask)


# (BLOCK_N, BLOCK_W, num_warps, num_stages): a step reads BLOCK_N rows x BLOCK_W words (4 bytes each; 3 bits:
# units of 12 bytes)
_CONFIGS = [(8, 128, 4, 3), (16, 128, 4, 3), (8, 256, 8, 3), (16, 64, 4, 4), (4, 256, 4, 3), (32, 64, 4, 3),
            (16, 128, 8, 2), (8, 64, 2, 4)]
_KEY = ["N", "row_words", "BITS", "HAS_MIN", "SPLIT_K"]

# the one config used under TRITON_INTERPRET=1 (tests vary it)
INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_W": 8, "SPLIT_K": 1}


def _autotuned(split: bool):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=st)
               for bn, bw, w, st in _CONFIGS]
    return autotune(_gemv_affine_kernel, configs, _KEY, bench(10, 40, median=True),
                    reset_to_zero=["y_ptr"] if split else None)


_tuned = None if INTERPRET else _autotuned(split=False)
_tuned_split = None if INTERPRET else _autotuned(split=True)
last_tuner = None
calls = 0  # launches so far (tests check which kernel served a call)


def _per(bits: int) -> int:
    """Codes per unit the kernel reads: a word of 16 (2-bit) or 8 (4-bit), three words of 32 (3-bit); 0: none."""
    return {2: 16, 3: 32, 4: 8}.get(bits, 0)


def supported(M: int, K: int, bits: int, decode_mode: int, group: int, codes: torch.Tensor) -> bool:
    """Batch 1, 2, 3 or 4 bits, affine decode, rows of whole units (int32 words; 3 bits: three words), one scale
    per row or power-of-two groups of whole units."""
    per = _per(bits)
    groups_ok = group >= K or (group % per == 0 and group & (group - 1) == 0) if per else False
    return (M == 1 and groups_ok and decode_mode == 0 and K % per == 0 and codes.shape[1] * 8 == K * bits
            and codes.shape[1] % 4 == 0 and codes.storage_offset() % 4 == 0 and codes.is_contiguous())


def gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, a: float, b: float,
         bits: int, group: int, split: int) -> torch.Tensor:
    """x [1, K] @ W^T for packed codes [N, K * bits / 8] (see :func:`supported`) with scale/min [N, groups]."""
    global last_tuner, calls
    calls += 1
    N = codes.shape[0]
    words = codes.view(torch.int32)
    row_words = words.shape[1] // (3 if bits == 3 else 1)  # units of the kernel (3 bits: three words each)
    shift = 30 if group >= row_words * _per(bits) else group.bit_length() - 1
    cfg = dict(INTERPRET_CONFIG)
    if _tuned is None:
        split = cfg.pop("SPLIT_K")
    y = torch.zeros(1, N, device=x.device, dtype=torch.float32) if split > 1 else \
        torch.empty(1, N, device=x.device, dtype=x.dtype)
    args = (x, words, scale, mins if mins is not None else scale, y, N, row_words, scale.shape[1], a, b,
            (1 << bits) - 1, 0x3F800000)
    meta = {"BITS": bits, "HAS_MIN": mins is not None, "GROUP_SHIFT": shift, "SPLIT_K": split}
    if _tuned is None:
        _gemv_affine_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split)](*args, **meta, **cfg)
    else:
        last_tuner = tuner = _tuned_split if split > 1 else _tuned
        tuned = len(tuner.cache)

        def grid(meta):  # noqa: ANN001
            return triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]

        tuner[grid](*args, **meta)
        if split > 1 and len(tuner.cache) != tuned:  # the tuning runs added into y: start again
            y.zero_()
            tuner[grid](*args, **meta)
    return y.to(x.dtype) if split > 1 else y
