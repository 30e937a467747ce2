"""Triton kernels for the scalar grids' prompts: the dense weight (:func:`dequantize`, then cuBLAS), and
y = x W^T straight from the packed codes (:func:`dequant_matmul`).

Both cover every scalar format whose weight is ``lut[code] * scale (+ min)`` with dense little-endian bit packing
(formats/bitpack.py): uniform sym (lut = code - 2^(b-1)), asym (lut = code, plus min) and the 2-bit level sets
(lut = levels), any width 2..8, any group size including a shorter last group, decoded by one helper
(:func:`_tile`). :func:`dequantize` writes W in the activations' dtype, each value the reference's float32 one
rounded once; the dispatch multiplies it with cuBLAS for more than 8 rows. :func:`dequant_matmul` never
materializes W: each program dequantizes a [BLOCK_K, BLOCK_N] tile in registers and feeds tl.dot, autotuned over a
few tile shapes (keyed on N, K, the format constants and a power-of-two bucket of M, so a new prompt length does
not retune). It decodes the weights again for every block of rows, and on an H100 it took 2-17x as long as
dequantize + cuBLAS at 64-2048 rows (docs/kernels.md, "Prompt matmuls"); it serves prompts only with
``LOWBIT_DEQUANTIZE=0``.

A code may straddle two bytes (3, 5, 6, 7 bits), so two bytes are read and combined; 2-, 4- and 8-bit codes take
one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import EXACT, FUSED, INTERPRET, autotune, bench, check_input


@triton.jit
def _tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, n, k, mask, row_bytes, n_groups, group, BITS: tl.constexpr,
          HAS_MIN: tl.constexpr):
    """Weights W[n, k] in float32 for index arrays ``n`` and ``k`` that broadcast to the tile's shape (either
    orientation): lut[code] * scale (+ min), zero where not ``mask``."""
    bit = k * BITS
    byte = bit // 8
    row = codes_ptr + n * row_bytes
    b0 = tl.load(row + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # a code may straddle two bytes
        b0 |= tl.load(row + byte + 1, mask=mask & ((byte + 1) < row_bytes), other=0).to(tl.int32) << 8
    code = (b0 >> (bit % 8)) & ((1 << BITS) - 1)
    return _level(code, scale_ptr, min_ptr, lut_ptr, n, k, mask, n_groups, group, HAS_MIN)


@triton.jit
def _level(code, scale_ptr, min_ptr, lut_ptr, n, k, mask, n_groups, group, HAS_MIN: tl.constexpr):
    """lut[code] * scale (+ min) in float32, the scale (and min) of row ``n``'s group of column ``k``."""
    p_off = n * n_groups + k // group
    w = tl.load(lut_ptr + code) * tl.load(scale_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_MIN:
        w += tl.load(min_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _dequant_matmul_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, lut_ptr, y_ptr,
                           M, N, K, row_bytes, n_groups, group, stride_xm, stride_ym, m_bucket,
                           BITS: tl.constexpr, HAS_MIN: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, offs_n[None, :], offs_k[:, None],
                  k_mask[:, None] & n_mask[None, :], row_bytes, n_groups, group, BITS, HAS_MIN)  # [BK, BN]
        acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CONFIGS = [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4), (128, 64, 64, 4, 4)]


def _prune(configs, nargs, **kwargs):  # noqa: ANN001 - triton's prune hook
    bm_max = 16 if nargs["M"] <= 16 else 64 if nargs["M"] <= 64 else 128
    bm_min = 16 if nargs["M"] <= 64 else 64
    return [c for c in configs if bm_min <= c.kwargs["BLOCK_M"] <= bm_max] or configs[:1]


def _autotuned():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in _CONFIGS]
    return autotune(_dequant_matmul_kernel, configs, ["N", "K", "m_bucket", "BITS", "HAS_MIN"], bench(5, 25),
                    prune_configs_by={"early_config_prune": _prune})


_tuned = None if INTERPRET else _autotuned()


def dequant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                   lut: torch.Tensor, bits: int, group: int, n_cols: int) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ W^T, W [N, K] given as packed codes [N, row_bytes] + scale/min [N, groups]."""
    M, K = x.shape
    N = codes.shape[0]
    check_input(K, n_cols)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    m_bucket = min(1 << max(M - 1, 0).bit_length(), 4096)
    args = (x, codes, scale, mins if mins is not None else scale, lut, y,
            M, N, K, codes.shape[1], scale.shape[1], group, x.stride(0), y.stride(0), m_bucket)
    if _tuned is None:  # interpreter: one config
        block_m = 16 if M <= 16 else 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, 64))
        _dequant_matmul_kernel[grid](*args, BITS=bits, HAS_MIN=mins is not None, BLOCK_M=block_m, BLOCK_N=64,
                                     BLOCK_K=64, **FUSED)
    else:
        _tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args, BITS=bits, HAS_MIN=mins is not None, **FUSED)
    return y


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, min_ptr, lut_ptr, w_ptr, N, K, row_bytes, n_groups, group,
                       BITS: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): rows [i BLOCK_N, (i + 1) BLOCK_N), columns [j BLOCK_K, (j + 1) BLOCK_K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = _tile(codes_ptr, scale_ptr, min_ptr, lut_ptr, offs_n[:, None], offs_k[None, :], mask, row_bytes, n_groups,
              group, BITS, HAS_MIN)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, lut: torch.Tensor, bits: int,
               group: int, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, n_cols] in ``dtype``: the tile decode of :func:`dequant_matmul` written out (for cuBLAS)."""
    N = codes.shape[0]
    w = torch.empty(N, n_cols, device=codes.device, dtype=dtype)
    block_n, block_k = (4, 32) if INTERPRET else (16, 128)
    _dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(n_cols, block_k))](
        codes.contiguous(), scale.contiguous(), (mins if mins is not None else scale).contiguous(), lut, w, N, n_cols,
        codes.shape[1], scale.shape[1], group, BITS=bits, HAS_MIN=mins is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        **EXACT)
    return w
