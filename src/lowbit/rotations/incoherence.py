"""Incoherence processing of one linear layer: W' = U W V^T, H' = V H V^T, undone online at inference.

U acts on the output side, V on the input side; both are randomized Hadamard transforms stored as seeds, and
either may be absent (lowbit's ``+rht`` draws V alone: :func:`lowbit.models.fused_linears.layer_rotation`).
For y = x W^T:  y = U^T ((V x) W'^T)  -- QuantLinear applies V to its input and U^T to its output.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from lowbit.rotations.hadamard import LAYOUT, RandomizedHadamard


@cache
def hadamard_of(n: int, seed: int, layout: int) -> RandomizedHadamard:
    """Built once per (size, seed, layout): rotating W, H, building the QuantLinear and the compiled decode step's
    transform op all reuse it."""
    return RandomizedHadamard(n, seed, layout)


_SIGNS: dict[tuple, torch.Tensor] = {}


def device_signs(rots: Sequence[RandomizedHadamard], device: torch.device) -> torch.Tensor:
    """The random signs of k transforms one after another, float32 on ``device`` ([k n]; the [k m, p] tables the
    kernels index row by row), built once per (transforms, device): a per-call copy would be a kernel of its own in
    every decode step."""
    key = (tuple((r.n, r.seed, r.layout) for r in rots), str(device))
    if key not in _SIGNS:
        _SIGNS[key] = torch.cat([r.signs.float() for r in rots]).to(device)
    return _SIGNS[key]


@dataclass(frozen=True)
class Rotation:
    """Seeds of the input-side (V) and output-side (U) transforms (None = that side is not rotated), and the
    layout of both (:mod:`lowbit.rotations.hadamard`: how a size splits into a dense factor and a power of two)."""

    seed_in: int | None
    seed_out: int | None
    layout: int = LAYOUT

    @staticmethod
    def for_layer(name: str, base_seed: int = 0, out_side: bool = True, input_key: str | None = None) -> Rotation:
        """Seeds stable per layer and independent across layers. ``input_key``: linears that read the same input
        (q/k/v, gate/up) pass the same key and so share their input-side transform: the input is rotated once for
        all of them, they share one rotated Hessian, and they can run as one matmul."""
        s = zlib.crc32(f"{base_seed}:{name}".encode())
        s_in = zlib.crc32(f"{base_seed}:{input_key or name}".encode())
        return Rotation(s_in, (s ^ 0x5BD1E995) if out_side else None)

    def transforms(self, out_features: int, in_features: int):  # noqa: ANN201
        v = None if self.seed_in is None else hadamard_of(in_features, self.seed_in, self.layout)
        u = None if self.seed_out is None else hadamard_of(out_features, self.seed_out, self.layout)
        return u, v

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        u, v = self.transforms(*w.shape)
        w = w.float()
        if v is not None:
            w = v.apply(w)  # W V^T
        if u is not None:
            w = u.apply(w.t()).t()  # U (W V^T)
        return w

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        u, v = self.transforms(*w.shape)
        if u is not None:
            w = u.inverse(w.t()).t()  # U^T W'
        if v is not None:
            w = v.inverse(w)  # (U^T W') V
        return w

    def rotate_hessian(self, H: torch.Tensor) -> torch.Tensor:
        if self.seed_in is None:
            return H
        v = hadamard_of(H.shape[0], self.seed_in, self.layout)
        return v.apply(v.apply(H.float()).t())  # V H V^T (H symmetric)

    @property
    def input_side(self) -> tuple[int | None, int]:
        """What decides the input-side transform: linears with equal ones rotate their input the same way."""
        return self.seed_in, self.layout

    def to_json(self) -> list[int | None]:
        """[seed_in, seed_out] for layout 1 (files written before layouts existed), else [seed_in, seed_out, layout]."""
        return [self.seed_in, self.seed_out] + ([] if self.layout == 1 else [self.layout])

    @staticmethod
    def from_json(v: list[int | None] | None) -> Rotation | None:
        return None if v is None else Rotation(v[0], v[1], v[2] if len(v) > 2 else 1)
