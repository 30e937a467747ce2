"""Simulated low-bit activations and KV cache (fake quantization), to measure settings such as W2A4/KV4.

What is simulated, exactly:

* **Activations (A-bits)**: the input of every decoder linear is rounded, per token, to a symmetric signed grid of
  ``act_bits`` bits (levels -2^(b-1)+1 .. 2^(b-1)-1 times absmax/(2^(b-1)-1), optionally clipped to a fraction of
  the absmax), then the matmul runs in floating point. For a :class:`QuantLinear` with incoherence processing the
  rounding happens *after* its online input rotation V x, i.e. on the rotated activations a rotated-W4A4 kernel
  would see (QuaRot). Embeddings, norms, attention scores and the LM head stay in 16/32-bit.
* **KV cache (KV-bits)**: keys (after RoPE) and values are rounded per token and per head (one group = one head's
  ``head_dim`` values) to an asymmetric ``kv_bits`` grid (scale + min), before attention. With ``kv_rotate``
  (default), each head vector is first multiplied by an orthonormal Hadamard matrix and rotated back after
  rounding: q.k is unchanged by a rotation applied to both, so this equals rounding rotated keys against rotated
  queries, as a fused kernel would. Queries and the softmax stay in floating point.

Nothing is faster or smaller: this measures the *accuracy* a real low-bit kernel would have, nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_layers, decoder_linears
from lowbit.rotations.hadamard import hadamard_matrix

ATTN_NAME = "lowbit_sim"


@dataclass(frozen=True)
class SimConfig:
    act_bits: int | None = None
    kv_bits: int | None = None
    kv_rotate: bool = True
    act_clip: float = 1.0  # fraction of the per-token absmax mapped to the largest level

    def __post_init__(self) -> None:
        for name in ("act_bits", "kv_bits"):
            b = getattr(self, name)
            if b is not None and not 2 <= b <= 8:
                raise LowbitError(f"{name} must be between 2 and 8, got {b}")
        if not 0.0 < self.act_clip <= 1.0:
            raise LowbitError(f"act_clip must be in (0, 1], got {self.act_clip}")

    @property
    def active(self) -> bool:
        return self.act_bits is not None or self.kv_bits is not None

    def label(self) -> str:
        parts = [f"a{self.act_bits}" if self.act_bits else "", f"kv{self.kv_bits}" if self.kv_bits else ""]
        return "+".join(p for p in parts if p)


def fake_quant_per_token(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric round-to-nearest over the last dimension (one scale per token)."""
    qmax = (1 << (bits - 1)) - 1
    scale = (x.detach().abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def fake_quant_asym(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric (scale + min) round-to-nearest over the last dimension."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo


def fake_quant_kv(x: torch.Tensor, bits: int, rotate: bool) -> torch.Tensor:
    """Per token and head: [batch, heads, seq, head_dim] -> rounded to ``bits`` (optionally in a Hadamard basis)."""
    if not rotate:
        return fake_quant_asym(x, bits)
    h = _head_hadamard(x.shape[-1], x.device, x.dtype)
    return fake_quant_asym(x @ h, bits) @ h.T


_HEAD_HADAMARDS: dict[tuple, torch.Tensor] = {}


def _head_hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (n, str(device), dtype)
    if key not in _HEAD_HADAMARDS:
        _HEAD_HADAMARDS[key] = (hadamard_matrix(n) / n**0.5).to(device=device, dtype=dtype)
    return _HEAD_HADAMARDS[key]


def _sim_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN202
    """An attention implementation that rounds K and V, then defers to PyTorch SDPA (as ``sdpa`` does)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg: SimConfig | None = getattr(module, "lowbit_sim", None)
    if cfg is not None and cfg.kv_bits is not None:
        key = fake_quant_kv(key, cfg.kv_bits, cfg.kv_rotate)
        value = fake_quant_kv(value, cfg.kv_bits, cfg.kv_rotate)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_NAME, _sim_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Per decoder layer, the module that calls the attention interface (its class name ends in Attention)."""
    found = []
    for layer in decoder_layers(model):
        mods = [m for m in layer.modules() if type(m).__name__.endswith("Attention")]
        if not mods:
            raise LowbitError(f"no attention module found in {type(layer).__name__}; KV simulation unsupported")
        found.append(mods[0])
    return found


def _act_pre_hook(quant):  # noqa: ANN001, ANN202
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (quant(args[0]), *args[1:])
    return hook


def simulate(model: nn.Module, cfg: SimConfig) -> nn.Module:
    """Switch ``model`` (in place) to simulated low-bit activations / KV cache; returns the model.

    Activation rounding is installed on every decoder linear (after the online rotation of a QuantLinear);
    KV rounding through a registered attention implementation that wraps SDPA.
    """
    if cfg.act_bits is not None:
        quant = functools.partial(fake_quant_per_token, bits=cfg.act_bits, clip=cfg.act_clip)
        for module in decoder_linears(model).values():
            if isinstance(module, QuantLinear):
                module.input_quant = quant  # after the online rotation, inside forward
            else:
                module.register_forward_pre_hook(_act_pre_hook(quant))
    if cfg.kv_bits is not None:
        _register_attention()
        for attn in _attention_modules(model):
            attn.lowbit_sim = cfg
        model.set_attn_implementation(ATTN_NAME)
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            raise LowbitError(f"{type(model).__name__} does not accept a custom attention; KV simulation unsupported")
    return model
