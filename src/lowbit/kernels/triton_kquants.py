"""Triton GEMV for llama.cpp's k-quants (``q2_k`` .. ``q6_k``): y = x W^T for M = 1..8, straight from ggml's bytes.

The weight is the format's ``qs`` uint8 [rows, superblocks * block_bytes]: each row exactly llama.cpp's
``block_q*_K`` array (:mod:`lowbit.formats.kquants` documents every layout). Each program owns BLOCK_N rows and
walks them 64 weights at a time (a quarter superblock, two runs of 32 weights whose codes lie in 32 consecutive
bytes each): one byte load per weight for its code (two for Q3_K's, Q5_K's and Q6_K's high bits), the integer
scales (and mins) once per run or 16-weight sub-block, ``d`` (and ``dmin``) once per row, then
``(d sc) q - (dmin mn)`` or ``(d sc) (q - 2^(bits-1))`` in float32 with the products in ggml's order
(``dequantize_row_q*_K``, and :meth:`KQuantFormat.decode`), accumulated with x elementwise in float32 and reduced
once at the end. Bytes shared by several codes (2-bit fields) are served by L1. Larger batches (a prompt) take
:func:`dequantize`, the same decode written out as a dense weight for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.formats.kquants import QK_K, KQuantFormat
from lowbit.kernels.launch import EXACT, FUSED, INTERPRET, autotune, bench, gemv_rows

CHUNK = tl.constexpr(64)  # weights per step: a quarter superblock


@triton.jit
def _byte(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(ptr, offs, mask):
    """The little-endian fp16 at byte ``offs``, as float32."""
    bits = _byte(ptr, offs, mask) | (_byte(ptr, offs + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kquant_chunk(qs_ptr, base, qtr, mask, KIND: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weights [BLOCK_N, 64] of quarter ``qtr`` (0..3) of the superblocks at byte ``base`` [BLOCK_N, 1], as ggml's
    dequantize_row_q*_K computes them in float32. The quarter is two runs r = 2 qtr + h of 32 weights: in every
    layout run r's codes sit in 32 consecutive bytes at one bit position, and its one (Q4_K, Q5_K) or two
    (16-weight sub-blocks 2 r + s) sub-blocks take their scales from a few bytes, read once per run."""
    h = tl.arange(0, 2)[None, :, None]
    r = 2 * qtr + h  # [1, 2, 1]
    m = tl.arange(0, 32)[None, None, :]
    sub = 2 * r + tl.arange(0, 2)[None, None, :]  # [1, 2, 2]: 16-weight sub-blocks
    b3 = base[:, :, None]
    mk = mask[:, :, None]
    if KIND == 2:  # scales[16] (sc | mn << 4), qs[64], d, dmin
        q = (_byte(qs_ptr, b3 + 16 + 32 * (r // 4) + m, mk) >> (2 * (r % 4))) & 3
        sm = _byte(qs_ptr, b3 + sub, mk)
        scale = _half(qs_ptr, base + 80, mask)[:, :, None] * (sm & 15).to(tl.float32)
        mins = _half(qs_ptr, base + 82, mask)[:, :, None] * (sm >> 4).to(tl.float32)
    elif KIND == 3:  # hmask[32], qs[64], scales[12] (6-bit sc + 32), d
        lo = (_byte(qs_ptr, b3 + 32 + 32 * (r // 4) + m, mk) >> (2 * (r % 4))) & 3
        q = lo | (((_byte(qs_ptr, b3 + m, mk) >> r) & 1) << 2)
        s_lo = (_byte(qs_ptr, b3 + 96 + sub % 8, mk) >> (4 * (sub // 8))) & 15
        s_hi = (_byte(qs_ptr, b3 + 104 + sub % 4, mk) >> (2 * (sub // 4))) & 3
        scale = _half(qs_ptr, base + 108, mask)[:, :, None] * ((s_lo | (s_hi << 4)) - 32).to(tl.float32)
    elif KIND == 6:  # ql[128], qh[64], int8 scales[16], d
        lo = (_byte(qs_ptr, b3 + 64 * (r // 4) + 32 * (r % 2) + m, mk) >> (4 * ((r // 2) % 2))) & 15
        q = lo | (((_byte(qs_ptr, b3 + 128 + 32 * (r // 4) + m, mk) >> (2 * (r % 4))) & 3) << 4)
        sc = _byte(qs_ptr, b3 + 192 + sub, mk)
        scale = _half(qs_ptr, base + 208, mask)[:, :, None] * tl.where(sc >= 128, sc - 256, sc).to(tl.float32)
    else:  # Q4_K, Q5_K: d, dmin, scales[12] (get_scale_min_k4: sub-block r), [qh[32]], qs[128]
        QS: tl.constexpr = 16 if KIND == 4 else 48
        q = (_byte(qs_ptr, b3 + QS + 32 * (r // 2) + m, mk) >> (4 * (r % 2))) & 15
        if KIND == 5:
            q = q | (((_byte(qs_ptr, b3 + 16 + m, mk) >> r) & 1) << 4)
        a = _byte(qs_ptr, b3 + 4 + r, mk)  # [BLOCK_N, 2, 1]: bytes r and r + 4 (r < 4), else r + 4, r - 4 and r
        b = _byte(qs_ptr, b3 + 8 + r, mk)
        c = _byte(qs_ptr, b3 + 4 + tl.where(r < 4, r, r - 4), mk)
        sc = tl.where(r < 4, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(r < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
        scale = _half(qs_ptr, base, mask)[:, :, None] * sc.to(tl.float32)
        mins = _half(qs_ptr, base + 2, mask)[:, :, None] * mn.to(tl.float32)
    q4 = tl.reshape(q, (BLOCK_N, 2, 2, 16)).to(tl.float32)  # [row, run, half run, weight]
    if KIND == 3 or KIND == 6:  # (d sc) (q - 2^(bits-1))
        w = scale[:, :, :, None] * (q4 - (4.0 if KIND == 3 else 32.0))
    else:  # (d sc) q - (dmin mn)
        w = scale[:, :, :, None] * q4 - mins[:, :, :, None]
    return tl.reshape(w, (BLOCK_N, CHUNK))


@triton.jit
def _kquant_gemv_kernel(x_ptr, qs_ptr, y_ptr, M, N, K, row_bytes, stride_xm, stride_ym, KIND: tl.constexpr,
                        BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N)[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, CHUNK)
    rows0 = tl.zeros((BLOCK_N,), dtype=tl.int32)
    row_base = offs_n.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BLOCK_M, BLOCK_N, CHUNK), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        base = row_base + (k0 // 256) * BLOCK_BYTES
        w = _kquant_chunk(qs_ptr, base, (k0 % 256) // CHUNK, n_mask, KIND, BLOCK_N)
        offs_k = k0 + offs_c
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + rows0[None, :, None] + offs_k[None, None, :],
                    mask=(offs_m < M)[:, None, None], other=0.0).to(tl.float32)  # [BM, BN (equal), CHUNK]
        acc += w[None, :, :] * x
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_CONFIGS = [(4, 4), (8, 4), (8, 8), (16, 8)]  # (BLOCK_N, num_warps)


def _autotuned():
    configs = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in _CONFIGS]
    return autotune(_kquant_gemv_kernel, configs, ["N", "K", "KIND", "BLOCK_M"], bench(5, 20))


_tuned = None if INTERPRET else _autotuned()
INTERPRET_CONFIG = {"BLOCK_N": 4}


def gemv(x: torch.Tensor, qs: torch.Tensor, fmt: KQuantFormat, n_cols: int) -> torch.Tensor:
    """x [M <= 8, K] @ W^T for a k-quant weight of ``fmt`` stored as ``qs`` uint8 [N, K / 256 * block_bytes]. The
    kernel's KIND is the format's bits per code (one layout per k-quant)."""
    kind, block_bytes = fmt.bits, fmt.block_bytes
    M, K, block_m = gemv_rows(x.shape, n_cols)
    N = qs.shape[0]
    if K % QK_K or tuple(qs.shape) != (N, K // QK_K * block_bytes):
        raise ValueError(f"{fmt.name}: stored qs {tuple(qs.shape)} does not match {K} columns")
    qs = qs.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, qs, y, M, N, K, qs.shape[1], x.stride(0), y.stride(0))
    if _tuned is None:
        cfg = INTERPRET_CONFIG
        _kquant_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](*args, KIND=kind, BLOCK_BYTES=block_bytes,
                                                             BLOCK_M=block_m, **cfg, **FUSED)
    else:
        _tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, KIND=kind, BLOCK_BYTES=block_bytes,
                                                             BLOCK_M=block_m, **FUSED)
    return y


@triton.jit
def _kquant_dequant_kernel(qs_ptr, w_ptr, N, row_bytes, K, KIND: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Program (i, j): rows [i BLOCK_N, (i + 1) BLOCK_N) of superblock j, decoded by :func:`_kquant_chunk`."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (offs_n < N)[:, None]
    sb = tl.program_id(1)
    base = offs_n.to(tl.int64)[:, None] * row_bytes + sb * BLOCK_BYTES
    out = w_ptr + offs_n.to(tl.int64)[:, None] * K + sb * (4 * CHUNK) + tl.arange(0, CHUNK)[None, :]
    for qtr in tl.static_range(4):
        w = _kquant_chunk(qs_ptr, base, qtr, n_mask, KIND, BLOCK_N)
        tl.store(out + qtr * CHUNK, w.to(w_ptr.dtype.element_ty), mask=n_mask)


def dequantize(qs: torch.Tensor, fmt: KQuantFormat, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, n_cols] in ``dtype`` from its k-quant bytes ``qs``: ggml's float32 decode (as the GEMV's),
    rounded once. For batches past the GEMV's rows: this, then cuBLAS."""
    N = qs.shape[0]
    if n_cols % QK_K or tuple(qs.shape) != (N, n_cols // QK_K * fmt.block_bytes):
        raise ValueError(f"{fmt.name}: stored qs {tuple(qs.shape)} does not match {n_cols} columns")
    w = torch.empty(N, n_cols, device=qs.device, dtype=dtype)
    block_n = 4 if INTERPRET else 16
    _kquant_dequant_kernel[(triton.cdiv(N, block_n), n_cols // QK_K)](
        qs.contiguous(), w, N, qs.shape[1], n_cols, KIND=fmt.bits, BLOCK_BYTES=fmt.block_bytes, BLOCK_N=block_n,
        **EXACT)
    return w
