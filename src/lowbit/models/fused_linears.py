"""Sibling linears that read the same input, run as one packed matmul.

An attention block's q/k/v projections read the same normalized hidden state, and so do an MLP's gate and up
projections. At batch 1 each is a short GEMV whose fixed cost (launch, ramp-up, the tail of the last wave) is a
large part of its time: on an H200 a 2-bit 4096x4096 GEMV takes about half the time of a 14336x4096 one with 3.5x
the bytes. :func:`fuse_siblings` concatenates the siblings' packed rows into one weight (packed formats store
rows independently, so these are the same bytes) and the first sibling called computes every sibling's output in
one matmul; the others return their slice of it.

What stays as it was: each member keeps its buffers, now views into the fused ones, so ``state_dict``, saving and
the weights' memory are unchanged, and an in-place change of a member's codes is a change of the fused weight.
A member whose buffers no longer share the fused storage (``.to()`` to another device or dtype, a reassigned
buffer) falls back to its own matmul. :func:`unfuse_siblings` gives every member its own storage again.

Fused: QuantLinears of one format and input size, without input rounding or weight cache, whose stored tensors all
have one row per output feature, and either unrotated or sharing their input-side rotation (``+rht`` siblings
quantized by lowbit do: :func:`input_key`). Rotated members: the input is rotated once (the first member's
transform), the members' output-side rotations are undone together in one launch when they share a size (each on
its own slice otherwise), and each member adds its bias (:meth:`QuantLinear.finish`).
Under ``torch.compile`` the first member (q_proj, gate_proj: the one the architectures listed in ``SIBLINGS`` call
first) computes the group and the others read its result; a call order that differs just computes the group more
than once.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lowbit.formats import QuantizedTensor
from lowbit.kernels.dispatch import norm_rotated, rotate_outputs
from lowbit.kernels.reference import rms_norm_reference
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import DECODER_LAYERS, decoder_layers
from lowbit.rotations.incoherence import Rotation

# per decoder layer: groups of linears that read the same input, first-called first
SIBLINGS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


# MLPs whose forward is down(silu(gate(x)) * up(x)) (transformers' Llama, Mistral, Qwen2/3): with gate/up fused
# (unrotated, no biases) the MLP runs one GEMV with silu(gate) * up in its epilogue, one kernel fewer per layer
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def input_key(name: str) -> str:
    """The full name of the first sibling that reads the same input as the linear ``name`` (``...q_proj`` for
    ``...k_proj`` and ``...v_proj``, ``...gate_proj`` for ``...up_proj``), else ``name``: the key under which
    siblings share their input-side rotation (:meth:`Rotation.for_layer`), which keeps rotated siblings fusable."""
    for group in SIBLINGS:
        for member in group:
            if name == member or name.endswith("." + member):
                return name[: len(name) - len(member)] + group[0]
    return name


def layer_rotation(name: str, seed: int, output_side: bool = False) -> Rotation:
    """The ``+rht`` rotation lowbit gives the linear ``name``: the input side of its siblings (:func:`input_key`),
    so every quantizer draws the same transforms and rotated siblings stay fusable, and no output side.

    An output side (``output_side=True``, what checkpoints written before carry, and they keep it) mixes a weight's
    rows, which its per-row and per-group scales make nearly moot, and costs a transform after every matmul at
    decode time. On the bundled model (gptq+rht:e8p_ch, ``lowbit compare --device cpu``, docs/formats.md) input
    sides alone gave a lower perplexity than both sides in each of four draws of the transforms (KL lower in three;
    mean KL 1.190 against 1.230), and so did gptq+rht:nz2_ch in the one draw measured (KL 1.405 against 1.524)."""
    return Rotation.for_layer(name, seed, out_side=output_side, input_key=input_key(name))


class FusedGroup:
    """The fused weight of some QuantLinears and the last input it was applied to (not a module: the members own
    the storage, so the group adds nothing to ``state_dict``)."""

    def __init__(self, members: list[QuantLinear]):
        first = members[0]
        rows = sum(m.out_features for m in members)
        data = {k: torch.cat([getattr(m, k) for m in members]) for k in first._keys}
        # rotated members: the shared input-side rotation is applied here with the first member's transform (the
        # one place_rotations may have moved to the GPU), and each member finishes its own slice
        self.rotated = any(m.rotation is not None for m in members)
        bias = None
        if not self.rotated and any(m.bias is not None for m in members):  # members without one add zeros
            like = next(m.bias for m in members if m.bias is not None)
            bias = torch.cat([m.bias.detach() if m.bias is not None else like.new_zeros(m.out_features)
                              for m in members])
        self.linear = QuantLinear.from_quantized(QuantizedTensor(first.format_name, (rows, first.in_features), data),
                                                 bias=bias)
        self.sizes = [m.out_features for m in members]
        self.members = members
        for i, m in enumerate(members):
            m._fused = (self, i)
        self._point_members()
        # members' output sides of one size and split are undone together, in one launch (else each on its slice)
        self.stacked_out = (self.rotated and len(members) > 1 and all(m._u is not None for m in members)
                            and len({(m._u.n, m._u.m, m._u.p, m._u.dense) for m in members}) == 1)
        self._x: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._finished = True  # whether _parts are the members' outputs (else each member's finish is to run)
        self.mlp: nn.Module | None = None  # set by gate_mlp: the MLP whose forward runs :meth:`gated`
        # set by models.fused_norms: the RMSNorm (weight, eps) the members' common input goes through first
        self.norm: tuple[torch.Tensor, float] | None = None
        self._prepared: tuple[torch.Tensor, torch.Tensor] | None = None  # see prepare

    def _point_members(self) -> None:
        """Each member's buffers: views of its rows of the fused ones."""
        start = 0
        for m in self.members:
            for k in m._keys:
                setattr(m, k, getattr(self.linear, k)[start:start + m.out_features])
            start += m.out_features
        self._ptrs = [[getattr(m, k).data_ptr() for k in m._keys] for m in self.members]

    def hold_layout(self) -> bool:
        """:meth:`QuantLinear.hold_layout` for the fused weight, the members' buffers then views of its host copy
        (a member moved off that GPU drops the layout: :meth:`QuantLinear.release_layout`)."""
        if not self.whole() or not self.linear.hold_layout():
            return False
        self._point_members()
        for m in self.members:
            m._held_on = self.linear._held_on
        return True

    def intact(self, i: int) -> bool:
        """Member ``i`` still reads the fused storage (eager check; a device move or reassignment breaks it)."""
        m = self.members[i]
        return [getattr(m, k).data_ptr() for k in m._keys] == self._ptrs[i]

    def whole(self) -> bool:
        """Every member still reads the fused storage (:meth:`intact` for each)."""
        return all(self.intact(i) for i in range(len(self.members)))

    def _joint(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The group's matmul of ``x`` (its norm first, then the shared input-side rotation), with the stacked
        output sides undone; and whether that is every member's output already (else each member's
        :meth:`QuantLinear.finish` is still to run on its slice)."""
        if not self.rotated:
            return self.linear.project(x, norm=self.norm), True  # the norm in the GEMV's prologue
        xr = self._take_prepared(x)
        if xr is None:
            v = self.members[0]._v  # the norm before the rotation, which the GEMV's prologue would come after
            if v is not None:
                xr = norm_rotated(x, self.norm, v)
            else:
                xr = x if self.norm is None else rms_norm_reference(x, *self.norm)
        y = self.linear.project(xr)
        if self.stacked_out:  # read each time: place_rotations may have given the members device copies
            y = rotate_outputs([m._u for m in self.members], y)
        undone = self.stacked_out or all(m._u is None for m in self.members)  # no output side left to undo
        return y, undone and all(m.bias is None for m in self.members)

    def prepare(self, x: torch.Tensor, rotated: torch.Tensor) -> None:
        """Hand the group its next input's norm and input-side rotation, computed ahead (a rotated layer's last
        junction computes the next layer's, :mod:`lowbit.models.fused_norms`): used once, if that input is ``x``."""
        self._prepared = (x, rotated)

    def _take_prepared(self, x: torch.Tensor) -> torch.Tensor | None:
        prepared, self._prepared = self._prepared, None
        return prepared[1] if prepared is not None and prepared[0] is x else None

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for ``x`` side by side, [..., sum of their sizes] (the group's norm first)."""
        y, finished = self._joint(x)
        if finished:
            return y
        parts = zip(self.members, y.split(self.sizes, dim=-1), strict=True)
        return torch.cat([m.finish(p, rotated=self.stacked_out) for m, p in parts], dim=-1)

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s output for ``x``: computed with every member's when ``x`` is new (or for member 0)."""
        if i == 0 or self._x is not x:
            y, self._finished = self._joint(x)
            self._x, self._parts = x, y.split(self.sizes, dim=-1)
        y = self._parts[i]
        return y if self._finished else self.members[i].finish(y, rotated=self.stacked_out)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x) of a [gate, up] group, in one matmul (after the norm and input side of a rotated
        group, which has no output sides: :func:`gate_mlp`)."""
        v = self.members[0]._v
        if v is None:
            return self.linear.gated(x, norm=self.norm)
        return self.linear.gated(norm_rotated(x, self.norm, v))

    def release(self) -> None:
        if self.mlp is not None:
            del self.mlp.forward  # the class's forward again
            self.mlp = None
        held_on = self.linear._held_on  # members' stored bytes in host memory: back to that GPU, as before
        self.linear.release_layout()
        for m in self.members:
            for k in m._keys:
                t = getattr(m, k)
                setattr(m, k, t.to(held_on) if held_on is not None and not t.is_cuda else t.clone())
            m._fused, m._held_on = None, None
        self._x, self._parts = None, ()
        self.norm = self._prepared = None


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a gated MLP (see :func:`gate_mlp`): ``down(silu(gate(x)) * up(x))`` with gate and up one
    GEMV; the class's own forward where the group no longer holds (a member moved or reassigned)."""
    fused = getattr(self.gate_proj, "_fused", None)  # None once gate_proj is no longer a QuantLinear
    if fused is not None and (torch.compiler.is_compiling() or fused[0].whole()):
        return self.down_proj(fused[0].gated(x))
    return type(self).forward(self, x)


def has_silu(mlp: nn.Module) -> bool:
    """Whether ``mlp``'s activation is a SiLU (torch's or transformers' own class)."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def gate_mlp(mlp: nn.Module, group: FusedGroup) -> bool:
    """Run ``mlp`` through its fused [gate, up] ``group`` with the activation in the GEMV's epilogue, where the
    MLP is one of :data:`GATED_MLPS` with a SiLU and the group has no output-side rotation or bias, and its format
    is a scalar grid (E8P's gated GEMV measured at half the decode speed of its two plain ones: 207.0 vs 410.9
    tok/s, 7B shape on an H200, docs/kernels.md); True when it now does."""
    output_sides = any(m._u is not None for m in group.members)
    biases = any(m.bias is not None for m in group.members)
    if (type(mlp).__name__ not in GATED_MLPS or not has_silu(mlp) or output_sides or biases
            or group.linear.fmt.vector_dim != 1
            or group.members != [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]):
        return False
    mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
    group.mlp = mlp
    return True


def _input_side(m: QuantLinear) -> tuple | None:
    return m.rotation.input_side if m.rotation is not None else None


def _fusable(members: list[nn.Module]) -> bool:
    if not all(isinstance(m, QuantLinear) for m in members):
        return False
    first = members[0]
    for m in members:
        if (m.format_name != first.format_name or m.in_features != first.in_features or m.input_quant is not None
                or m.weight_cached or m._fused is not None or _input_side(m) != _input_side(first)):
            return False
        if any(getattr(m, k).dim() == 0 or getattr(m, k).shape[0] != m.out_features for k in m._keys):
            return False
    return len({getattr(m, k).device for m in members for k in m._keys}) == 1


def fuse_siblings(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every decoder layer where they can be (see the module docstring); returns how
    many groups were formed (0 for an architecture the walker does not know). Idempotent: groups already fused
    are left as they are."""
    if getattr(getattr(model, "config", None), "model_type", None) not in DECODER_LAYERS:
        return 0
    n = 0
    with torch.no_grad():
        for layer in decoder_layers(model):
            for names in SIBLINGS:
                try:
                    members = [layer.get_submodule(name) for name in names]
                except AttributeError:
                    continue
                if _fusable(members):
                    group = FusedGroup(members)
                    if names[0] == "mlp.gate_proj":
                        gate_mlp(layer.get_submodule("mlp"), group)
                    n += 1
    return n


def hold_layouts(model: nn.Module) -> int:
    """:meth:`QuantLinear.hold_layout` for every QuantLinear of ``model`` and every fused group of them (the GPU
    then holds the kernel layouts of its K-quant, IQ2_XXS and 3-, 5- and 6-bit weights, their stored bytes in host
    memory); returns how many weights now do. Only for float16 models: the CUDA GEMV that reads the layouts takes
    float16 activations."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if not floats or floats[0].dtype != torch.float16:
        return 0
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    groups = {id(m._fused[0]): m._fused[0] for m in linears if m._fused is not None}
    with torch.no_grad():
        return sum(m.hold_layout() for m in linears) + sum(g.hold_layout() for g in groups.values())


def unfuse_siblings(model: nn.Module) -> int:
    """Give every fused member its own storage again; returns how many groups were released. (A layer whose norms
    were folded into its groups, :mod:`lowbit.models.fused_norms`, unfolds itself at its next call.)"""
    groups = {id(m._fused[0]): m._fused[0] for m in model.modules()
              if isinstance(m, QuantLinear) and m._fused is not None}
    with torch.no_grad():
        for g in groups.values():
            g.release()
    return len(groups)
