"""Pick the kernel for a packed weight: Triton where it runs (CUDA, or the Triton interpreter when asked),
the torch reference everywhere else. ``LOWBIT_KERNELS=reference`` forces the reference; ``=triton`` forces the
Triton path (on CPU that needs ``TRITON_INTERPRET=1``, which is how the CPU tests check the kernel)."""

from __future__ import annotations

import os
from functools import cache

import torch

from lowbit.formats import Format, QuantizedTensor, UniformFormat
from lowbit.kernels.reference import dequant_matmul_reference


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(x: torch.Tensor, fmt: Format) -> bool:
    mode = os.environ.get("LOWBIT_KERNELS", "auto")
    if mode == "reference" or not isinstance(fmt, UniformFormat) or not triton_available():
        return False
    return mode == "triton" or x.is_cuda


_LUTS: dict[tuple, torch.Tensor] = {}


def decode_lut(fmt: UniformFormat, device: torch.device) -> torch.Tensor:
    """lut[code] such that w = lut[code] * scale (+ min): the format's own decode at unit scale, zero min."""
    key = (fmt.name, str(device))
    if key not in _LUTS:
        codes = torch.arange(1 << fmt.bits, dtype=torch.int64).unsqueeze(0)
        params = {"scale": torch.ones(1, 1)} | ({} if fmt.symmetric else {"min": torch.zeros(1, 1)})
        _LUTS[key] = fmt.decode(codes, params)[0].float().contiguous().to(device)
    return _LUTS[key]


def dequant_matmul(x: torch.Tensor, fmt: Format, qt: QuantizedTensor) -> torch.Tensor:
    """y = x W^T for a packed weight; x [..., in] -> [..., out]."""
    if not _use_triton(x, fmt):
        return dequant_matmul_reference(x, fmt, qt)
    from lowbit.kernels.triton_uniform import dequant_matmul as kernel

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    mins = qt.data.get("min")
    y = kernel(x2, qt.data["codes"], qt.data["scale"], mins, decode_lut(fmt, x.device), fmt.bits,
               fmt.group_cols(qt.shape[1]), qt.shape[1])
    return y.reshape(*lead, qt.shape[0])
