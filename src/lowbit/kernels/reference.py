"""Plain torch references for the kernels: what every kernel must compute, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import Format, QuantizedTensor


def dequant_matmul_reference(x: torch.Tensor, fmt: Format, qt: QuantizedTensor) -> torch.Tensor:
    """y = x W^T with W the dequantized packed weight; x [..., in] -> y [..., out] in x's dtype."""
    return F.linear(x, fmt.dequantize(qt).to(x.dtype))
