"""Rotations folded into the weights (computational invariance, as in QuaRot / SpinQuant / SliceGPT).

For RMSNorm decoders (Llama, Mistral, Qwen2) the function the model computes does not change when

1. every RMSNorm scale ``g`` is multiplied into the linears that read the normalized vector
   (``W <- W diag(g)``, ``g <- 1``): q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``,
   the LM head after the final norm;
2. the residual stream is rotated by an orthogonal ``R`` (a seeded randomized Hadamard, ``rotations.hadamard``):
   ``h <- h R^T``. Embeddings rotate with it (``E <- E R^T``), linears reading the stream absorb ``R`` on their
   input side (``W <- W R^T``), linears writing to it (o_proj, down_proj) on their output side (``W <- R W``,
   ``b <- R b``). RMSNorm with unit scale commutes with ``R`` because it only divides by the vector's norm;
3. each attention head's values are rotated by a head_dim Hadamard ``Rh`` (``W_v <- Rh W_v`` per head) and o_proj
   undoes it on its input side (``W_o <- W_o Rh^T`` per head): attention mixes value vectors linearly, per head.

The result is an ordinary float model of the same architecture, so every format, algorithm and exporter works on
it unchanged, and a GGUF written from it runs in stock llama.cpp with no runtime change. What the rotation buys
is incoherence: q/k/v/gate/up/LM-head inputs and o_proj's input are rotated, so outlier features are spread
over all columns before rounding; o_proj/down_proj rows are mixed too. down_proj's input (the MLP's hidden
activations) is not rotated: that needs an online Hadamard at run time (QuaRot's), which llama.cpp does not run.

A model whose LM head is tied to its embeddings gets an untied head (the final norm's scale goes into the head
only), which costs one more vocab x hidden matrix in the file.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.models.walker import decoder_layers
from lowbit.rotations.hadamard import RandomizedHadamard

FUSABLE = ("llama", "mistral", "qwen2")
SEED_OFFSET = 7919  # keeps the residual rotation distinct from the per-linear +rht rotations of the same seed


@torch.no_grad()
def fuse_rotation(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fold norms and a randomized Hadamard rotation into ``model``'s float weights, in place; returns it."""
    cfg = model.config
    if cfg.model_type not in FUSABLE:
        raise UnsupportedModelError(f"fused rotation needs an RMSNorm decoder ({', '.join(FUSABLE)}); "
                                    f"{cfg.model_type!r} is not supported")
    if any(not isinstance(p, nn.Parameter) or not p.is_floating_point() for p in model.parameters()):
        raise UnsupportedModelError("fused rotation works on a float model, before quantization")
    untie_head(model)
    residual = RandomizedHadamard(cfg.hidden_size, seed + SEED_OFFSET)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_head = RandomizedHadamard(head_dim, seed + SEED_OFFSET + 1)
    inner = model.get_submodule("model")
    _set(inner.embed_tokens.weight, residual.apply(_f64(inner.embed_tokens.weight)))
    fold_layer_norms(model)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate_input(lin, residual)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_output(lin, residual)
        _rotate_heads_output(attn.v_proj, per_head, head_dim)
        _rotate_heads_input(attn.o_proj, per_head, head_dim)
    _fold_norm(inner.norm, [model.lm_head])
    _rotate_input(model.lm_head, residual)
    return model


@torch.no_grad()
def fold_layer_norms(model: nn.Module) -> nn.Module:
    """Multiply each decoder layer's RMSNorm scales into the linears that read the normalized vector (q/k/v, gate/up)
    and set the scales to 1, in place: the same function, the step every residual-stream rotation starts with. Alone
    it changes what rounding sees (``benchmarks/rotation_sides.py --fold-norms``)."""
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    return model


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own copy of a weight it shares with the input embeddings, and say so in the config."""
    head, embed = model.lm_head, model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = _f64(norm.weight)
    for lin in readers:
        _set(lin.weight, _f64(lin.weight) * g)
    norm.weight.fill_(1.0)


def _rotate_input(lin: nn.Linear, rot: RandomizedHadamard) -> None:
    _set(lin.weight, rot.apply(_f64(lin.weight)))  # W R^T


def _rotate_output(lin: nn.Linear, rot: RandomizedHadamard) -> None:
    _set(lin.weight, rot.apply(_f64(lin.weight).t()).t())  # R W
    if lin.bias is not None:
        _set(lin.bias, rot.apply(_f64(lin.bias)))


def _rotate_heads_output(lin: nn.Linear, rot: RandomizedHadamard, head_dim: int) -> None:
    w = _f64(lin.weight)  # [heads * head_dim, in]: per head Rh W_h
    heads = w.shape[0] // head_dim
    w = rot.apply(w.reshape(heads, head_dim, -1).transpose(1, 2)).transpose(1, 2).reshape(lin.weight.shape)
    _set(lin.weight, w)
    if lin.bias is not None:
        _set(lin.bias, rot.apply(_f64(lin.bias).reshape(heads, head_dim)).reshape(-1))


def _rotate_heads_input(lin: nn.Linear, rot: RandomizedHadamard, head_dim: int) -> None:
    w = _f64(lin.weight)  # [out, heads * head_dim]: per head W_h Rh^T
    _set(lin.weight, rot.apply(w.reshape(w.shape[0], -1, head_dim)).reshape(lin.weight.shape))
