"""Triton GEMV for decode on 2- to 7-bit affine grids: y = x W^T at few instructions per weight.

The general kernel (:mod:`triton_gemv`) is issue-bound on the H100, not bandwidth-bound: to keep up with HBM at
2 bits the SMs must retire ~40 weights per clock, i.e. spend about 3 instructions per weight. This kernel covers
what decode spends its time on (uniform 2- to 7-bit sym/asym grids and affine 2-bit level sets such as nz2:
``lut[c] = a c + b``; one scale per row or power-of-two groups) at M = 1, and the widths the general kernel can
only read per column (3, 5, 6, 7 bits) at M = 2..8. Per weight and activation row it spends:

* one LOP3 (per weight, shared by the batch rows): ``(src & (MASK << p)) | 0x3F800000`` is the float
  ``1 + c 2^(p - 23)``, where ``src`` is the word shifted so that the code sits at bits p .. p + bits - 1, p in a
  window at the top of the mantissa (one shift serves 5 codes at 2 bits, 3 at 3 and 4 bits, 2 at 5-7 bits);
* one FFMA against the activation pre-scaled by ``2^(23 - p)`` (exact: a power of two). The ``1`` terms are
  taken out once per word (``- sum x'``, shared by all rows); the window keeps >= 16 bits of every ``c x``
  (relative error ~1e-4, below a float16 output's rounding).

Units: a word of 16 (2-bit) or 8 (4-bit) codes; at other widths 32 codes in ``bits`` int32 words, where a code
that straddles two words (3 bits: codes 10 and 21) takes one shift from each.

Scale, min and the affine map are applied once per unit: ``sum_j w_j x_j = s (a sum c_j x_j + b sum x_j) + m sum
x_j``. Tiles are [units, rows] with one unit per thread and all rows of it in the same thread, so activations are
loaded and scaled once for all rows; the unit index runs fastest in every tensor and load (the row stride is not
specialized, so loads are not vectorized), which gives words, activations and scales one layout in Triton 3.6 and
3.9 alike: no shared-memory layout conversion in the loop (checked in the SASS). A thread loads its unit's
activations 8 at a time (one 16-byte load, split in registers): a load per code made every warp load touch 32
sectors for 2 bytes of each. Batches keep two accumulators (the step's sums and the scaled total) per activation
row, row and unit, with a program per 2 or 4 activation rows.

Split-K (narrow outputs): program (i, j) walks the j-th of SPLIT_K runs of units and adds its partial sums into a
zeroed float32 y atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import FUSED, INTERPRET, MAX_M, autotune, bench, gemv_rows


@triton.jit
def straddling_code(lo, hi, r: tl.constexpr, BITS: tl.constexpr, AT: tl.constexpr):
    """The code at bits r .. r + BITS - 1 of words (lo, hi) with r + BITS > 32, at bits AT .. AT + BITS - 1, the
    rest zero (3 bits: code 10 is bits 30, 31 of word 0 and bit 0 of word 1). Both GEMVs' units."""
    LOW: tl.constexpr = 32 - r  # its bits in lo
    ONE: tl.constexpr = 1  # constexpr << constexpr: Triton 3.6's constexpr has no __rlshift__
    return (((lo >> (r - AT)) & (((ONE << LOW) - 1) << AT))
            | ((hi << (AT + LOW)) & (((ONE << (BITS - LOW)) - 1) << (AT + LOW))))


@triton.jit
def _pick(q: tl.constexpr, w0, w1, w2, w3, w4, w5, w6):
    """Word q of a unit."""
    if q == 0:
        return w0
    elif q == 1:
        return w1
    elif q == 2:
        return w2
    elif q == 3:
        return w3
    elif q == 4:
        return w4
    elif q == 5:
        return w5
    else:
        return w6


@triton.jit
def load_unit(at, mask, UNIT: tl.constexpr):
    """The UNIT words of each unit at ``at`` (words past UNIT repeat the first: never read). Both GEMVs' units."""
    w0 = tl.load(at, mask=mask, other=0, eviction_policy="evict_first")
    w1 = w0
    w2 = w0
    w3 = w0
    w4 = w0
    w5 = w0
    w6 = w0
    if UNIT > 1:
        w1 = tl.load(at + 1, mask=mask, other=0, eviction_policy="evict_first")
        w2 = tl.load(at + 2, mask=mask, other=0, eviction_policy="evict_first")
    if UNIT > 3:
        w3 = tl.load(at + 3, mask=mask, other=0, eviction_policy="evict_first")
        w4 = tl.load(at + 4, mask=mask, other=0, eviction_policy="evict_first")
    if UNIT > 5:
        w5 = tl.load(at + 5, mask=mask, other=0, eviction_policy="evict_first")
    if UNIT > 6:
        w6 = tl.load(at + 6, mask=mask, other=0, eviction_policy="evict_first")
    return w0, w1, w2, w3, w4, w5, w6


@triton.jit
def _code(i: tl.constexpr, BITS: tl.constexpr, u0, u1, u2, u3, u4, u5, u6, mask_bits, one_bits):
    """Code i of each unit (words u0..) as the float ``1 + c 2^(P - 23)``, and ``2^(23 - P)``.

    Code i is bits R .. R + BITS - 1 of the unit's word Q. It goes to bits P .. P + BITS - 1 of the mantissa, P in
    the window [TOP - (CPS - 1) BITS, TOP], so that runs of CPS codes of a word share one shift; a code that
    straddles two words goes to TOP. Worked out in a helper's constexprs: in Triton 3.6 a plain variable assigned
    in a static_range loop is a runtime value."""
    TOP: tl.constexpr = 23 - BITS
    # codes per shift: the window's bottom P keeps P + BITS >= 15, as at 2 and 4 bits (2 bits: 5; 3, 4: 3; 5-7: 2)
    CPS: tl.constexpr = 1 + 8 // BITS
    ONE: tl.constexpr = 1  # constexpr << constexpr: Triton 3.6's constexpr has no __rlshift__
    Q: tl.constexpr = BITS * i // 32
    R: tl.constexpr = BITS * i % 32
    if R + BITS > 32:
        P: tl.constexpr = TOP
        src = straddling_code(_pick(Q, u0, u1, u2, u3, u4, u5, u6), _pick(Q + 1, u0, u1, u2, u3, u4, u5, u6), R,
                              BITS, TOP)
    else:
        HEAD: tl.constexpr = (32 * Q + BITS - 1) // BITS  # the word's first code wholly inside it
        P: tl.constexpr = TOP - (CPS - 1 - (i - HEAD) % CPS) * BITS
        w = _pick(Q, u0, u1, u2, u3, u4, u5, u6)
        if P > R:
            src = w << (P - R)
        elif P < R:
            src = w >> (R - P)
        else:
            src = w
    return ((src & (mask_bits << P)) | one_bits).to(tl.float32, bitcast=True), ONE << (23 - P)


@triton.jit
def _x8(x_row, offs, w_mask, BLOCK_W: tl.constexpr):
    """Activations offs .. offs + 7 of every unit as a tuple of 8 float32 [BLOCK_W] tensors: one 16-byte load a
    thread, split in registers (a load per code would make every warp load touch 32 sectors for 2 bytes each)."""
    x = tl.load(x_row + offs[:, None] + tl.arange(0, 8)[None, :], mask=w_mask[:, None], other=0.0,
                eviction_policy="evict_last").to(tl.float32)
    even, odd = tl.split(tl.reshape(x, (BLOCK_W, 4, 2)))  # codes 0 2 4 6 | 1 3 5 7
    e0, e1 = tl.split(tl.reshape(even, (BLOCK_W, 2, 2)))  # 0 4 | 2 6
    o0, o1 = tl.split(tl.reshape(odd, (BLOCK_W, 2, 2)))  # 1 5 | 3 7
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _fma_row(xr, xs, v, t, z, x_sum):
    """One code of every word against one activation row x: t += v x', z -= x', x_sum += x with x' = xs x."""
    xi = xr * xs
    return tl.fma(v, xi[:, None], t), z - xi, x_sum + xr


@triton.jit
def _fold(acc, t, z, x_sum, s, mn, lut_b, HAS_MIN: tl.constexpr):
    """A step's per-word sums into the accumulator: (t + b sum x - sum x') s (+ min sum x)."""
    t += (z + x_sum * lut_b)[:, None]
    acc = tl.fma(t, s, acc)
    if HAS_MIN:
        acc = tl.fma(mn, x_sum[:, None], acc)
    return acc


@triton.jit
def put_sums(ptrs, acc, mask, AXIS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Sums of an accumulator tile along AXIS: stored, or added atomically (float32 y) under split-K (both GEMVs)."""
    v = tl.sum(acc, axis=AXIS)
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, v, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["row_words", "n_groups"])
def _gemv_affine_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, y_ptr, M, N, row_words, n_groups, stride_xm,
                        stride_ym, lut_a, lut_b, mask_bits, one_bits,
                        BITS: tl.constexpr, HAS_MIN: tl.constexpr, GROUP_SHIFT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                        SPLIT_K: tl.constexpr):
    # mask_bits / one_bits (the code mask and float 1.0's bits) come in as arguments so that the compiler keeps
    # them in registers instead of rematerializing immediates in the loop. row_words counts units.
    UNIT: tl.constexpr = 1 if BITS == 2 or BITS == 4 else BITS  # int32 words per unit
    PER: tl.constexpr = 32 // BITS if UNIT == 1 else 32  # codes per unit
    pid = tl.program_id(0)
    # program (i, j, k): rows block i, K run j, activation rows k BLOCK_M .. (k + 1) BLOCK_M - 1
    M_left = M
    if BLOCK_M > 1:  # (batch 1 keeps the kernel it was tuned as)
        m_lo = tl.program_id(2) * BLOCK_M
        x_ptr += m_lo * stride_xm
        y_ptr += m_lo * stride_ym
        M_left = M - m_lo
    steps = tl.cdiv(tl.cdiv(row_words, BLOCK_W), SPLIT_K)
    w_lo = tl.program_id(1) * steps * BLOCK_W
    w_hi = tl.minimum(row_words, w_lo + steps * BLOCK_W)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # activation rows past M read row 0 (computed, not stored)
    x1 = x_ptr + stride_xm * (1 < M_left)
    x2 = x_ptr + 2 * stride_xm * (2 < M_left)
    x3 = x_ptr + 3 * stride_xm * (3 < M_left)
    acc0 = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    rows = codes_ptr + offs_n[None, :] * (row_words * UNIT)
    offs_w = w_lo + tl.arange(0, BLOCK_W)
    first = (offs_w < w_hi)[:, None] & n_mask[None, :]
    n0, n1, n2, n3, n4, n5, n6 = load_unit(rows + UNIT * offs_w[:, None], first, UNIT)
    for w_0 in range(w_lo, w_hi, BLOCK_W):
        # the next step's words are requested before this step's are decoded (registers double-buffer them):
        # the decode is long enough that waiting for each load in turn would leave HBM idle
        u0, u1, u2, u3, u4, u5, u6 = n0, n1, n2, n3, n4, n5, n6
        offs_w = w_0 + tl.arange(0, BLOCK_W)
        w_mask = offs_w < w_hi
        mask = w_mask[:, None] & n_mask[None, :]
        offs_nxt = offs_w + BLOCK_W
        later = (offs_nxt < w_hi)[:, None] & n_mask[None, :]
        n0, n1, n2, n3, n4, n5, n6 = load_unit(rows + UNIT * offs_nxt[:, None], later, UNIT)
        # t = sum_j (a c_j + b) x_j per row and word, as one FFMA per code and activation row:
        # v_j = 1 + c_j 2^(p_j - 23) against x'_j = a x_j 2^(23 - p_j), started at b sum x - sum x'
        t0 = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        t1, t2, t3 = t0, t0, t0
        z0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        z1, z2, z3 = z0, z0, z0
        s0, s1, s2, s3 = z0, z0, z0, z0  # sums of x
        for g in tl.static_range(PER // 8):
            offs = offs_w * PER + 8 * g
            xa = _x8(x_ptr, offs, w_mask, BLOCK_W)
            xb = xa
            xc = xa
            xd = xa
            if BLOCK_M > 1:
                xb = _x8(x1, offs, w_mask, BLOCK_W)
            if BLOCK_M > 2:
                xc = _x8(x2, offs, w_mask, BLOCK_W)
                xd = _x8(x3, offs, w_mask, BLOCK_W)
            for k in tl.static_range(8):
                v, x_scale = _code(8 * g + k, BITS, u0, u1, u2, u3, u4, u5, u6, mask_bits, one_bits)
                xs = lut_a * x_scale
                t0, z0, s0 = _fma_row(xa[k], xs, v, t0, z0, s0)
                if BLOCK_M > 1:
                    t1, z1, s1 = _fma_row(xb[k], xs, v, t1, z1, s1)
                if BLOCK_M > 2:
                    t2, z2, s2 = _fma_row(xc[k], xs, v, t2, z2, s2)
                    t3, z3, s3 = _fma_row(xd[k], xs, v, t3, z3, s3)
        p_off = ((offs_w * PER) >> GROUP_SHIFT)[:, None] + offs_n[None, :] * n_groups
        sc = tl.load(scale_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        mn = sc
        if HAS_MIN:
            mn = tl.load(min_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        acc0 = _fold(acc0, t0, z0, s0, sc, mn, lut_b, HAS_MIN)
        if BLOCK_M > 1:
            acc1 = _fold(acc1, t1, z1, s1, sc, mn, lut_b, HAS_MIN)
        if BLOCK_M > 2:
            acc2 = _fold(acc2, t2, z2, s2, sc, mn, lut_b, HAS_MIN)
            acc3 = _fold(acc3, t3, z3, s3, sc, mn, lut_b, HAS_MIN)
    y_row = y_ptr + offs_n
    put_sums(y_row, acc0, n_mask, 0, SPLIT_K)
    if BLOCK_M > 1:
        put_sums(y_row + stride_ym, acc1, n_mask & (offs_n * 0 + 1 < M_left), 0, SPLIT_K)
    if BLOCK_M > 2:
        put_sums(y_row + 2 * stride_ym, acc2, n_mask & (offs_n * 0 + 2 < M_left), 0, SPLIT_K)
        put_sums(y_row + 3 * stride_ym, acc3, n_mask & (offs_n * 0 + 3 < M_left), 0, SPLIT_K)


# (BLOCK_N, BLOCK_W, num_warps, num_stages): a step reads BLOCK_N rows x BLOCK_W units (a word of 4 bytes at 2
# and 4 bits, else BITS words). Batch 1 tunes over these
_CONFIGS = [(8, 128, 4, 3), (16, 128, 4, 3), (8, 256, 8, 3), (16, 64, 4, 4), (4, 256, 4, 3), (32, 64, 4, 3),
            (16, 128, 8, 2), (8, 64, 2, 4)]
# batches over these, plus BLOCK_M activation rows per program (a program per BLOCK_M rows of the batch): the
# compiler loads all of a unit's activations for every row at once; 8 rows of 32 codes spilled (compiled for sm_90)
_BATCH_CONFIGS = [(1, 128, 4, 1), (2, 128, 4, 1), (4, 128, 4, 1), (2, 256, 8, 1), (2, 64, 2, 2), (4, 64, 4, 1)]
_BATCH_ROWS = 8  # BLOCK_N * BLOCK_M of a batch config
_KEY = ["N", "row_words", "BITS", "HAS_MIN", "M", "SPLIT_K"]

# the one config used under TRITON_INTERPRET=1 (tests vary it; BLOCK_M applies to batches)
INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_W": 8, "BLOCK_M": 2, "SPLIT_K": 1}


def _configs() -> list:
    one = [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "BLOCK_M": 1}, num_warps=w, num_stages=st)
           for bn, bw, w, st in _CONFIGS]
    return one + [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "BLOCK_M": bm}, num_warps=w, num_stages=st)
                  for bn, bw, w, st in _BATCH_CONFIGS for bm in (2, 4) if bn * bm <= _BATCH_ROWS]


def _prune(configs, nargs, **kwargs):  # noqa: ANN001 - triton's prune hook
    """Batch 1: one activation row per program; batches: the batch configs, no more rows than the batch has."""
    M = {**nargs, **kwargs}["M"]
    if M == 1:
        return [c for c in configs if c.kwargs["BLOCK_M"] == 1]
    return [c for c in configs if c.kwargs["BLOCK_M"] > 1 and c.kwargs["BLOCK_M"] <= triton.next_power_of_2(M)]


def _autotuned(split: bool):
    return autotune(_gemv_affine_kernel, _configs(), _KEY, bench(10, 40, median=True),
                    prune_configs_by={"early_config_prune": _prune},
                    reset_to_zero=["y_ptr"] if split else None)


_tuned = None if INTERPRET else _autotuned(split=False)
_tuned_split = None if INTERPRET else _autotuned(split=True)
last_tuner = None
calls = 0  # launches so far (tests check which kernel served a call)


def _unit(bits: int) -> tuple[int, int]:
    """(int32 words, codes) of the unit the kernel reads: one word of 16 (2-bit) or 8 (4-bit) codes, else 32 codes
    in ``bits`` words (3, 5, 6, 7 bits); (0, 0): none."""
    if bits in (2, 4):
        return 1, 32 // bits
    return (bits, 32) if 3 <= bits <= 7 else (0, 0)


# widths served in batches (the general kernel reads 2- and 4-bit words there, and the CUDA GEMV serves those where
# it runs); the general kernel reads these per column, 2.2-6.1x slower at batches 2-8 on an H100 (docs/kernels.md)
BATCH_BITS = (3, 5, 6, 7)


def supported(M: int, K: int, bits: int, decode_mode: int, group: int, codes: torch.Tensor) -> bool:
    """Affine decode, 2 to 7 bits (batches 2-8: :data:`BATCH_BITS`), rows of whole units, one scale per row or
    power-of-two groups of whole units, codes contiguous and word-aligned."""
    _, per = _unit(bits)
    groups_ok = group >= K or (group % per == 0 and group & (group - 1) == 0) if per else False
    rows_ok = M == 1 or (M <= MAX_M and bits in BATCH_BITS)
    return (rows_ok and groups_ok and decode_mode == 0 and K % per == 0 and codes.shape[1] * 8 == K * bits
            and codes.shape[1] % 4 == 0 and codes.storage_offset() % 4 == 0 and codes.is_contiguous())


def gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, a: float, b: float,
         bits: int, group: int, split: int) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ W^T for packed codes [N, K * bits / 8] (see :func:`supported`) with scale/min
    [N, groups]."""
    global last_tuner, calls
    calls += 1
    M, K, _ = gemv_rows(x.shape, codes.shape[1] * 8 // bits)
    N = codes.shape[0]
    words = codes.view(torch.int32)
    unit, per = _unit(bits)
    row_words = words.shape[1] // unit  # units per row
    shift = 30 if group >= K else group.bit_length() - 1
    cfg = dict(INTERPRET_CONFIG)
    if _tuned is None:
        split = cfg.pop("SPLIT_K")
        cfg["BLOCK_M"] = 1 if M == 1 else cfg["BLOCK_M"]
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split > 1 else \
        torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, words, scale, mins if mins is not None else scale, y, M, N, row_words, scale.shape[1], x.stride(0),
            y.stride(0), a, b, (1 << bits) - 1, 0x3F800000)
    meta = {"BITS": bits, "HAS_MIN": mins is not None, "GROUP_SHIFT": shift, "SPLIT_K": split}
    if _tuned is None:
        blocks = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
        _gemv_affine_kernel[blocks](*args, **meta, **cfg, **FUSED)
    else:
        last_tuner = tuner = _tuned_split if split > 1 else _tuned
        tuned = len(tuner.cache)

        def grid(meta):  # noqa: ANN001
            return triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(M, meta["BLOCK_M"])

        tuner[grid](*args, **meta, **FUSED)
        if split > 1 and len(tuner.cache) != tuned:  # the tuning runs added into y: start again
            y.zero_()
            tuner[grid](*args, **meta, **FUSED)
    return y.to(x.dtype) if split > 1 else y
