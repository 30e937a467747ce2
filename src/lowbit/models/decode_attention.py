"""lowbit's decode attention as a transformers attention implementation (``"lowbit_decode"``).

:func:`use_decode_attention` registers it and switches a model that runs SDPA to it: one-token steps go to
:mod:`lowbit.kernels.triton_decode_attention` (which reads only the cache blocks the mask leaves visible), every
other call (prefill, unsupported shapes, dropout, soft-capping, sliding windows, CPU) to transformers' own SDPA
function, so the model computes the same function either way. The attention masks are SDPA's.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import triton_decode_attention as kernel
from lowbit.kernels.dispatch import triton_runs

NAME = "lowbit_decode"


def lowbit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, Hkv, S, D] -> [B, T, H, D]."""
    plain = dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
    if plain and triton_runs(query, "decode_attention") and kernel.supported(query, key, attention_mask):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernel.decode_attention(query, key, value, attention_mask, scale).transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Make ``"lowbit_decode"`` a name transformers knows, with SDPA's masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, lowbit_attention)
    AttentionMaskInterface.register(NAME, AttentionMaskInterface._global_mapping["sdpa"])


def use_decode_attention(model: nn.Module) -> bool:
    """Switch ``model`` from SDPA to ``"lowbit_decode"``; True when it now runs it. Models on another attention
    implementation (eager, flash, a user's choice) are left alone."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
