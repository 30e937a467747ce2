"""QuantLinear: a drop-in replacement for nn.Linear holding a packed weight.

The reference forward dequantizes the whole weight and calls F.linear; fast kernels can replace that
without changing what is stored. Packed buffers keep their own dtypes through ``.to(dtype)`` so a model can
be cast for compute without touching the storage. With a :class:`Rotation`, the packed weight is
W' = U W V^T and the forward applies V to the input and U^T to the output (incoherence processing).

Weight cache (opt-in, for generation): dequantizing the whole weight on every call dominates token-by-token
decoding on a CPU. :meth:`QuantLinear.cache_weight` (or :func:`cache_dequantized` for a whole model) keeps the
dequantized (still rotated) weight in memory, costing out x in x 4 bytes per linear in float32 (about 8x a 4-bit
checkpoint's linears), and reuses it while the packed buffers are unchanged. The packed buffers stay the storage
of record: the cache is neither a buffer nor a parameter, so save/load and ``state_dict`` never see it. A step that
torch.compile traces reads the cache as the eager calls before it left it (a decoder's prefill), unchecked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QuantizedTensor, get_format
from lowbit.kernels.dispatch import (
    Norm,
    dequant_matmul,
    gated_matmul,
    hold_layout,
    norm_rotated,
    release_layout,
    rotate_output,
)
from lowbit.kernels.reference import rms_norm_reference
from lowbit.rotations.incoherence import Rotation


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, format_name: str, bias: bool = False,
                 device: torch.device | str | None = None, rotation: Rotation | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format_name = format_name
        self.fmt = get_format(format_name)
        self.rotation = rotation
        self._u, self._v = rotation.transforms(out_features, in_features) if rotation else (None, None)
        self._keys = []
        for key, (shape, dtype) in self.fmt.storage_spec((out_features, in_features)).items():
            self.register_buffer(key, torch.zeros(shape, dtype=dtype, device=device))
            self._keys.append(key)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # Optional rounding of the (rotated) input, e.g. simulated 4-bit activations (lowbit.eval.simulate).
        self.input_quant: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._cache_on = False
        self._cache: tuple[tuple, torch.Tensor] | None = None  # (buffers' fingerprint + dtype, weight)
        self._fused: tuple | None = None  # (FusedGroup, index) while fused with its siblings (models.fused_linears)
        # the GPU whose kernel layout holds this weight while its stored bytes are in host memory (hold_layout)
        self._held_on: torch.device | None = None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       rotation: Rotation | None = None) -> QuantLinear:
        """``qt`` holds the rotated weight U W V^T when ``rotation`` is given."""
        out_f, in_f = qt.shape
        dev = next(iter(qt.data.values())).device
        m = cls(in_f, out_f, qt.format, bias=bias is not None, device=dev, rotation=rotation)
        for key in m._keys:
            getattr(m, key).copy_(qt.data[key])
        if bias is not None:
            m.bias.data = bias.detach().clone().float()
        return m

    def quantized(self) -> QuantizedTensor:
        buffers = self._buffers  # not getattr's nn.Module lookup: this runs for every eager call
        return QuantizedTensor(self.format_name, (self.out_features, self.in_features),
                               {k: buffers[k] for k in self._keys})

    def dequantize(self) -> torch.Tensor:
        """The effective weight in the original (unrotated) basis, [out, in] float32."""
        w = self.fmt.dequantize(self.quantized())
        return self.rotation.unrotate_weight(w) if self.rotation else w

    def cache_weight(self, enabled: bool = True) -> QuantLinear:
        """Keep the dequantized weight between calls (see the module docstring for the memory cost)."""
        self._cache_on = enabled
        self._cache = None
        return self

    def hold_layout(self) -> bool:
        """On a GPU whose CUDA GEMV reads this weight from a kernel layout (K-quants, IQ2_XXS, 3-, 5- and 6-bit
        grids): keep that layout alone on the device and the stored bytes in host memory, instead of both on the
        device (:func:`lowbit.kernels.dispatch.hold_layout`). The stored bytes stay the buffers of record (saving,
        ``state_dict``, export); moving the module off that GPU (``.cpu()``, another device) drops the layout.
        True when it now does; a no-op for a weight read as stored, a fused member (its group holds the fused
        weight: :meth:`~lowbit.models.fused_linears.FusedGroup.hold_layout`) or with the weight cache on."""
        if self._held_on is not None or self._fused is not None or self._cache_on:
            return False
        held = hold_layout(self.fmt, self.quantized())
        if not held:
            return False
        device = getattr(self, next(iter(held))).device
        for key, host in held.items():
            setattr(self, key, host)
        self._held_on = device
        return True

    @property
    def weight_cached(self) -> bool:
        return self._cache_on

    def _fingerprint(self, dtype: torch.dtype) -> tuple:
        # data_ptr changes when a buffer is replaced (.to(), load_state_dict with assign) and _version when it is
        # modified in place (copy_, load_state_dict): either makes the cached weight stale.
        bufs = [getattr(self, k) for k in self._keys]
        return (dtype, *((t.data_ptr(), -1 if t.is_inference() else t._version) for t in bufs))

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if not self._cache_on:
            return self.fmt.dequantize(self.quantized()).to(dtype)
        key = self._fingerprint(dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the stale copy before building the new one
            # A normal tensor even when first built under inference_mode, so the cache stays usable outside it.
            with torch.inference_mode(False), torch.no_grad():
                w = self.fmt.dequantize(self.quantized())  # on the host for stored bytes held there
                self._cache = (key, w.to(self._held_on or w.device, dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:  # one matmul for this linear and its siblings (same input)
            group, i = self._fused
            if torch.compiler.is_compiling() or group.intact(i):
                return group.part(x, i)
        return self.project(x)

    def project(self, x: torch.Tensor, norm: Norm | None = None, residual: torch.Tensor | None = None,
                rotated: bool = False) -> torch.Tensor:
        """``residual + self(rms_norm(x))``, either part optional (``norm``: an RMSNorm's weight and eps, as
        :func:`rms_norm_reference` computes it). A linear without input rounding or weight cache does the norm
        inside its matmul when it has no input side (with one, the norm and the input side are one kernel where
        one runs: :func:`norm_rotated`), and the residual too when it has no output side or bias (the CUDA GEMV's
        prologue and epilogue: a decode step's norms and residual adds need no kernels of their own); otherwise
        they are computed around it. ``rotated``: x already went through the input side (no ``norm`` then)."""
        if rotated and norm is not None:
            raise ValueError("an input already rotated comes after its norm: pass no norm with rotated=True")
        fits = self.input_quant is None and not self._cache_on  # a matmul that takes a norm and residual inside
        add_inside = residual is not None and fits and self._u is None and self.bias is None
        inside = residual if add_inside else None
        if self._v is not None and not rotated:  # the norm before the input side (one kernel where one runs)
            x = norm_rotated(x, norm, self._v)
            norm = None
        elif norm is not None and not fits:
            x, norm = rms_norm_reference(x, *norm), None
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = self.finish(self.matmul(x, norm, inside))
        return y if residual is None or add_inside else residual + y

    def matmul(self, x: torch.Tensor, norm: Norm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The stored weight's matmul alone: x already rotated and rounded as this linear's input side wants, the
        output side not undone, no bias (``norm`` and ``residual`` inside the matmul, as :meth:`project` passes
        them where it can)."""
        if self._cache_on:
            if torch.compiler.is_compiling() and self._cache is not None and self._cache[0][0] == x.dtype:
                # the weight as the eager calls before the trace (a decoder's prefill) left it: the staleness check
                # (is_inference, data pointers) breaks the graph in every linear, and a compiled decode step then
                # recompiled per layer until Dynamo gave up (1 token/s on a CPU instead of 14)
                return F.linear(x, self._cache[1])
            return F.linear(x, self._weight(x.dtype))
        if torch.compiler.is_compiling():  # one opaque node for torch.compile (same kernels as below)
            from lowbit.kernels.ops import qmatmul

            return qmatmul(x, self.format_name, self.out_features, self.in_features, ",".join(self._keys),
                           [getattr(self, k) for k in self._keys], *_norm_args(norm), residual)
        return dequant_matmul(x, self.fmt, self.quantized(), norm, residual)  # packed kernel where one runs

    def gated(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor:
        """silu(x gate^T) * (x up^T) for a linear whose rows are [gate; up] (a fused gate/up projection without
        rotation, input rounding, weight cache or bias): on CUDA one GEMV with the product in its epilogue (and
        ``norm``, as in :meth:`project`, in its prologue)."""
        if torch.compiler.is_compiling():
            from lowbit.kernels.ops import qmatmul_gated

            return qmatmul_gated(x, self.format_name, self.out_features, self.in_features, ",".join(self._keys),
                                 [getattr(self, k) for k in self._keys], *_norm_args(norm))
        return gated_matmul(x, self.fmt, self.quantized(), norm)

    def finish(self, y: torch.Tensor, rotated: bool = False) -> torch.Tensor:
        """The matmul's result -> this layer's output: the output-side rotation undone (unless ``rotated``: a
        fused group did it already), the bias added."""
        if self._u is not None and not rotated:
            y = rotate_output(self._u, y)  # Triton kernel where one runs, else self._u.inverse(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - signature from nn.Module
        dtypes = {k: getattr(self, k).dtype for k in self._keys}
        self._cache = None  # a device move would otherwise keep a copy on the old device
        held = {}
        if self._held_on is not None and fn(torch.empty(0, device=self._held_on)).device != self._held_on:
            self.release_layout()  # moved off the GPU of its layout: the stored bytes move as any buffer
        elif self._held_on is not None:  # a cast or a move to that GPU: the stored bytes stay in host memory
            held = {k: t for k, t in self._buffers.items() if k in self._keys and t.device.type == "cpu"}
            self._buffers.update(dict.fromkeys(held, torch.empty(0, dtype=torch.uint8)))
        super()._apply(fn, recurse)
        self._buffers.update(held)
        for k, dt in dtypes.items():
            if getattr(self, k).dtype != dt:
                setattr(self, k, getattr(self, k).to(dt))
        return self

    def release_layout(self) -> None:
        """Undo :meth:`hold_layout`'s hold: drop the kernel layout (its device memory) and keep the stored bytes
        where they are (host memory; ``.to()`` moves them)."""
        if self._fused is not None:
            self._fused[0].linear.release_layout()
        elif self._held_on is not None:
            for key in self._keys:
                release_layout(getattr(self, key))
        self._held_on = None

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        rot = f", rotation={self.rotation.to_json()}" if self.rotation else ""
        return f"in={self.in_features}, out={self.out_features}, format={self.format_name}, bias={has_bias}{rot}"


def _norm_args(norm: Norm | None) -> tuple[torch.Tensor | None, float]:
    """``norm`` as the custom ops' (norm_weight, eps) arguments."""
    return (None, 0.0) if norm is None else (norm[0], float(norm[1]))


def cache_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Turn the weight cache on (or off) for every QuantLinear in ``model``; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight(enabled)
            n += 1
    return n
