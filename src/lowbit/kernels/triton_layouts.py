"""Triton dequantize from the CUDA GEMV's kernel layouts, for a weight that keeps only its layout on the device.

The CUDA GEMV reads K-quant, IQ2_XXS and 3-, 5- and 6-bit grid weights from a layout built on the device
(:mod:`lowbit.kernels.cuda_gemv`: :func:`~lowbit.kernels.cuda_gemv.kquant_layout`,
:func:`~lowbit.kernels.cuda_gemv.iq2xxs_layout`, :func:`~lowbit.kernels.cuda_gemv.affine_layout`, which define the
layouts). Where a weight's stored bytes live in host memory and only the layout on the device
(:func:`lowbit.kernels.dispatch.hold_layout`), a prompt's dense weight is decoded from the layout here: the same
float32 operations, in the same order, as each format's reference decode (and the stored-bytes kernels), so the
weight is bit for bit :meth:`Format.dequantize`'s, rounded once to the activations' dtype.

Each program decodes a [BLOCK_N, BLOCK_K] tile: codes from the low-bit plane (packed as a 2- or 4-bit grid packs
its codes) and the high-bit plane (the .cu's ``magic_with_hi`` positions, :func:`_split_codes`),
then the format's scale: the grid's lut and stored scales (:func:`lowbit.kernels.triton_uniform._level`), the
K-quant's integer scales and fp16 ``(d, -dmin)`` word, or IQ2_XXS's grid row, sign byte and 4-bit scale.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from lowbit.kernels.cuda_gemv import hi_code_positions
from lowbit.kernels.launch import EXACT, INTERPRET
from lowbit.kernels.triton_uniform import _level


@triton.jit
def _row_words(ptr, n, n_mask, row_words, first, PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] of the words each covering ``PER`` consecutive columns, the tile's first column in word
    ``first`` of each row (rows ``n`` [BLOCK_N, 1] of ``row_words`` words): each word loaded once and repeated in
    registers (a load per column would issue PER times the instructions)."""
    w = first + tl.arange(0, BLOCK_K // PER)
    words = tl.load(ptr + n * row_words + w[None, :], mask=n_mask & (w < row_words)[None, :], other=0)
    return tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, BLOCK_K // PER, PER)), (BLOCK_N, BLOCK_K))


@triton.jit
def _split_codes(low_ptr, hi_ptr, hi_at_ptr, n, n_mask, k0, K, low_words, hi_words, LB: tl.constexpr,
                 HB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_K] (int32) of rows ``n`` [BLOCK_N, 1], columns k0 .. k0 + BLOCK_K: their low ``LB``
    bits from the low plane (int32 words of little-endian codes, each word loaded once and split in registers), the
    ``HB`` above them from the high plane (per 16-byte chunk of low codes, HB words: code c of the chunk at bit
    ``hi_at[c]`` of word c // (32 / HB), :func:`_hi_at`)."""
    PER: tl.constexpr = 32 // LB
    wi = k0 // PER + tl.arange(0, BLOCK_K // PER)
    words = tl.load(low_ptr + n * low_words + wi[None, :], mask=n_mask & (wi < low_words)[None, :], other=0)
    code = (words[:, :, None] >> (LB * tl.arange(0, PER))[None, None, :]) & ((1 << LB) - 1)
    code = tl.reshape(code, (BLOCK_N, BLOCK_K))
    if HB > 0:
        CHUNK: tl.constexpr = 128 // LB
        pos = tl.load(hi_at_ptr + (k0 + tl.arange(0, BLOCK_K)) % CHUNK)[None, :]
        # word c // (32 / HB) of the chunk's HB words is word k // (32 / HB) of the row (a chunk spans whole words)
        hi = _row_words(hi_ptr, n, n_mask, hi_words, k0 // (32 // HB), 32 // HB, BLOCK_N, BLOCK_K)
        code |= ((hi >> pos) & ((1 << HB) - 1)) << LB
    return code


@triton.jit
def _tile_coords(N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(rows [BLOCK_N, 1] int64, their mask, the tile's first column, columns [1, BLOCK_K], the tile's mask)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = (offs_n < N)[:, None]
    return offs_n.to(tl.int64)[:, None], n_mask, k0, offs_k[None, :], n_mask & (offs_k < K)[None, :]


@triton.jit
def _affine_kernel(low_ptr, hi_ptr, hi_at_ptr, scale_ptr, min_ptr, lut_ptr, w_ptr, N, K, low_words, hi_words,
                   n_groups, group, LB: tl.constexpr, HB: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    n, n_mask, k0, k, mask = _tile_coords(N, K, BLOCK_N, BLOCK_K)
    code = _split_codes(low_ptr, hi_ptr, hi_at_ptr, n, n_mask, k0, K, low_words, hi_words, LB, HB, BLOCK_N, BLOCK_K)
    w = _level(code, scale_ptr, min_ptr, lut_ptr, n, k, mask, n_groups, group, HAS_MIN)
    tl.store(w_ptr + n * K + k, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kquant_kernel(low_ptr, hi_ptr, hi_at_ptr, scales_ptr, dm_ptr, w_ptr, N, K, low_words, hi_words, LB: tl.constexpr,
                   HB: tl.constexpr, ASYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n, n_mask, k0, k, mask = _tile_coords(N, K, BLOCK_N, BLOCK_K)
    q = _split_codes(low_ptr, hi_ptr, hi_at_ptr, n, n_mask, k0, K, low_words, hi_words, LB, HB, BLOCK_N,
                     BLOCK_K).to(tl.float32)
    tl.static_assert(256 % BLOCK_K == 0)  # a tile inside one superblock: one (d, -dmin) word per row
    dm = tl.load(dm_ptr + n * (K // 256) + k0 // 256, mask=n_mask, other=0)  # fp16 d (low half), -dmin or d
    d = (dm & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if LB == 4 and ASYM:  # Q4_K, Q5_K: bytes (sc, mn) per 32 weights, read as one int16 (sc the low byte)
        pair = _row_words(scales_ptr, n, n_mask, K // 32, k0 // 32, 32, BLOCK_N, BLOCK_K).to(tl.int32)
        sc, mn = pair & 255, (pair >> 8) & 255
    else:  # a byte per 16 weights: Q2_K sc | mn << 4, Q3_K and Q6_K an int8 sc plus 128
        byte = _row_words(scales_ptr, n, n_mask, K // 16, k0 // 16, 16, BLOCK_N, BLOCK_K).to(tl.int32) & 255
        if ASYM:
            sc, mn = byte & 15, byte >> 4
        else:
            sc = byte - 128
    scale = d * sc.to(tl.float32)
    if ASYM:  # (d sc) q - (dmin mn), the minus as the sum of the stored -dmin's product (the same float)
        neg_dmin = (dm >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        w = scale * q + neg_dmin * mn.to(tl.float32)
    else:  # (d sc) (q - 2^(bits-1))
        w = scale * (q - (1 << (LB + HB - 1)))
    tl.store(w_ptr + n * K + k, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _iq2xxs_kernel(sub_ptr, d_ptr, ls_ptr, grid_ptr, w_ptr, N, K, n_super, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    n, n_mask, k0, k, mask = _tile_coords(N, K, BLOCK_N, BLOCK_K)
    s = k // 32  # sub-block: (grid indices, sign bytes) words 2 s and 2 s + 1
    c = (k % 32) // 8  # its code
    pair = _row_words(sub_ptr, n, n_mask, K // 32, k0 // 32, 32, BLOCK_N, BLOCK_K)  # both words as one int64
    aux0, signs = pair & 0xFFFFFFFF, (pair >> 32) & 0xFFFFFFFF
    tl.static_assert(256 % BLOCK_K == 0)  # a tile inside one superblock: one d and one scales word per row
    d = tl.load(d_ptr + n * n_super + k0 // 256, mask=n_mask, other=0.0).to(tl.float32)
    ls = (tl.load(ls_ptr + n * n_super + k0 // 256, mask=n_mask, other=0) >> (4 * (s % 8))) & 15
    db = d * (0.5 + ls.to(tl.float32)) * 0.25
    v = tl.load(grid_ptr + ((aux0 >> (8 * c)) & 255) * 8 + k % 8).to(tl.float32)
    wv = db * v
    neg = ((signs >> (8 * c + k % 8)) & 1) != 0
    tl.store(w_ptr + n * K + k, tl.where(neg, -wv, wv).to(w_ptr.dtype.element_ty), mask=mask)


# (rows, columns) a program decodes on a GPU; columns divide 256 (one superblock's words per row). 16 x 256 was the
# fastest of 16 x 128, 16 x 256 and 32 x 128 for Q4_K, Q6_K, IQ2_XXS and int3 on an H100 (docs/kernels.md).
TILE = (16, 256)


def _blocks() -> tuple[int, int]:
    return (4, 32) if INTERPRET else TILE


def _launch(kernel, rows: int, cols: int, *args, **consts) -> None:  # noqa: ANN001 - a Triton kernel
    block_n, block_k = _blocks()
    kernel[(triton.cdiv(rows, block_n), triton.cdiv(cols, block_k))](*args, BLOCK_N=block_n, BLOCK_K=block_k,
                                                                       **consts, **EXACT)


@cache
def _hi_at(low_bits: int, hi_bits: int, device: torch.device) -> torch.Tensor:
    """int32 [codes per 16-byte chunk] on ``device``, once per device: where code c of a chunk has its high bits in
    its hi word (:func:`~lowbit.kernels.cuda_gemv.hi_code_positions`); one zero when the codes have none."""
    if not hi_bits:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return hi_code_positions(low_bits, hi_bits).reshape(-1).to(device, torch.int32)


def _check(name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} {tuple(t.shape)} does not match the layout's weight (expected {shape})")


def affine(low: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, lut: torch.Tensor,
           low_bits: int, hi_bits: int, group: int, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A 3-, 5- or 6-bit grid's weight [N, n_cols] from :func:`~lowbit.kernels.cuda_gemv.affine_layout`'s planes
    and its stored scale (and min) [N, groups]: lut[code] * scale (+ min) in float32, rounded once."""
    N = low.shape[0]
    _check("low plane", low, (N, n_cols * low_bits // 32))
    _check("high plane", hi, (N, n_cols * hi_bits // 32))
    w = torch.empty(N, n_cols, device=low.device, dtype=dtype)
    _launch(_affine_kernel, N, n_cols, low, hi, _hi_at(low_bits, hi_bits, low.device), scale.contiguous(),
            (mins if mins is not None else scale).contiguous(),
            lut, w, N, n_cols, low.shape[1], hi.shape[1], scale.shape[1], group, LB=low_bits, HB=hi_bits,
            HAS_MIN=mins is not None)
    return w


def kquant(low: torch.Tensor, scales: torch.Tensor, dm: torch.Tensor, hi: torch.Tensor, low_bits: int,
           hi_bits: int, asym: bool, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A K-quant weight [N, n_cols] from :func:`~lowbit.kernels.cuda_gemv.kquant_layout`'s (codes, scales, dm, hi),
    as ggml's dequantize_row_q*_K computes it in float32, rounded once."""
    N = low.shape[0]
    _check("low plane", low, (N, n_cols * low_bits // 32))
    _check("dm", dm, (N, n_cols // 256))
    w = torch.empty(N, n_cols, device=low.device, dtype=dtype)
    pairs = low_bits == 4 and asym  # Q4_K, Q5_K: (sc, mn) bytes per 32 weights, read as int16
    _launch(_kquant_kernel, N, n_cols, low, hi, _hi_at(low_bits, hi_bits, low.device),
            scales.view(torch.int16 if pairs else torch.uint8), dm, w, N, n_cols,
            low.shape[1], hi.shape[1], LB=low_bits, HB=hi_bits, ASYM=asym)
    return w


def iq2xxs(sub: torch.Tensor, d: torch.Tensor, ls: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """An IQ2_XXS weight [N, n_cols] from :func:`~lowbit.kernels.cuda_gemv.iq2xxs_layout`'s (sub-blocks, d,
    sub-block scales), as ggml's dequantize_row_iq2_xxs computes it in float32, rounded once."""
    from lowbit.kernels.triton_iq2xxs import device_tables

    N = sub.shape[0]
    _check("sub-blocks", sub, (N, n_cols // 16))
    grid, _ = device_tables(sub.device)
    w = torch.empty(N, n_cols, device=sub.device, dtype=dtype)
    _launch(_iq2xxs_kernel, N, n_cols, sub.view(torch.int64), d, ls, grid, w, N, n_cols, d.shape[1])
    return w
