"""lowbit's decode attention as a transformers attention implementation (``"lowbit_decode"``).

:func:`use_decode_attention` registers it and switches a model that runs SDPA to it: one-token steps go to
:mod:`lowbit.kernels.triton_decode_attention` (which reads only the cache blocks the mask leaves visible), every
other call (prefill, unsupported shapes, dropout, soft-capping, sliding windows, CPU) to transformers' own SDPA
function, so the model computes the same function either way. The attention masks are SDPA's.

:func:`step_attention` goes further for a Llama-family attention whose q/k/v are one fused matmul: a one-token step
with a transformers static cache runs the rotary embedding, the cache write and the attention as one kernel
(:func:`lowbit.kernels.dispatch.rope_cache_attention`: CUDA on Hopper, Triton elsewhere) instead of transformers'
code around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from lowbit.kernels import ops
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


# attention modules whose one-token step is q/k/v, transformers' rotary embedding of the full head, a cache update
# and plain attention (sliding windows excepted: :func:`_windowed`)
STEP_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


def _windowed(attn: nn.Module) -> bool:
    """Whether ``attn`` passes a sliding window to its attention function (Qwen2 per layer, Mistral from its
    config); the fused step leaves those to transformers' code."""
    config_window = getattr(attn.config, "sliding_window", None) if type(attn).__name__ == "MistralAttention" else None
    return getattr(attn, "sliding_window", None) is not None or config_window is not None


def _static_layer(attn: nn.Module, cache: object, x: torch.Tensor) -> object | None:
    """The cache layer of ``attn`` if it is a filled transformers StaticLayer on x's device that counts its own
    length (transformers 5), else None."""
    layers = getattr(cache, "layers", None)
    idx = getattr(attn, "layer_idx", None)
    if layers is None or idx is None or idx >= len(layers):
        return None
    layer = layers[idx]
    length = getattr(layer, "cumulative_length", None)
    ok = (type(layer).__name__ == "StaticLayer" and getattr(layer, "is_initialized", False)
          and isinstance(length, torch.Tensor) and length.device == x.device and layer.keys.device == x.device)
    return layer if ok else None


def step_attention(attn: nn.Module, x: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                   kwargs: Mapping[str, object]) -> torch.Tensor | None:
    """The attention of a one-token step before ``o_proj``, [B, 1, H D], as one kernel: ``project(x)`` gives the
    fused q/k/v rows, then rotary embedding, static-cache write and attention (the module's own forward computes
    the same). None where that does not apply: another module or model setup, not a one-token step on a GPU, no
    filled static cache; the caller then runs the module."""
    if (type(attn).__name__ not in STEP_ATTENTIONS or attn.training
            or getattr(attn.config, "_attn_implementation", None) != NAME or _windowed(attn)
            or not triton_runs(x, "rope_attention")):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name changed in transformers 5.2x
    layer = _static_layer(attn, cache, x)
    cos, sin = kwargs.get("position_embeddings") or (None, None)
    # a causal step without padding (unmasked_steps) attends exactly the written positions and its own, which the
    # kernel bounds by the cache's length anyway: the mask is not read, and a compiled step does not build it
    mask = None if getattr(cache, _UNMASKED, False) else kwargs.get("attention_mask")
    heads = attn.config.num_attention_heads
    if (layer is None or cos is None or cos.shape[-1] != attn.head_dim or cos.shape[-2] != 1
            or not kernel.step_supported(x, layer.keys, heads, mask)):  # before projecting: the module would again
        return None
    out = ops.rope_cache_attention(project(x), cos, sin, layer.keys, layer.values, layer.cumulative_length, mask,
                                   attn.scaling, heads)
    deferred = getattr(cache, _DEFERRED, None)
    if deferred is None:
        layer.cumulative_length.add_(1)  # as StaticLayer.update
    else:
        deferred.append(layer.cumulative_length)
    return out


# The cache attribute that unmasked_steps sets: True while every step attends all that is written and itself.
_UNMASKED = "lowbit_unmasked_steps"


def unmasked_steps(cache: object, on: bool = True) -> None:
    """Declare (``on``) that the steps on ``cache`` until the next call are plain causal steps of sequences
    without padding (lowbit's StaticDecoder): the one-kernel attention then ignores the attention mask, since its
    cache length already bounds what it reads. In a compiled 7B step on an H200 the mask was one small kernel per
    layer (the model's causal mask, rebuilt by Inductor for each layer's attention; docs/kernels.md)."""
    setattr(cache, _UNMASKED, on)


# The cache attribute holding the lengths that advance_lengths moves on; None (or absent): each layer's step
# advances its own length at once.
_DEFERRED = "lowbit_deferred_lengths"


def defer_lengths(cache: object) -> None:
    """Until :func:`advance_lengths`, one-kernel steps on ``cache`` leave their layers' lengths to it: a decode
    step then advances them all in one kernel after its last layer, instead of one small kernel per layer between
    the attention and the o projection (~1 µs each in a compiled 7B step on an H200, docs/kernels.md). A layer's
    length is read only by its own attention, so the tokens are the same."""
    setattr(cache, _DEFERRED, [])


def advance_lengths(cache: object) -> None:
    """Advance by one the lengths of the layers stepped since :func:`defer_lengths`, and stop deferring."""
    deferred = getattr(cache, _DEFERRED, None)
    setattr(cache, _DEFERRED, None)
    if deferred:
        torch._foreach_add_(deferred, 1)
