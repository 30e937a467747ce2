"""The packed matmul as a PyTorch custom op (``torch.ops.lowbit.qmatmul``), for code that torch.compile traces.

Dynamo cannot trace :func:`lowbit.kernels.dispatch.dequant_matmul` (environment reads, dict caches, Triton
autotuners): left alone, every QuantLinear would break the graph, and the norms, rotary embeddings and residual
adds between them would stay a thousand tiny kernels per token. As a custom op it is one opaque node with a shape
rule, so Inductor fuses everything around it, while the call itself runs exactly the eager kernels.
"""

from __future__ import annotations

import torch

from lowbit.formats import QuantizedTensor, get_format
from lowbit.kernels.dispatch import dequant_matmul, gated_matmul


@torch.library.custom_op("lowbit::qmatmul", mutates_args=())
def qmatmul(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
            tensors: list[torch.Tensor]) -> torch.Tensor:
    """y = x W^T for the packed weight whose storage tensors are ``tensors`` (named by the comma-joined ``keys``)."""
    qt = QuantizedTensor(format_name, (out_features, in_features), dict(zip(keys.split(","), tensors, strict=True)))
    return dequant_matmul(x, get_format(format_name), qt)


@qmatmul.register_fake
def _qmatmul_shape(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
                   tensors: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("lowbit::qmatmul_gated", mutates_args=())
def qmatmul_gated(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
                  tensors: list[torch.Tensor]) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for a fused [gate; up] packed weight of ``out_features`` rows (gated_matmul)."""
    qt = QuantizedTensor(format_name, (out_features, in_features), dict(zip(keys.split(","), tensors, strict=True)))
    return gated_matmul(x, get_format(format_name), qt)


@qmatmul_gated.register_fake
def _qmatmul_gated_shape(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
                         tensors: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features // 2)
