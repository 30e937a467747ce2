"""The packed matmul (``torch.ops.lowbit.qmatmul``) and the one-kernel attention step as PyTorch custom ops, for
code that torch.compile traces.

Dynamo cannot trace :func:`lowbit.kernels.dispatch.dequant_matmul` (environment reads, dict caches, Triton
autotuners): left alone, every QuantLinear would break the graph, and the norms, rotary embeddings and residual
adds between them would stay a thousand tiny kernels per token. As a custom op it is one opaque node with a shape
rule, so Inductor fuses everything around it, while the call itself runs exactly the eager kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.formats import QuantizedTensor, get_format
from lowbit.kernels import dispatch
from lowbit.kernels.dispatch import dequant_matmul, gated_matmul


def _packed_matmul_op(name: str, matmul: Callable, out_rows: Callable[[int], int]):  # noqa: ANN202 - a custom op
    """``lowbit::name(x, format_name, out_features, in_features, keys, tensors, norm_weight, eps, residual)``:
    ``matmul`` of ``x`` and the packed weight whose storage tensors are ``tensors`` (named by the comma-joined
    ``keys``), with ``x`` first RMS-normalized by (``norm_weight``, ``eps``) when a weight is given and
    ``residual`` added when given (:func:`lowbit.kernels.dispatch.dequant_matmul`)."""

    @torch.library.custom_op(f"lowbit::{name}", mutates_args=())
    def op(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
           tensors: list[torch.Tensor], norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None) -> torch.Tensor:
        data = dict(zip(keys.split(","), tensors, strict=True))
        qt = QuantizedTensor(format_name, (out_features, in_features), data)
        extra = {"norm": None if norm_weight is None else (norm_weight, eps)}
        if residual is not None:
            extra["residual"] = residual
        return matmul(x, get_format(format_name), qt, **extra)

    @op.register_fake
    def _shape(x: torch.Tensor, format_name: str, out_features: int, in_features: int, keys: str,
               tensors: list[torch.Tensor], norm_weight: torch.Tensor | None = None, eps: float = 0.0,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_rows(out_features))

    return op


# y = x W^T (residual + x W^T; x RMS-normalized first)
qmatmul = _packed_matmul_op("qmatmul", dequant_matmul, lambda rows: rows)
# silu(x gate^T) * (x up^T) for a fused [gate; up] weight (dispatch.gated_matmul; no residual)
qmatmul_gated = _packed_matmul_op("qmatmul_gated", gated_matmul, lambda rows: rows // 2)


@torch.library.custom_op("lowbit::rope_cache_attention", mutates_args=("k_cache", "v_cache"))
def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None, scale: float,
                         heads: int) -> torch.Tensor:
    """:func:`lowbit.kernels.dispatch.rope_cache_attention` (the CUDA kernel on Hopper, else the Triton one). An
    opaque op that declares the caches it writes: Inductor passes them in place (traced as a user Triton kernel, its
    mutation analysis gave up on the kernel and Inductor cloned and copied back its inputs, two extra kernels per
    layer)."""
    return dispatch.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, length, mask, scale, heads)


@rope_cache_attention.register_fake
def _attention_shape(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     heads: int) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], 1, heads * k_cache.shape[-1])
