"""Triton GEMV for small batches (M = 1..8, decode): y = x W^T straight from packed scalar codes.

Designed to be bandwidth-bound rather than to feed tensor cores: each program owns BLOCK_N output rows and walks
all of K (or, split-K on narrow outputs, one of SPLIT_K contiguous runs of K, adding into a float32 y), reading
a [BLOCK_N, BLOCK_K] tile of packed codes per step, decoding it in registers, multiplying with
the (tiny, cache-resident) activations and reducing with ``tl.sum`` in float32. No ``tl.dot``, no padding of M.

Code reads:

* 2, 4, 8 bits with rows that are a whole number of 32-bit words (``WORDS``): the codes are read as int32 words
  (16-byte vector loads per thread), 32 / bits codes per word never straddle, and are unpacked with constant
  shifts; ``tl.interleave`` (join + reshape, register-only) puts them back in column order so that x is read as
  one contiguous vector.
* 3 bits at batch 1 with rows of whole 32-code units (12 bytes, three int32 words): each unit's three words are
  read as words and its 32 codes unpacked with constant shifts, codes 10 and 21 (which straddle two words) from
  both (:func:`word_bytes`).
* anything else (3 bits in batches, 5, 6, 7 bits, or odd row lengths): per column, the one or two bytes holding
  its code (the general, slower path). Affine grids of 3 and 5-7 bits with rows of whole 32-code units go to
  :mod:`triton_gemv_affine` instead, at batch 1 and in batches.

Decoding: uniform grids (and affine 2-bit level sets such as nz2 = code - 1.5) never build the weight. The code is
placed in the top mantissa bits of 1.0 (one shift + one LOP3), giving ``1 + c / 2^b`` exactly, and per scale
group ``sum_k c_k x_k = 2^b (sum_k (1 + c_k / 2^b) x_k - sum_k x_k)``; the group's lut slope/offset, scale and
min are applied once per (row, group), not per weight. Non-affine 2-bit level sets select among 4 levels;
other tables gather from the LUT. Groups: one per row or a power of two >= the tile (scale per row per tile), a
smaller power of two (the tile is viewed as [BLOCK_N, BLOCK_K / group, group]), or anything else (scale read per
weight, slower).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels import triton_gemv_affine
from lowbit.kernels.device import sm_count
from lowbit.kernels.launch import FUSED, INTERPRET, autotune, bench, gemv_rows
from lowbit.kernels.triton_gemv_affine import load_unit, put_sums, straddling_code

# affine grids go to the leaner kernel of triton_gemv_affine where it serves them (batch 1; batches of 3 and 5-7
# bits: triton_gemv_affine.supported); LOWBIT_GEMV_AFFINE=0: this one, e.g. to compare them
AFFINE_FAST = os.environ.get("LOWBIT_GEMV_AFFINE", "1") != "0"

# decode modes
AFFINE = 0  # lut[c] = a * c + b
TABLE4 = 1  # 2-bit: 4 arbitrary levels
GATHER = 2  # lut[c] read from memory


@triton.jit
def _decode(c, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE: tl.constexpr):
    """Codes (int32, already masked) -> lut[code] as float32 (non-affine tables)."""
    if DECODE == 1:
        v = tl.where(c == 0, l0, tl.where(c == 1, l1, tl.where(c == 2, l2, l3)))
    else:
        v = tl.load(lut_ptr + c)
    return v


@triton.jit
def _triple_code(w0, w1, w2, J: tl.constexpr):
    """Code J (0..31) of a 32-code 3-bit unit held in three little-endian words w0, w1, w2 (bits 3J..3J+2 of the
    96), at bits 0..2 of the result (higher bits are left as they fall: the caller masks)."""
    if J < 10:
        t = w0 >> (3 * J)
    elif J == 10:  # bits 30, 31 of w0 and bit 0 of w1
        t = straddling_code(w0, w1, 30, 3, 0)
    elif J < 21:
        t = w1 >> (3 * J - 32)
    elif J == 21:  # bit 31 of w1 and bits 0, 1 of w2
        t = straddling_code(w1, w2, 31, 3, 0)
    else:
        t = w2 >> (3 * J - 64)
    return t


@triton.jit
def _word_code(w, w1, w2, J: tl.constexpr, BITS: tl.constexpr, sa, sb, lut_ptr, lut_a, lut_b, l0, l1, l2, l3,
               DECODE: tl.constexpr):
    """Weight J of each packed word (3 bits: of each unit of three words w, w1, w2): lut[c] * scale (+ min) =
    (1 + c / 2^BITS) * sa + sb for affine luts."""
    MASK: tl.constexpr = (1 << BITS) - 1
    TOP: tl.constexpr = 23 - BITS  # code -> mantissa bits [23 - BITS, 23) of 1.0: exactly 1 + c / 2^BITS
    if BITS == 3:
        c = _triple_code(w, w1, w2, J)
        if DECODE == 0:
            return (((c << TOP) & (MASK << TOP)) | 0x3F800000).to(tl.float32, bitcast=True) * sa + sb
        else:
            return _decode(c & MASK, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE) * sa + sb
    elif DECODE == 0:
        if J * BITS >= TOP:
            t = w >> (J * BITS - TOP)
        else:
            t = w << (TOP - J * BITS)
        return ((t & (MASK << TOP)) | 0x3F800000).to(tl.float32, bitcast=True) * sa + sb
    else:
        return _decode((w >> (J * BITS)) & MASK, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE) * sa + sb


@triton.jit
def _unpack_words(w, w1, w2, BASE: tl.constexpr, STEP: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr, sa,
                  sb, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE: tl.constexpr):
    """Weights BASE, BASE + STEP, ... (COUNT of them) of each word (3 bits: of each three-word unit w, w1, w2),
    interleaved: [R, C] -> [R, C * COUNT]."""
    if COUNT == 1:
        return _word_code(w, w1, w2, BASE, BITS, sa, sb, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE)
    else:
        even = _unpack_words(w, w1, w2, BASE, STEP * 2, COUNT // 2, BITS, sa, sb, lut_ptr, lut_a, lut_b,
                             l0, l1, l2, l3, DECODE)
        odd = _unpack_words(w, w1, w2, BASE + STEP, STEP * 2, COUNT // 2, BITS, sa, sb, lut_ptr, lut_a, lut_b,
                            l0, l1, l2, l3, DECODE)
        return tl.interleave(even, odd)


@triton.jit
def _words_tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, offs_n, n_mask, k0, row_stride, n_groups, group,
                lut_a, lut_b, l0, l1, l2, l3, BITS: tl.constexpr, DECODE: tl.constexpr, HAS_MIN: tl.constexpr,
                BLOCK_W: tl.constexpr, PER: tl.constexpr, GROUP_SHIFT: tl.constexpr):
    """Decoded weights [len(offs_n), BLOCK_W * PER] = lut[c] * scale (+ min) of one step of packed words (3 bits:
    of three-word units, ``offs_w`` counting units)."""
    offs_w = k0 // PER + tl.arange(0, BLOCK_W)
    if BITS == 3:
        wmask = n_mask[:, None] & (3 * offs_w < row_stride)[None, :]
        at = codes_ptr + offs_n[:, None] * row_stride + 3 * offs_w[None, :]
        words, w1, w2, _, _, _, _ = load_unit(at, wmask, 3)
    else:
        wmask = n_mask[:, None] & (offs_w < row_stride)[None, :]
        words = tl.load(codes_ptr + offs_n[:, None] * row_stride + offs_w[None, :], mask=wmask, other=0,
                        eviction_policy="evict_first").to(tl.int32)
        w1 = words
        w2 = words
    # a word's PER columns never cross a scale group (groups are multiples of 8 columns, of 32 for 3-bit units)
    if GROUP_SHIFT >= 0:
        g = (offs_w * PER) >> GROUP_SHIFT
    else:
        g = (offs_w * PER) // group
    p_off = offs_n[:, None] * n_groups + g[None, :]
    s = tl.load(scale_ptr + p_off, mask=wmask, other=0.0).to(tl.float32)
    if DECODE == 0:  # lut[c] = a c + b with c = 2^b ((1 + c / 2^b) - 1)
        sa = s * (lut_a * (1 << BITS))
        sb = s * (lut_b - lut_a * (1 << BITS))
    else:
        sa = s
        sb = tl.zeros_like(s)
    if HAS_MIN:
        sb += tl.load(min_ptr + p_off, mask=wmask, other=0.0).to(tl.float32)
    return _unpack_words(words, w1, w2, 0, 1, PER, BITS, sa, sb, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE)


@triton.jit
def _x_row(x_ptr, m: tl.constexpr, M, stride_xm, offs_k, k_mask, BLOCK_N: tl.constexpr):
    """Activation row m as a [BLOCK_N, BLOCK_K] tensor (equal rows): loaded straight in the weights' layout, where
    a [BLOCK_K] load would be converted (shared memory + barriers) on every step."""
    rows0 = tl.zeros((BLOCK_N,), dtype=tl.int32)
    return tl.load(x_ptr + m * stride_xm + rows0[:, None] + offs_k[None, :],
                   mask=(rows0[:, None] + m < M) & k_mask[None, :], other=0.0,
                   eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, lut_ptr, y_ptr,
                 M, N, K, row_stride, n_groups, group, stride_xm, stride_ym,
                 lut_a, lut_b, l0, l1, l2, l3,
                 BITS: tl.constexpr, WORDS: tl.constexpr, DECODE: tl.constexpr, HAS_MIN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PER: tl.constexpr,
                 UNROLL: tl.constexpr, GROUP_SHIFT: tl.constexpr, ROW_GROUPS: tl.constexpr,
                 WORD_MULT: tl.constexpr, SPLIT_K: tl.constexpr):
    """BLOCK_W * WORD_MULT packed words (PER codes each) per row per step (WORD_MULT = 2 for int16 words, so a
    config moves the same bytes per step whatever the word size); several words per thread give wide vector loads
    and many bytes in flight. ROW_GROUPS = 2 (BLOCK_M = 1, words only): the program owns 2 * BLOCK_N rows, reusing
    each activation load. SPLIT_K > 1: program (i, j) walks the j-th of SPLIT_K contiguous runs of whole steps and
    adds its partial sums atomically into a zeroed float32 y."""
    BW: tl.constexpr = BLOCK_W * WORD_MULT
    BLOCK_K: tl.constexpr = BW * PER
    pid = tl.program_id(0)
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # steps per K run
    k_lo = tl.program_id(1) * steps * BLOCK_K
    k_hi = tl.minimum(K, k_lo + steps * BLOCK_K)
    offs_n = pid * (BLOCK_N * ROW_GROUPS) + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n_mask_b = (offs_n + BLOCK_N) < N
    acc_b = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, loop_unroll_factor=UNROLL):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # ---- codes -> w [BLOCK_N, BLOCK_K] = lut[c] * scale (+ min)
        if WORDS:
            w = _words_tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, offs_n, n_mask, k0, row_stride, n_groups, group,
                            lut_a, lut_b, l0, l1, l2, l3, BITS, DECODE, HAS_MIN, BW, PER, GROUP_SHIFT)
            if ROW_GROUPS > 1:  # a second block of rows against the same activations (converted once)
                w_b = _words_tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, offs_n + BLOCK_N, n_mask_b, k0,
                                  row_stride, n_groups, group, lut_a, lut_b, l0, l1, l2, l3, BITS, DECODE, HAS_MIN,
                                  BW, PER, GROUP_SHIFT)
        else:  # codes may straddle bytes: one or two bytes per column
            bit = offs_k * BITS
            byte = bit // 8
            row = codes_ptr + offs_n[:, None] * row_stride
            wmask = n_mask[:, None] & k_mask[None, :]
            b0 = tl.load(row + byte[None, :], mask=wmask, other=0).to(tl.int32)
            b1 = tl.load(row + byte[None, :] + 1, mask=wmask & ((byte + 1) < row_stride)[None, :], other=0)
            c = ((b0 | (b1.to(tl.int32) << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
            if DECODE == 0:
                cf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact int -> float, no I2F
                v = cf * lut_a + lut_b
            else:
                v = _decode(c, lut_ptr, lut_a, lut_b, l0, l1, l2, l3, DECODE)
            if GROUP_SHIFT >= 0:
                p_off = offs_n[:, None] * n_groups + (offs_k >> GROUP_SHIFT)[None, :]
            else:
                p_off = offs_n[:, None] * n_groups + (offs_k // group)[None, :]
            w = v * tl.load(scale_ptr + p_off, mask=wmask, other=0.0).to(tl.float32)
            if HAS_MIN:
                w += tl.load(min_ptr + p_off, mask=wmask, other=0.0).to(tl.float32)
        # ---- multiply with each activation row; elementwise accumulators, reduced once at the end
        x0 = _x_row(x_ptr, 0, M, stride_xm, offs_k, k_mask, BLOCK_N)
        acc0 += w * x0
        if ROW_GROUPS > 1:
            acc_b += w_b * x0
        if BLOCK_M > 1:
            acc1 += w * _x_row(x_ptr, 1, M, stride_xm, offs_k, k_mask, BLOCK_N)
        if BLOCK_M > 2:
            acc2 += w * _x_row(x_ptr, 2, M, stride_xm, offs_k, k_mask, BLOCK_N)
            acc3 += w * _x_row(x_ptr, 3, M, stride_xm, offs_k, k_mask, BLOCK_N)
        if BLOCK_M > 4:
            acc4 += w * _x_row(x_ptr, 4, M, stride_xm, offs_k, k_mask, BLOCK_N)
            acc5 += w * _x_row(x_ptr, 5, M, stride_xm, offs_k, k_mask, BLOCK_N)
            acc6 += w * _x_row(x_ptr, 6, M, stride_xm, offs_k, k_mask, BLOCK_N)
            acc7 += w * _x_row(x_ptr, 7, M, stride_xm, offs_k, k_mask, BLOCK_N)
    y_row = y_ptr + offs_n
    put_sums(y_row, acc0, n_mask, 1, SPLIT_K)
    if ROW_GROUPS > 1:
        put_sums(y_row + BLOCK_N, acc_b, n_mask_b, 1, SPLIT_K)
    if BLOCK_M > 1:
        put_sums(y_row + stride_ym, acc1, n_mask & ((offs_n * 0 + 1) < M), 1, SPLIT_K)
    if BLOCK_M > 2:
        put_sums(y_row + 2 * stride_ym, acc2, n_mask & ((offs_n * 0 + 2) < M), 1, SPLIT_K)
        put_sums(y_row + 3 * stride_ym, acc3, n_mask & ((offs_n * 0 + 3) < M), 1, SPLIT_K)
    if BLOCK_M > 4:
        put_sums(y_row + 4 * stride_ym, acc4, n_mask & ((offs_n * 0 + 4) < M), 1, SPLIT_K)
        put_sums(y_row + 5 * stride_ym, acc5, n_mask & ((offs_n * 0 + 5) < M), 1, SPLIT_K)
        put_sums(y_row + 6 * stride_ym, acc6, n_mask & ((offs_n * 0 + 6) < M), 1, SPLIT_K)
        put_sums(y_row + 7 * stride_ym, acc7, n_mask & ((offs_n * 0 + 7) < M), 1, SPLIT_K)

# (BLOCK_N, num_warps, WPT, UNROLL, ROW_GROUPS, num_stages): BLOCK_W = WPT * 32 * num_warps / BLOCK_N words per row
# per step, WPT (4-byte) words per thread (x2 int16 words for 2-bit), so one step of a program reads
# 128 * num_warps * WPT bytes of codes with 16-byte vector loads at WPT = 4. Bandwidth needs ~16 KB in flight per SM
# (Little's law): the big tiles (2-8 KB per step) with a few resident programs per SM, software-pipelined by
# num_stages, give that; the WPT = 1 configs are the old small tiles (for batch 4-8, where the accumulators grow).
_CONFIGS = [(4, 4, 1, 4, 1, 3), (2, 4, 1, 4, 2, 3), (4, 4, 4, 1, 1, 3), (4, 8, 4, 1, 1, 3), (2, 8, 4, 1, 1, 3),
            (8, 8, 4, 1, 1, 3), (4, 8, 8, 1, 1, 2), (4, 4, 4, 1, 2, 3), (2, 4, 2, 2, 1, 4)]
_ACC_BUDGET = 64  # fp32 accumulator registers per thread: decoded codes per thread * BLOCK_M * ROW_GROUPS


def _codes_per_thread(c, args) -> int:  # noqa: ANN001
    bn, bw = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"]
    return bn * bw * args["WORD_MULT"] * args["PER"] // (32 * c.num_warps)


def _prune(configs, nargs, **kwargs):  # noqa: ANN001 - triton's prune hook
    """Two row groups only for M = 1 on the word path; accumulators within a register budget; tiles no wider than
    K (rounded up to a power of two). Never returns an empty list."""
    args = {**nargs, **kwargs}  # Triton 3.6 passes constexpr arguments given by keyword in kwargs, 3.9 in nargs
    ok = args["BLOCK_M"] == 1 and args["WORDS"]
    configs = [c for c in configs if ok or c.kwargs["ROW_GROUPS"] == 1]
    cost = {c: _codes_per_thread(c, args) * args["BLOCK_M"] * c.kwargs["ROW_GROUPS"] for c in configs}
    budget = max(_ACC_BUDGET, min(cost.values()))
    kept = [c for c in configs if cost[c] <= budget]
    k_pow2 = triton.next_power_of_2(args["K"])
    narrow = [c for c in kept
              if c.kwargs["BLOCK_W"] * args["WORD_MULT"] * args["PER"] <= k_pow2]
    return narrow or kept


_KEY = ["N", "K", "BITS", "WORDS", "DECODE", "HAS_MIN", "BLOCK_M", "SPLIT_K"]


def _autotuned(split: bool):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_W": wpt * 32 * w // bn, "UNROLL": u, "ROW_GROUPS": r},
                             num_warps=w, num_stages=st)
               for bn, w, wpt, u, r, st in _CONFIGS]
    prune = {"early_config_prune": _prune}
    # split-K adds into y: zeroed before every timed call and once after tuning
    zero = ["y_ptr"] if split else None
    # the choice is made once per shape: median of a longer run
    return autotune(_gemv_kernel, configs, _KEY, bench(10, 40, median=True), prune_configs_by=prune,
                    reset_to_zero=zero)


_gemv_tuned = None if INTERPRET else _autotuned(split=False)
_gemv_tuned_split = None if INTERPRET else _autotuned(split=True)
_last_tuner = None

# the one config used under TRITON_INTERPRET=1 (tests vary it; SPLIT_K there overrides the heuristic)
INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_W": 4, "UNROLL": 1, "ROW_GROUPS": 1}


def last_best_config() -> str:
    """The config the autotuner used for the latest (compiled) call, e.g. for benchmarks."""
    if _last_tuner is None or getattr(_last_tuner, "best_config", None) is None:
        return "-"
    return str(_last_tuner.best_config)


def split_k(N: int, K: int, device: torch.device) -> int:
    """K runs per row block: enough programs (~2 per SM at 4 rows per program) on narrow outputs, runs >= 1024."""
    if device.type != "cuda":
        return 1
    split = 1
    while triton.cdiv(N, 4) * split < 2 * sm_count(device) and split < 4 and K // (2 * split) >= 1024:
        split *= 2
    return split


def word_bytes(codes: torch.Tensor, bits: int, group: int, k: int, m: int = 1) -> int:
    """Bytes of the unit the kernel reads codes in (0: one or two bytes per column, the general path): words of 8
    codes (4 for 8-bit), int32 for 4/8 bits, int16 for 2 bits; for 3 bits 12-byte units of 32 codes (three int32
    words) where rows are whole units, no unit crosses a scale group and the batch ``m`` is 1: at batch 8 a tile's
    32-code units times 8 accumulators overflow the registers (4096x4096 took 1080 us on an H100 against 65 us
    reading bytes, docs/kernel-measurements.md); affine 3-bit batches go to :mod:`triton_gemv_affine`."""
    wbytes = {2: 2, 3: 12, 4: 4, 8: 4}.get(bits, 0)
    if wbytes == 0 or codes.shape[1] % wbytes or codes.storage_offset() % min(wbytes, 4):
        return 0
    return 0 if bits == 3 and (m > 1 or (group < k and group % 32)) else wbytes


def gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, lut: torch.Tensor,
         decode: tuple, bits: int, group: int, n_cols: int) -> torch.Tensor:
    """x [M <= 8, K] (rows contiguous) @ W^T; W [N, K] as packed codes [N, row_bytes] + scale/min [N, groups].

    ``decode`` = (mode, a, b, levels): AFFINE (lut[c] = a c + b), TABLE4 (2-bit levels) or GATHER (from ``lut``).
    """
    global _last_tuner
    M, K, block_m = gemv_rows(x.shape, n_cols)
    N = codes.shape[0]
    cfg = dict(INTERPRET_CONFIG)
    split = cfg.pop("SPLIT_K", 1) if _gemv_tuned is None else split_k(N, K, x.device)
    mode, a, b, levels = decode
    if AFFINE_FAST and triton_gemv_affine.supported(M, K, bits, mode, group, codes):
        y = triton_gemv_affine.gemv(x, codes, scale, mins, a, b, bits, group, split)
        _last_tuner = triton_gemv_affine.last_tuner
        return y
    # split-K: partial sums added atomically into a zeroed float32 y, cast at the end
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32) if split > 1 else \
        torch.empty(M, N, device=x.device, dtype=x.dtype)
    wbytes = word_bytes(codes, bits, group, K, M)
    words = wbytes > 0
    if words:
        codes = codes.view(torch.int16 if wbytes == 2 else torch.int32)
    per = wbytes * 8 // bits if words else 1
    args = (x, codes, scale, mins if mins is not None else scale, lut, y, M, N, K, codes.shape[1], scale.shape[1],
            group, x.stride(0), y.stride(0), a, b, *levels)
    # scale group of a column: k >> GROUP_SHIFT for power-of-two groups (one group per row: 30), else k // group
    shift = 30 if group >= K else group.bit_length() - 1 if group & (group - 1) == 0 else -1
    meta = {"BITS": bits, "WORDS": words, "DECODE": mode, "HAS_MIN": mins is not None, "BLOCK_M": block_m,
            "PER": per, "GROUP_SHIFT": shift, "WORD_MULT": 2 if words and wbytes == 2 else 1, "SPLIT_K": split}
    if _gemv_tuned is None:  # interpreter: one config, no tuning
        if block_m > 1 or not words:
            cfg["ROW_GROUPS"] = 1
        _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"] * cfg["ROW_GROUPS"]), split)](*args, **meta, **cfg, **FUSED)
    else:
        _last_tuner = tuner = _gemv_tuned_split if split > 1 else _gemv_tuned
        tuned = len(tuner.cache)

        def grid(meta):  # noqa: ANN001
            return triton.cdiv(N, meta["BLOCK_N"] * meta["ROW_GROUPS"]), meta["SPLIT_K"]

        tuner[grid](*args, **meta, **FUSED)
        if split > 1 and len(tuner.cache) != tuned:  # this call tuned: whatever the triton version did with the
            y.zero_()  # timing runs' sums, start again from zero with the chosen config
            tuner[grid](*args, **meta, **FUSED)
    return y.to(x.dtype) if split > 1 else y
