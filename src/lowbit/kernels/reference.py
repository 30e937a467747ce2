"""Plain torch references for the kernels: what every kernel must compute, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import Format, QuantizedTensor, UniformFormat

_LUTS: dict[tuple, torch.Tensor] = {}


def decode_lut(fmt: UniformFormat, device: torch.device) -> torch.Tensor:
    """lut[code] such that w = lut[code] * scale (+ min): the format's own decode at unit scale, zero min."""
    key = (fmt.name, str(device))
    if key not in _LUTS:
        codes = torch.arange(1 << fmt.bits, dtype=torch.int64).unsqueeze(0)
        params = {"scale": torch.ones(1, 1)} | ({} if fmt.symmetric else {"min": torch.zeros(1, 1)})
        _LUTS[key] = fmt.decode(codes, params)[0].float().contiguous().to(device)
    return _LUTS[key]


def dequant_matmul_reference(x: torch.Tensor, fmt: Format, qt: QuantizedTensor) -> torch.Tensor:
    """y = x W^T with W the dequantized packed weight; x [..., in] -> y [..., out] in x's dtype."""
    return F.linear(x, fmt.dequantize(qt).to(x.dtype))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (Mistral's and Qwen2's are the same): the fp32 mean of squares, ``x * rsqrt(. +
    eps)`` rounded to x's dtype, times the weight. The CUDA GEMV's ``norm`` prologue computes this."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
