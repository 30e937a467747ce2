"""QuantLinear: a drop-in replacement for nn.Linear holding a packed weight.

The reference forward dequantizes the whole weight and calls F.linear; fast kernels can replace that
without changing what is stored. Packed buffers keep their own dtypes through ``.to(dtype)`` so a model can
be cast for compute without touching the storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QuantizedTensor, get_format


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, format_name: str, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format_name = format_name
        self.fmt = get_format(format_name)
        self._keys = []
        for key, (shape, dtype) in self.fmt.storage_spec((out_features, in_features)).items():
            self.register_buffer(key, torch.zeros(shape, dtype=dtype, device=device))
            self._keys.append(key)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = qt.shape
        dev = next(iter(qt.data.values())).device
        m = cls(in_f, out_f, qt.format, bias=bias is not None, device=dev)
        for key in m._keys:
            getattr(m, key).copy_(qt.data[key])
        if bias is not None:
            m.bias.data = bias.detach().clone().float()
        return m

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.format_name, (self.out_features, self.in_features),
                               {k: getattr(self, k) for k in self._keys})

    def dequantize(self) -> torch.Tensor:
        return self.fmt.dequantize(self.quantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - signature from nn.Module
        dtypes = {k: getattr(self, k).dtype for k in self._keys}
        super()._apply(fn, recurse)
        for k, dt in dtypes.items():
            if getattr(self, k).dtype != dt:
                setattr(self, k, getattr(self, k).to(dt))
        return self

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, format={self.format_name}, bias={has_bias}"
