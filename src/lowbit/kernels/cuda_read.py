"""Kernels that only read: how fast one call can stream a given number of bytes on this GPU, the yardstick for a
GEMV's time (``cuda/stream_read.cu``, ``benchmarks/gemv_speed.py --read-ceiling``), and how fast a decode step's
matrices stream one launch each or all in one persistent launch (``cuda/stream_phases.cu``,
``benchmarks/step_floor.py``).

    parts = stream_read(buf, unroll=4)   # buf: int32 [n * 4] on the GPU (or the CPU, emulated): XOR per warp
    assert int(xor_all(parts)) == int(xor_all(buf))
    bounds = torch.tensor([0, 100, 250], dtype=torch.int64)   # two matrices, in 16-byte units of buf
    parts = stream_phases(buf, bounds, blocks=4, barrier=True)   # both in one launch, a grid barrier between
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


def stream_phases(buf: torch.Tensor, bounds: torch.Tensor, blocks: int, first: int = 0, phases: int | None = None,
                  unroll: int = 4, barrier: bool = False, prefetch: int = 0, early: bool = False,
                  sync: torch.Tensor | None = None, per_sm: int = 1) -> torch.Tensor:
    """XOR of ``buf``'s units ``bounds[first] .. bounds[first + phases]`` (matrices back to back, ``bounds``: int64
    16-byte unit offsets on ``buf``'s device), read matrix by matrix by one launch of ``blocks`` blocks, per warp:
    int32 [blocks * 8]. ``barrier``: a grid barrier after each matrix (then every block must be resident at once:
    ``blocks`` at most ``per_sm`` per SM, the blocks the kernel's registers are capped for, and nothing else running;
    ``sync`` is the barrier's int32 [2] of zeros, which it leaves at zero arrivals); ``prefetch`` 1: the next
    matrix's first loads before it, 2: its first 8 units a thread copied into shared memory before it (and before
    an early launch's wait), 3: the block's share of it requested into L2 and the first loads, before it (and
    before the wait); ``early``: a programmatic dependent launch. Nothing is read back to the host,
    so a call can be captured in a CUDA graph."""
    if buf.dtype != torch.int32 or not buf.is_contiguous() or buf.numel() % 4:
        raise ValueError("stream_phases takes a contiguous int32 tensor of whole 16-byte units")
    if bounds.dtype != torch.int64 or bounds.dim() != 1 or bounds.device != buf.device:
        raise ValueError("bounds must be a 1-d int64 tensor on the buffer's device")
    phases = bounds.numel() - 1 - first if phases is None else phases
    if phases < 1 or first < 0 or first + phases >= bounds.numel():
        raise ValueError(f"phases {first} .. {first + phases} are not all in bounds of {bounds.numel() - 1}")
    if unroll not in UNROLLS:
        raise ValueError(f"unroll must be one of {UNROLLS}")
    if per_sm not in (1, 2, 4, 8) or (prefetch == 2 and per_sm == 8):
        raise ValueError("per_sm must be 1, 2, 4 or 8 (blocks of 256 threads; 4 at most with prefetch 2)")
    if prefetch not in (0, 1, 2, 3):
        raise ValueError("prefetch must be 0, 1, 2 or 3")
    if barrier and buf.is_cuda and not _all_resident(blocks, per_sm, prefetch, buf.device):
        raise ValueError(f"{blocks} blocks of stream_phases are not all resident at once on this GPU: its grid "
                         "barrier would wait forever")
    if barrier and sync is None:
        sync = torch.zeros(2, dtype=torch.int32, device=buf.device)
    out = torch.empty(blocks * 8, dtype=torch.int32, device=buf.device)
    kern = cuda_jit.kernel(_phases_source(unroll, barrier, prefetch, per_sm), "stream_phases", buf.device)
    kern((blocks, 1, 1), (256, 1, 1), [buf, bounds[first:], phases, out, out if sync is None else sync],
         early=early)
    return out


def _all_resident(blocks: int, per_sm: int, prefetch: int, device: torch.device) -> bool:
    """Whether ``blocks`` blocks fit on the GPU at once, ``per_sm`` an SM (the registers are capped for that many):
    by threads, and by shared memory where each block holds 32 KB of it (prefetch 2; and 1 KB the GPU keeps a
    block)."""
    props = torch.cuda.get_device_properties(device)
    smem = 33 * 1024 * per_sm if prefetch == 2 else 0
    return (blocks <= props.multi_processor_count * per_sm and 256 * per_sm <= props.max_threads_per_multi_processor
            and smem <= props.shared_memory_per_multiprocessor)


@cache
def _phases_source(unroll: int, barrier: bool, prefetch: int, per_sm: int) -> str:
    return cuda_jit.source("stream_phases.cu", f"#define UNROLL {unroll}\n#define BARRIER {int(barrier)}\n"
                                               f"#define PREFETCH {int(prefetch)}\n#define PER_SM {per_sm}\n")


def xor_all(t: torch.Tensor) -> torch.Tensor:
    """The XOR of every int32 of ``t`` (the reference)."""
    v = t.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    while v.numel() > 1:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[0::2] ^ v[1::2]
    return v.reshape(()) if v.numel() else torch.tensor(0)
