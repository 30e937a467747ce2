"""Triton GEMV for llama.cpp's IQ2_XXS (``iq2_xxs``): y = x W^T for M = 1..8, straight from the stored bytes.

The weight is the format's ``qs`` [rows, row_bytes] (llama.cpp ``block_iq2_xxs`` superblocks: fp16 ``d`` + 8
sub-blocks of 8 bytes; a row that is not a multiple of 256 ends in a shorter superblock with fewer sub-blocks).
Every field sits at an even byte offset (66-byte superblocks, even row lengths), so the kernel reads ``qs`` as
int16: sub-block ``s`` of a row is the 4 words at ``33 (s // 8) + 1 + 4 (s % 8)`` (two words of grid indices,
two of ``aux32[1]``), its superblock's ``d`` the word at ``33 (s // 8)``.

Each program owns BLOCK_N rows and walks the row BLOCK_S sub-blocks (32 weights each) at a time: it gathers the
4 grid rows (8 values each) from the 256 x 8 ``iq2xxs_grid`` (float16 on the device, exact: 8 / 25 / 43), expands
the 7-bit sign indices through ``ksigns_iq2xs`` (the tables are :func:`lowbit.formats.iq2xxs.tables`), and forms
``(d * (0.5 + ls) * 0.25) * grid``, negated where the sign bit is set: the float32 operations, in the order, of
ggml's ``dequantize_row_iq2_xxs`` (and of :meth:`IQ2XXSFormat.decode`). Products with x accumulate elementwise in
float32 and are reduced once at the end. Larger batches (a prompt) take :func:`dequantize`, the same decode
written out as a dense weight for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import EXACT, FUSED, INTERPRET, autotune, bench, gemv_rows


@triton.jit
def _iq2xxs_tile(qs_ptr, grid_ptr, ksigns_ptr, row_base, n_mask, s0, n_sub, BLOCK_N: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """Weights [BLOCK_N, BLOCK_S * 32] in float32: sub-blocks [s0, s0 + BLOCK_S) of the rows whose int16 words
    start at ``row_base`` [BLOCK_N] (zero past the row's end or ``n_mask``)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    smask = n_mask[:, None] & (offs_s < n_sub)[None, :]  # [BN, BS]
    word = (offs_s // 8) * 33 + 1 + (offs_s % 8) * 4
    ptr = qs_ptr + row_base[:, None] + word[None, :]  # [BN, BS]
    w0 = tl.load(ptr, mask=smask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFFFF
    w1 = tl.load(ptr + 1, mask=smask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFFFF
    w2 = tl.load(ptr + 2, mask=smask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFFFF
    w3 = tl.load(ptr + 3, mask=smask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFFFF
    dbits = tl.load(qs_ptr + row_base[:, None] + ((offs_s // 8) * 33)[None, :], mask=smask, other=0)
    d = dbits.to(tl.float16, bitcast=True).to(tl.float32)
    ls = (w3 >> 12) & 15  # bits 28..31 of aux32[1]
    db = d * (0.5 + ls.to(tl.float32)) * 0.25  # [BN, BS]
    # the 4 groups of 8: grid index = byte k of aux32[0], sign index = bits 7k..7k+6 of aux32[1]
    k4 = tl.arange(0, 4)
    aux0 = w0[:, :, None] | (w1[:, :, None] << 16)  # [BN, BS, 1]
    aux1 = w2[:, :, None] | (w3[:, :, None] << 16)
    gidx = (aux0 >> (k4[None, None, :] * 8)) & 255  # [BN, BS, 4]
    sidx = (aux1 >> (k4[None, None, :] * 7)) & 127
    j8 = tl.arange(0, 8)
    vals = tl.load(grid_ptr + gidx[:, :, :, None] * 8 + j8[None, None, None, :]).to(tl.float32)
    sbyte = tl.load(ksigns_ptr + sidx)  # [BN, BS, 4]
    neg = ((sbyte[:, :, :, None] >> j8[None, None, None, :]) & 1) != 0  # [BN, BS, 4, 8]
    wv = db[:, :, None, None] * vals
    wv = tl.where(neg, -wv, wv)
    return tl.reshape(wv, (BLOCK_N, BLOCK_S * 32))


@triton.jit
def _iq2xxs_gemv_kernel(x_ptr, qs_ptr, grid_ptr, ksigns_ptr, y_ptr, M, N, K, n_sub, row_words, stride_xm,
                        stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        UNROLL: tl.constexpr):
    BLOCK_K: tl.constexpr = BLOCK_S * 32
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    rows0 = tl.zeros((BLOCK_N,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_base = offs_n.to(tl.int64) * row_words
    for s0 in tl.range(0, n_sub, BLOCK_S, loop_unroll_factor=UNROLL):
        wv = _iq2xxs_tile(qs_ptr, grid_ptr, ksigns_ptr, row_base, n_mask, s0, n_sub, BLOCK_N, BLOCK_S)
        offs_k = s0 * 32 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + rows0[None, :, None] + offs_k[None, None, :],
                    mask=(offs_m < M)[:, None, None] & (offs_k < K)[None, None, :], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)  # [BM, BN (equal), BK]
        acc += wv[None, :, :] * x
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_mask[None, :])


# (BLOCK_N, BLOCK_S, num_warps, UNROLL): BLOCK_N * BLOCK_S * 32 weights per step
_CONFIGS = [(2, 4, 4, 2), (4, 2, 4, 2), (4, 4, 4, 1), (8, 2, 4, 1), (4, 4, 8, 1)]


def _autotuned():
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_S": bs, "UNROLL": u}, num_warps=w) for bn, bs, w, u in _CONFIGS]
    return autotune(_iq2xxs_gemv_kernel, configs, ["N", "K", "BLOCK_M"], bench(5, 20))


_tuned = None if INTERPRET else _autotuned()
INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_S": 2, "UNROLL": 1}
_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid as float16 [256 * 8], ksigns as int32 [128]) on ``device`` (cached; from the format module)."""
    key = str(device)
    if key not in _TABLES:
        from lowbit.formats.iq2xxs import tables

        grid, ksigns = tables()
        _TABLES[key] = (grid.to(torch.float16).reshape(-1).contiguous().to(device),
                        ksigns.to(torch.int32).contiguous().to(device))
    return _TABLES[key]


def gemv(x: torch.Tensor, qs: torch.Tensor, n_cols: int) -> torch.Tensor:
    """x [M <= 8, K] @ W^T for an IQ2_XXS weight stored as ``qs`` uint8 [N, row_bytes(K)]."""
    from lowbit.formats.iq2xxs import row_bytes

    M, K, block_m = gemv_rows(x.shape, n_cols)
    N = qs.shape[0]
    rb = row_bytes(K)
    if tuple(qs.shape) != (N, rb):
        raise ValueError(f"iq2_xxs: stored qs {tuple(qs.shape)} does not match {K} columns")
    words = qs.contiguous().view(torch.int16)  # every field is at an even offset; rows are an even length
    grid, ksigns = device_tables(x.device)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    args = (x, words, grid, ksigns, y, M, N, K, K // 32, rb // 2, x.stride(0), y.stride(0))
    if _tuned is None:
        cfg = INTERPRET_CONFIG
        _iq2xxs_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](*args, BLOCK_M=block_m, **cfg, **FUSED)
    else:
        _tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, BLOCK_M=block_m, **FUSED)
    return y


@triton.jit
def _iq2xxs_dequant_kernel(qs_ptr, grid_ptr, ksigns_ptr, w_ptr, N, K, n_sub, row_words, BLOCK_N: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    """Program (i, j): rows [i BLOCK_N, (i + 1) BLOCK_N), sub-blocks [j BLOCK_S, (j + 1) BLOCK_S)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s0 = tl.program_id(1) * BLOCK_S
    w = _iq2xxs_tile(qs_ptr, grid_ptr, ksigns_ptr, offs_n.to(tl.int64) * row_words, n_mask, s0, n_sub, BLOCK_N,
                     BLOCK_S)
    offs_k = s0 * 32 + tl.arange(0, BLOCK_S * 32)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])


def dequantize(qs: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, n_cols] in ``dtype`` from its IQ2_XXS bytes ``qs``: ggml's float32 decode (as the GEMV's),
    rounded once. For batches past the GEMV's rows: this, then cuBLAS."""
    from lowbit.formats.iq2xxs import row_bytes

    N, rb = qs.shape[0], row_bytes(n_cols)
    if tuple(qs.shape) != (N, rb):
        raise ValueError(f"iq2_xxs: stored qs {tuple(qs.shape)} does not match {n_cols} columns")
    grid, ksigns = device_tables(qs.device)
    w = torch.empty(N, n_cols, device=qs.device, dtype=dtype)
    block_n, block_s = (4, 2) if INTERPRET else (16, 8)
    _iq2xxs_dequant_kernel[(triton.cdiv(N, block_n), triton.cdiv(n_cols // 32, block_s))](
        qs.contiguous().view(torch.int16), grid, ksigns, w, N, n_cols, n_cols // 32, rb // 2, BLOCK_N=block_n,
        BLOCK_S=block_s, **EXACT)
    return w
