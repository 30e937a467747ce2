"""A decoder layer's RMSNorms and residual adds run inside its packed matmuls.

A Llama-family layer computes ``h = h + o(attn(norm1(h)))`` then ``h = h + down(mlp(norm2(h)))``. In a compiled
decode step the two norms and two adds between the matmuls are kernels of their own (on an H200, ~2 µs each, 64 of
them per 7B step), although at batch 1 the GEMV that follows a norm stages its input row anyway and the GEMV
before an add holds the sums the add needs. :func:`fold_norms` moves them there: the fused q/k/v and gate/up
groups (:mod:`lowbit.models.fused_linears`) normalize their common input in their prologue, and o and down add
the residual in their epilogue (:meth:`QuantLinear.project`; the CUDA GEMV's ``NORM`` and ``RESID``). Every other
path (prefill, CPU, the reference kernels) computes the same norms and adds around the matmuls, as the layer did.
TG-128 of the 7B shape on an H200 went from 617.9 to 661.4 tok/s (nz2_ch) and 420.2 to 433.8 (q4_0): 131 µs of
norm kernels gone per step, 43 µs more in the GEMVs (docs/kernels.md).

What changes while a layer is folded: its ``forward`` is :func:`_folded_forward`; its norms return their input (the
groups apply them), and its attention returns the attention output before ``o_proj`` (the layer applies ``o_proj``
with the residual); on a one-token GPU step with a static cache the layer skips the attention module and runs its
rotary embedding, cache write and attention as one kernel (``attention``, on by default:
:func:`lowbit.models.decode_attention.step_attention`). The layer as a whole computes what it did; its submodules
called on their own do not. :func:`unfold_norms` restores them. Folded: the decoder layers of :data:`LAYERS` whose
norms are :data:`NORMS`, whose MLP is SiLU-gated, whose q/k/v and gate/up are fused groups and whose o and down
projections are QuantLinears without bias, input rounding or weight cache, in a transformers whose decoder layers
return a tensor. Where the groups are rotated (``+rht``) each norm runs before its group's input side (one kernel
with it where one runs: :func:`lowbit.kernels.dispatch.norm_rotated`), and where gate/up is not gated (rotated on
both sides, or a vector format: :func:`lowbit.models.fused_linears.gate_mlp`) the SiLU product follows its matmul
(together with down's input side in one kernel where down is rotated:
:func:`lowbit.kernels.dispatch.silu_mul_rotated`); o and down add the residual inside their matmuls where they have
no output side (lowbit rotates input sides only); such layers still get the one-kernel attention step and none of
transformers' per-layer mask, rotary and cache kernels. Where every matmul of a layer is rotated on both sides
(checkpoints written before), each junction of an output side, residual add, norm and the next input side is one
kernel (:func:`lowbit.kernels.dispatch.residual_norm_rotated`), and a layer's last junction computes the next
rotated layer's q/k/v input: e8p_ch+rht at the 7B shape went from 375.3 to 392.3 tok/s on an H200
(docs/kernel-measurements.md).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.kernels.dispatch import residual_norm_rotated, rotate_input, rotate_output, rotate_outputs, silu_mul_rotated
from lowbit.models.decode_attention import step_attention
from lowbit.models.fused_linears import FusedGroup, has_silu
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import DECODER_LAYERS, decoder_layers

# transformers' decoder layers of the form h += o(attn(norm1(h))); h += down(mlp(norm2(h))), and their RMSNorms
# (fp32 mean of squares, rounded to the input's dtype, times the weight: kernels.reference.rms_norm_reference)
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _norm(module: nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)


def _passthrough(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class _Fold:
    """What a folded layer's forward relies on: these norms, projections and fused groups, as they were folded."""

    norms: tuple[nn.Module, nn.Module]
    o_proj: QuantLinear
    down_proj: QuantLinear
    qkv: FusedGroup
    gate: FusedGroup
    attention: bool = True  # one-token steps through models.decode_attention.step_attention where it applies
    rotated: bool = False  # every matmul rotated on both sides: the rest of the layer is _rotated_rest
    next: FusedGroup | None = None  # the next layer's q/k/v when both are rotated: its input is computed here


def _fold_of(layer: nn.Module) -> _Fold | None:
    return getattr(layer, "_lowbit_fold", None)


def _group_of(m: nn.Module) -> FusedGroup | None:
    fused = getattr(m, "_fused", None)
    return fused[0] if fused else None


def _holds(layer: nn.Module, f: _Fold) -> bool:
    """Whether ``layer`` still has the modules and groups it was folded with (a linear replaced, e.g. by quantizing
    again, or a group released or detached, breaks the fold)."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.o_proj is f.o_proj and mlp.down_proj is f.down_proj
            and (layer.input_layernorm, layer.post_attention_layernorm) == f.norms
            and _group_of(attn.q_proj) is f.qkv and _group_of(mlp.gate_proj) is f.gate
            and f.qkv.whole() and f.gate.whole())


def _folded_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The layer's forward with its norms in the q/k/v and gate/up matmuls and its residual adds in o and down; the
    class's forward (the layer unfolded first) where the fold no longer holds."""
    f = _fold_of(self)
    if not torch.compiler.is_compiling() and not _holds(self, f):
        _unfold(self, f)
        return self.forward(hidden_states, **kwargs)
    attn = step_attention(self.self_attn, hidden_states, f.qkv.outputs, kwargs) if f.attention else None
    if attn is None:
        attn = self.self_attn(hidden_states=hidden_states, **kwargs)[0]  # before o_proj (see the module docstring)
    if f.rotated:
        return _rotated_rest(f, attn, hidden_states)
    h = f.o_proj.project(attn, residual=hidden_states)
    if f.gate.mlp is not None:  # silu(gate) * up in the GEMV's epilogue
        act = f.gate.gated(h)
    elif f.down_proj._v is not None and f.gate.sizes[0] == f.gate.sizes[1]:
        # a rotated down: the SiLU product and down's input side in one kernel where one runs
        act = silu_mul_rotated(f.gate.outputs(h), f.down_proj._v)
        return f.down_proj.project(act, residual=h, rotated=True)
    else:  # vector-format groups: the product after the matmul (one fused kernel when compiled)
        gate, up = f.gate.outputs(h).split(f.gate.sizes, dim=-1)
        act = self.mlp.act_fn(gate) * up
    return f.down_proj.project(act, residual=h)


def _rotated_rest(f: _Fold, attn: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The rest of a layer whose matmuls are all rotated, from the attention output on. Each junction of an output
    side, residual add, norm and the next input side is one kernel where one runs (:func:`residual_norm_rotated`),
    and the last one computes the next layer's q/k/v input too when that layer is rotated
    (:meth:`FusedGroup.prepare`); gate/up's output sides stay a step of their own, the SiLU product and down's
    input side one more (:func:`silu_mul_rotated`)."""
    o, down, gate = f.o_proj, f.down_proj, f.gate
    y = o.matmul(rotate_input(o._v, attn))
    h, x = residual_norm_rotated(y, o._u, hidden_states, gate.norm, gate.members[0]._v)
    y = down.matmul(silu_mul_rotated(rotate_outputs([m._u for m in gate.members], gate.linear.matmul(x)), down._v))
    nxt = f.next
    if nxt is None or nxt.norm is None:  # the last layer (or the next one unfolded)
        return h + rotate_output(down._u, y)
    out, x = residual_norm_rotated(y, down._u, h, nxt.norm, nxt.members[0]._v)
    nxt.prepare(out, x)
    return out


def _all_rotated(qkv: FusedGroup, gate: FusedGroup, o: QuantLinear, down: QuantLinear) -> bool:
    """Whether every matmul of the layer is rotated on both sides (as checkpoints written before lowbit dropped the
    output sides are), gate/up's output sides undone together and no bias in gate/up (what :func:`_rotated_rest`
    computes)."""
    return (qkv.rotated and gate.stacked_out and len(gate.members) == 2
            and all(m._u is not None and m._v is not None and m.bias is None for m in (o, down, *gate.members)))


def _returns_tensor(layer: nn.Module) -> bool:
    ret = inspect.signature(type(layer).forward).return_annotation
    return ret is torch.Tensor or ret in ("torch.Tensor", "Tensor")


def _plain(m: object) -> bool:
    return (isinstance(m, QuantLinear) and m.bias is None and m.input_quant is None and not m.weight_cached
            and m._fused is None)


def _group(m: object, names: list[object]) -> FusedGroup | None:
    """The fused group of ``m`` whose members are ``names`` (``m`` first), else None."""
    group = _group_of(m) if isinstance(m, QuantLinear) else None
    return group if group is not None and group.members == names else None


def _fold_for(layer: nn.Module) -> _Fold | None:
    """The fold of ``layer`` if it can be folded (see the module docstring), else None."""
    if type(layer).__name__ not in LAYERS or not _returns_tensor(layer):
        return None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    if attn is None or mlp is None or any(type(n).__name__ not in NORMS for n in norms):
        return None
    qkv = _group(getattr(attn, "q_proj", None), [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")])
    gate = _group(getattr(mlp, "gate_proj", None), [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)])
    o, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
    if qkv is None or gate is None or gate.mlp not in (mlp, None) or not has_silu(mlp):
        return None
    if not _plain(o) or not _plain(down):
        return None
    return _Fold(norms, o, down, qkv, gate, rotated=_all_rotated(qkv, gate, o, down))


def foldable(layer: nn.Module) -> bool:
    """Whether :func:`fold_norms` folds ``layer`` (see the module docstring)."""
    return _fold_of(layer) is None and _fold_for(layer) is not None


def _layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a model the walker knows, else none."""
    known = getattr(getattr(model, "config", None), "model_type", None) in DECODER_LAYERS
    return list(decoder_layers(model)) if known else []


def fold_norms(model: nn.Module, attention: bool = True) -> int:
    """Fold the norms and residual adds of every :func:`foldable` decoder layer of ``model`` into its matmuls
    (after :func:`lowbit.models.fused_linears.fuse_siblings`; a layer whose fold no longer holds is folded anew);
    returns how many layers were folded. ``attention``: a folded layer's one-token steps run their rotary embedding,
    cache write and attention as one kernel where :func:`lowbit.models.decode_attention.step_attention` applies
    (set on layers folded before too)."""
    n = 0
    for layer in _layers(model):
        old = _fold_of(layer)
        if old is not None and not _holds(layer, old):
            _unfold(layer, old)
        elif old is not None:
            layer._lowbit_fold = replace(old, attention=attention)
        f = _fold_for(layer) if _fold_of(layer) is None else None
        if f is None:
            continue
        f = replace(f, attention=attention)
        f.qkv.norm, f.gate.norm = _norm(f.norms[0]), _norm(f.norms[1])
        for m in (*f.norms, f.o_proj):
            m.forward = types.MethodType(_passthrough, m)
        layer.forward = types.MethodType(_folded_forward, layer)
        layer._lowbit_fold = f
        n += 1
    _link(_layers(model))
    return n


def _link(layers: list[nn.Module]) -> None:
    """Each folded rotated layer computes the next one's q/k/v input where that layer is folded and rotated too."""
    for layer, after in zip(layers, layers[1:] + [None], strict=True):
        f = _fold_of(layer)
        if f is not None:
            g = _fold_of(after) if after is not None else None
            layer._lowbit_fold = replace(f, next=g.qkv if g is not None and f.rotated and g.rotated else None)


def _unfold(layer: nn.Module, f: _Fold) -> None:
    for m in (*f.norms, f.o_proj, layer):
        m.__dict__.pop("forward", None)
    f.qkv.norm = f.gate.norm = None
    f.qkv._prepared = None
    del layer._lowbit_fold


def folded_layers(model: nn.Module) -> int:
    """How many decoder layers of ``model`` are folded now."""
    return sum(_fold_of(layer) is not None for layer in _layers(model))


def unfold_norms(model: nn.Module) -> int:
    """Undo :func:`fold_norms`; returns how many layers were restored."""
    folded = [(layer, f) for layer in _layers(model) if (f := _fold_of(layer)) is not None]
    for layer, f in folded:
        _unfold(layer, f)
    return len(folded)
