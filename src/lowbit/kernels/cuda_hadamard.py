"""CUDA randomized Hadamard transforms for power-of-two rows of 512 to 8192 (``cuda/hadamard.cu``, NVRTC).

The same two calls as :mod:`triton_hadamard` (``rotate_stacked`` for transforms without a dense factor, and
``residual_norm``, a rotated layer's junction), with the butterflies scheduled by hand: 16 values per thread, four
stages in registers, five through warp shuffles and the rest after one pass through shared memory. In Triton the
stages are reshapes, splits and joins of the whole row: one transform of 4096 took ~2.2 µs in a decode step on an
H200 and a junction (two transforms and a norm) 4.5 µs, in the single program a row gets (docs/kernels.md).
fp16 and bf16 rows; float32 inside, rounded where the Triton kernels and the torch steps round. Until its GPU tests
have passed it is ``cuda_hadamard`` in :data:`lowbit.kernels.dispatch.GPU_UNVERIFIED`, and callers keep Triton's.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from functools import cache

import torch

from lowbit.kernels import cuda_jit
from lowbit.rotations.incoherence import device_signs

MIN_LOG, MAX_LOG = 9, 13  # 512 .. 8192: a block of n / 16 threads, n floats of shared memory
_DTYPES = (torch.float16, torch.bfloat16)


def serves(x: torch.Tensor, n: int) -> bool:
    """Whether the kernels take rows of ``n`` (a power of two in range) of x's dtype on x's device."""
    return (x.is_cuda and x.dtype in _DTYPES and n & (n - 1) == 0 and MIN_LOG <= n.bit_length() - 1 <= MAX_LOG
            and cuda_jit.available())


@cache
def _source(log_n: int, bf16: bool, inverse: bool) -> str:
    defines = f"#define LOG_N {log_n}\n#define BF16 {int(bf16)}\n#define INVERSE {int(inverse)}\n"
    return cuda_jit.source("hadamard.cu", defines)


def _kernel(name: str, n: int, x: torch.Tensor, inverse: bool = False) -> cuda_jit.Kernel:
    return cuda_jit.kernel(_source(n.bit_length() - 1, x.dtype == torch.bfloat16, inverse), name, x.device)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as contiguous rows of n, 16-byte aligned (the kernels load 16 values of a row at once)."""
    t = t.reshape(-1, n).contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def rotate_stacked(rots: Sequence, x: torch.Tensor, inverse: bool = False, pdl: bool = False) -> torch.Tensor:
    """As :func:`triton_hadamard.rotate_stacked` for rotations without a dense factor (m = 1): x [..., k n], slice
    j by ``rots[j]``, one launch."""
    n, k = rots[0].n, len(rots)
    if any((r.n, r.m) != (n, 1) for r in rots) or not serves(x, n) or x.shape[-1] != k * n:
        raise ValueError(f"cuda_hadamard takes {k} transforms of one power-of-two size in range over x's last "
                         f"dimension, got sizes {[(r.n, r.m) for r in rots]} for {tuple(x.shape)} {x.dtype}")
    xr = _rows(x, n)
    y = torch.empty_like(xr)
    if xr.shape[0]:
        args = [xr, device_signs(rots, x.device), y, k, ctypes.c_float(1.0 / math.sqrt(n))]
        _kernel("hadamard", n, x, inverse)((xr.shape[0], 1, 1), (n // 16, 1, 1), args, early=pdl)
    return y.reshape(x.shape)


def residual_norm(y: torch.Tensor, u, residual: torch.Tensor, weight: torch.Tensor, eps: float, v,  # noqa: ANN001
                  pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`triton_hadamard.residual_norm`: (h, x), h = residual + y U, x = rms_norm(h, weight, eps) V^T."""
    n = y.shape[-1]
    if any((r.n, r.m) != (n, 1) for r in (u, v)) or not serves(y, n) or residual.shape != y.shape \
            or weight.shape != (n,):
        raise ValueError(f"cuda_hadamard.residual_norm takes rows of a power-of-two size in range and two "
                         f"transforms of that size, got {tuple(y.shape)} {y.dtype}, {[(r.n, r.m) for r in (u, v)]}")
    y2, r2 = _rows(y, n), _rows(residual.to(y.dtype), n)
    h, x = torch.empty_like(y2), torch.empty_like(y2)
    if y2.shape[0]:
        _kernel("residual_norm", n, y)((y2.shape[0], 1, 1), (n // 16, 1, 1),
                                       [y2, r2, weight.to(y.dtype).contiguous(), device_signs([u], y.device),
                                        device_signs([v], y.device), h, x, ctypes.c_float(eps),
                                        ctypes.c_float(1.0 / math.sqrt(n))], early=pdl)
    return h.reshape(y.shape), x.reshape(y.shape)
