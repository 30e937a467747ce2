"""Dense little-endian bit packing of small unsigned codes, row by row.

Codes of ``bits`` bits are laid out back to back within each row: code ``j`` of a row occupies bits
``[j*bits, (j+1)*bits)`` of that row's byte string (bit 0 = least significant bit of byte 0). Rows are
padded to a whole number of bytes, so any row can be sliced without touching its neighbours.
"""

from __future__ import annotations

import torch


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a [rows, cols] tensor of codes in ``[0, 2**bits)`` into uint8 [rows, packed_row_bytes]."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D tensor, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    # Eight codes of b bits fill exactly b bytes, so work on groups of 8 codes held in one int64.
    pad = (-cols) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(rows, -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)  # disjoint bit ranges, so sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, -1)
    return out[:, : packed_row_bytes(cols, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [rows, nbytes] -> uint8 codes [rows, cols]."""
    _check_bits(bits)
    rows = packed.shape[0]
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(f"packed row has {packed.shape[1]} bytes, expected {packed_row_bytes(cols, bits)}")
    if bits == 8:
        return packed.clone()
    groups = (cols + 7) // 8
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.shape[1])).view(rows, groups, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (p << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(rows, -1)[:, :cols].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
