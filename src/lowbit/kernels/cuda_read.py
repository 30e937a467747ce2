"""A kernel that only reads (``cuda/stream_read.cu``): how fast one call can stream a given number of bytes on this
GPU, the yardstick for a GEMV's time (``benchmarks/gemv_speed.py --read-ceiling``).

    parts = stream_read(buf, unroll=4)   # buf: int32 [n * 4] on the GPU (or the CPU, emulated): XOR per warp
    assert int(xor_all(parts)) == int(xor_all(buf))
"""

from __future__ import annotations

from functools import cache

import torch

from lowbit.kernels import cuda_jit

UNROLLS = (1, 2, 4, 8, 16)  # loads in flight per thread; the benchmark keeps the fastest


def stream_read(buf: torch.Tensor, unroll: int = 4) -> torch.Tensor:
    """XOR of ``buf``'s 16-byte units, per warp of the one-pass grid: int32 [blocks * 8]. ``buf``: contiguous int32,
    a multiple of 4 elements."""
    if buf.dtype != torch.int32 or not buf.is_contiguous() or buf.numel() % 4:
        raise ValueError("stream_read takes a contiguous int32 tensor of whole 16-byte units")
    if unroll not in UNROLLS:
        raise ValueError(f"unroll must be one of {UNROLLS}")
    units = buf.numel() // 4
    blocks = max(1, -(-units // (256 * unroll)))
    out = torch.empty(blocks * 8, dtype=torch.int32, device=buf.device)
    cuda_jit.kernel(_source(unroll), "stream_read", buf.device)((blocks, 1, 1), (256, 1, 1), [buf, units, out])
    return out


@cache
def _source(unroll: int) -> str:  # read from disk once, not at every call
    return cuda_jit.source("stream_read.cu", f"#define UNROLL {unroll}\n")


def xor_all(t: torch.Tensor) -> torch.Tensor:
    """The XOR of every int32 of ``t`` (the reference)."""
    v = t.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    while v.numel() > 1:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[0::2] ^ v[1::2]
    return v.reshape(()) if v.numel() else torch.tensor(0)
