"""Triton GEMV for llama.cpp's k-quants (``q2_k`` .. ``q6_k``): y = x W^T for M = 1..8, straight from ggml's bytes.

The weight is the format's ``qs`` uint8 [rows, superblocks * block_bytes]: each row exactly llama.cpp's
``block_q*_K`` array (:mod:`lowbit.formats.kquants` documents every layout). Each program owns BLOCK_N rows and
walks them 64 weights at a time (a quarter superblock): for each weight it gathers the bytes that hold its code
(the low bits, and Q3_K's / Q5_K's / Q6_K's high bits) and its sub-block's integer scale (and min), forms
``(d sc) q - (dmin mn)`` or ``(d sc) (q - 2^(bits-1))`` in float32 with the products in ggml's order
(``dequantize_row_q*_K``, and :meth:`KQuantFormat.decode`), and accumulates the products with x elementwise in
float32, reduced once at the end. The byte gathers repeat within a warp and are served by L1. Larger batches go
through the reference (dequantize, then cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import INTERPRET, autotune, bench, gemv_rows

CHUNK = 64  # weights per step: a quarter superblock
# ggml's type per format name and its block bytes (kquants.*Format.fields)
KINDS = {"q2_k": (2, 84), "q3_k": (3, 110), "q4_k": (4, 144), "q5_k": (5, 176), "q6_k": (6, 210)}


@triton.jit
def _byte(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(ptr, offs, mask):
    """The little-endian fp16 at byte ``offs``, as float32."""
    bits = _byte(ptr, offs, mask) | (_byte(ptr, offs + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kquant_weights(qs_ptr, base, i, mask, KIND: tl.constexpr):
    """Weights [BLOCK_N, CHUNK] of the superblocks at byte ``base`` [BLOCK_N, 1], weight ``i`` [1, CHUNK] of each
    (0..255), as ggml's dequantize_row_q*_K computes them in float32."""
    m = i % 32
    if KIND == 2:  # scales[16] (sc | mn << 4), qs[64], d, dmin
        q = (_byte(qs_ptr, base + 16 + 32 * (i // 128) + m, mask) >> (2 * ((i % 128) // 32))) & 3
        s = _byte(qs_ptr, base + i // 16, mask)
        scale = _half(qs_ptr, base + 80, mask) * (s & 15).to(tl.float32)
        w = scale * q.to(tl.float32) - _half(qs_ptr, base + 82, mask) * (s >> 4).to(tl.float32)
    elif KIND == 3:  # hmask[32], qs[64], scales[12] (6-bit sc + 32), d
        lo = (_byte(qs_ptr, base + 32 + 32 * (i // 128) + m, mask) >> (2 * ((i % 128) // 32))) & 3
        hi = (_byte(qs_ptr, base + m, mask) >> (i // 32)) & 1
        sub = i // 16
        s_lo = (_byte(qs_ptr, base + 96 + sub % 8, mask) >> (4 * (sub // 8))) & 15
        s_hi = (_byte(qs_ptr, base + 104 + sub % 4, mask) >> (2 * (sub // 4))) & 3
        scale = _half(qs_ptr, base + 108, mask) * ((s_lo | (s_hi << 4)) - 32).to(tl.float32)
        w = scale * ((lo | (hi << 2)) - 4).to(tl.float32)
    elif KIND == 6:  # ql[128], qh[64], int8 scales[16], d
        r = i % 128
        lo = (_byte(qs_ptr, base + 64 * (i // 128) + 32 * ((r // 32) % 2) + m, mask) >> (4 * (r // 64))) & 15
        hi = (_byte(qs_ptr, base + 128 + 32 * (i // 128) + m, mask) >> (2 * (r // 32))) & 3
        sc = _byte(qs_ptr, base + 192 + i // 16, mask)
        sc = tl.where(sc >= 128, sc - 256, sc)
        scale = _half(qs_ptr, base + 208, mask) * sc.to(tl.float32)
        w = scale * ((lo | (hi << 4)) - 32).to(tl.float32)
    else:  # Q4_K, Q5_K: d, dmin, scales[12] (get_scale_min_k4), [qh[32]], qs[128]
        QS: tl.constexpr = 16 if KIND == 4 else 48
        q = (_byte(qs_ptr, base + QS + 32 * (i // 64) + m, mask) >> (4 * ((i // 32) % 2))) & 15
        if KIND == 5:
            q = q | (((_byte(qs_ptr, base + 16 + m, mask) >> (i // 32)) & 1) << 4)
        j = i // 32  # sub-block: bytes j and j + 4 (j < 4), else j + 4, j - 4 and j
        a = _byte(qs_ptr, base + 4 + j, mask)
        b = _byte(qs_ptr, base + 8 + j, mask)
        c = _byte(qs_ptr, base + 4 + tl.where(j < 4, j, j - 4), mask)
        sc = tl.where(j < 4, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(j < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
        scale = _half(qs_ptr, base, mask) * sc.to(tl.float32)
        w = scale * q.to(tl.float32) - _half(qs_ptr, base + 2, mask) * mn.to(tl.float32)
    return w


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
        w = _kquant_weights(qs_ptr, base, (k0 % 256 + offs_c)[None, :], n_mask, KIND)
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


def gemv(x: torch.Tensor, qs: torch.Tensor, name: str, n_cols: int) -> torch.Tensor:
    """x [M <= 8, K] @ W^T for a k-quant weight ``name`` stored as ``qs`` uint8 [N, K / 256 * block_bytes]."""
    kind, block_bytes = KINDS[name]
    M, K, block_m = gemv_rows(x.shape, n_cols)
    N = qs.shape[0]
    if K % 256 or tuple(qs.shape) != (N, K // 256 * block_bytes):
        raise ValueError(f"{name}: stored qs {tuple(qs.shape)} does not match {K} columns")
    qs = qs.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, qs, y, M, N, K, qs.shape[1], x.stride(0), y.stride(0))
    if _tuned is None:
        cfg = INTERPRET_CONFIG
        _kquant_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](*args, KIND=kind, BLOCK_BYTES=block_bytes,
                                                             BLOCK_M=block_m, **cfg)
    else:
        _tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, KIND=kind, BLOCK_BYTES=block_bytes,
                                                             BLOCK_M=block_m)
    return y
