"""Triton GEMV for QuIP#'s E8P codebook format (``e8p_ch``, ``e8p_g{N}``): y = x W^T for M = 1..8.

Each 16-bit code stands for 8 consecutive weights; the kernel gathers the code's 8 values (one 16-byte vector
load) from the full codebook kept on the device as float16 (exact: every value is a multiple of 1/4 below 3; it
stays L2-resident across calls), multiplies by the row's (group's) fp16 scale and reduces against the activations
in float32. Codes are read in their stored order (:func:`lowbit.formats.e8p.to_stored`): a code of a whole
8-code chunk is its pattern byte and its slot of a sign word, which index rows [0, 65536) of the table (the
codebook reordered by :func:`lowbit.formats.e8p.codes_of_slots`); a code past the row's last whole chunk is stored
as itself and indexes rows [65536, 131072), the codebook as it is. Same structure as :mod:`triton_gemv`: each
program owns BLOCK_N rows and walks K, one code per thread per step, elementwise accumulators reduced once at the
end. Larger batches (a prompt) take :func:`dequantize`, the same decode written out as a dense weight for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import EXACT, FUSED, INTERPRET, autotune, bench, gemv_rows


@triton.jit
def _stored_index(codes_ptr, row_start, c, whole, mask):
    """The table row of code c of a row (int16 elements from row_start): pattern << 8 | slot in a whole chunk
    (e8p.to_stored: the pattern in byte c % 4 of word c % 8 // 4, bit j of the slot at bit 4 j + c % 4 of word
    2 + c % 8 // 4), 65536 + the code past the last one."""
    chunk, q = c // 8, c % 8
    r = q % 4
    base = row_start + chunk * 8
    head = mask & (c < whole)
    pair = tl.load(codes_ptr + base + 2 * (q // 4) + r // 2, mask=head, other=0,
                   eviction_policy="evict_first").to(tl.int32) & 0xFFFF
    lo = tl.load(codes_ptr + base + 4 + 2 * (q // 4), mask=head, other=0).to(tl.int32) & 0xFFFF
    hi = tl.load(codes_ptr + base + 5 + 2 * (q // 4), mask=head, other=0).to(tl.int32) & 0xFFFF
    y = (lo | (hi << 16)) >> r  # int32: the arithmetic shift's high bits are masked off below
    slot = ((y & 1) | ((y >> 3) & 2) | ((y >> 6) & 4) | ((y >> 9) & 8) | ((y >> 12) & 16) | ((y >> 15) & 32)
            | ((y >> 18) & 64) | ((y >> 21) & 128))
    stored = (((pair >> (8 * (r % 2))) & 255) << 8) | slot
    tail = tl.load(codes_ptr + row_start + c, mask=mask & (c >= whole), other=0).to(tl.int32) & 0xFFFF
    return tl.where(c < whole, stored, 65536 + tail)


@triton.jit
def _e8p_tile(codes_ptr, scale_ptr, table_ptr, offs_n, n_mask, c0, n_codes, whole, n_groups, group,
              GROUP_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Weights [BLOCK_N, BLOCK_W * 8] in float32: codes [c0, c0 + BLOCK_W) of rows ``offs_n``, each the table's 8
    values times its group's scale (zero past the row's end or ``n_mask``)."""
    offs_c = c0 + tl.arange(0, BLOCK_W)
    cmask = n_mask[:, None] & (offs_c < n_codes)[None, :]
    code = _stored_index(codes_ptr, offs_n[:, None] * n_codes, offs_c[None, :], whole, cmask)
    if GROUP_SHIFT >= 0:
        g = (offs_c * 8) >> GROUP_SHIFT
    else:
        g = (offs_c * 8) // group
    s = tl.load(scale_ptr + offs_n[:, None] * n_groups + g[None, :], mask=cmask, other=0.0).to(tl.float32)
    vals = tl.load(table_ptr + code[:, :, None] * 8 + tl.arange(0, 8)[None, None, :])  # [BN, BW, 8] fp16
    return tl.reshape(vals.to(tl.float32) * s[:, :, None], (BLOCK_N, BLOCK_W * 8))


@triton.jit
def _e8p_gemv_kernel(x_ptr, codes_ptr, scale_ptr, table_ptr, y_ptr, M, N, K, n_codes, whole, n_groups, group,
                     stride_xm, stride_ym, GROUP_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr):
    BLOCK_K: tl.constexpr = BLOCK_W * 8
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows0 = tl.zeros((BLOCK_N,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=UNROLL):
        w = _e8p_tile(codes_ptr, scale_ptr, table_ptr, offs_n, n_mask, k0 // 8, n_codes, whole, n_groups, group,
                      GROUP_SHIFT, BLOCK_N, BLOCK_W)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + rows0[None, :, None] + offs_k[None, None, :],
                    mask=(offs_m < M)[:, None, None] & (offs_k < K)[None, None, :], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)  # [BM, BN (equal), BK]
        acc += w[None, :, :] * x
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_mask[None, :])


# (BLOCK_N, num_warps, UNROLL): BLOCK_W = 32 * num_warps / BLOCK_N codes per row per step (one per thread)
_CONFIGS = [(2, 4, 4), (4, 4, 4), (8, 4, 4), (4, 8, 2)]


def _autotuned():
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_W": 32 * w // bn, "UNROLL": u}, num_warps=w)
               for bn, w, u in _CONFIGS]
    return autotune(_e8p_gemv_kernel, configs, ["N", "K", "BLOCK_M", "GROUP_SHIFT"], bench(5, 20))


_tuned = None if INTERPRET else _autotuned()
INTERPRET_CONFIG = {"BLOCK_N": 4, "BLOCK_W": 4, "UNROLL": 1}
_TABLES: dict[str, torch.Tensor] = {}


def codebook_table(device: torch.device) -> torch.Tensor:
    """float16 [131072, 8] on ``device`` (cached): the E8P codebook by stored index (pattern << 8 | slot), then by
    code."""
    key = str(device)
    if key not in _TABLES:
        from lowbit.formats.e8p import codebook, codes_of_slots

        book = codebook()
        table = torch.cat([book[codes_of_slots(torch.arange(1 << 16))], book])
        _TABLES[key] = table.to(torch.float16).contiguous().to(device)
    return _TABLES[key]


def gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group: int, n_cols: int) -> torch.Tensor:
    """x [M <= 8, K] @ W^T for an E8P weight: codes int16 [N, K / 8] in their stored order, scale fp16
    [N, groups]."""
    M, K, block_m = gemv_rows(x.shape, n_cols)
    N = codes.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    shift = _group_shift(group, K)
    n_codes = codes.shape[1]
    args = (x, codes, scale, codebook_table(x.device), y, M, N, K, n_codes, n_codes - n_codes % 8, scale.shape[1],
            group, x.stride(0), y.stride(0))
    if _tuned is None:
        cfg = INTERPRET_CONFIG
        _e8p_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](*args, GROUP_SHIFT=shift, BLOCK_M=block_m, **cfg,
                                                           **FUSED)
    else:
        _tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, GROUP_SHIFT=shift, BLOCK_M=block_m, **FUSED)
    return y


def _group_shift(group: int, n_cols: int) -> int:
    """GROUP_SHIFT: log2 of a power-of-two group (30 for one group per row), -1 for a division."""
    return 30 if group >= n_cols else group.bit_length() - 1 if group & (group - 1) == 0 else -1


@triton.jit
def _e8p_dequant_kernel(codes_ptr, scale_ptr, table_ptr, w_ptr, N, K, n_codes, whole, n_groups, group,
                        GROUP_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (i, j): rows [i BLOCK_N, (i + 1) BLOCK_N), codes [j BLOCK_W, (j + 1) BLOCK_W)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    c0 = tl.program_id(1) * BLOCK_W
    w = _e8p_tile(codes_ptr, scale_ptr, table_ptr, offs_n, n_mask, c0, n_codes, whole, n_groups, group, GROUP_SHIFT,
                  BLOCK_N, BLOCK_W)
    offs_k = c0 * 8 + tl.arange(0, BLOCK_W * 8)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group: int, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, n_cols] in ``dtype`` from its E8P codes (stored order) and scales: codebook value times
    scale in float32 (as the GEMV's), rounded once. For batches past the GEMV's rows: this, then cuBLAS."""
    N, n_codes = codes.shape
    if n_codes * 8 != n_cols:
        raise ValueError(f"e8p: {n_codes} codes per row do not make {n_cols} columns")
    w = torch.empty(N, n_cols, device=codes.device, dtype=dtype)
    block_n, block_w = (4, 4) if INTERPRET else (16, 32)
    _e8p_dequant_kernel[(triton.cdiv(N, block_n), triton.cdiv(n_codes, block_w))](
        codes.contiguous(), scale.contiguous(), codebook_table(codes.device), w, N, n_cols, n_codes,
        n_codes - n_codes % 8, scale.shape[1], group, GROUP_SHIFT=_group_shift(group, n_cols), BLOCK_N=block_n,
        BLOCK_W=block_w, **EXACT)
    return w
