"""The weight-format interface every algorithm, kernel and exporter is written against.

A format owns three things and nothing else knows them:
  * its levels (what a code decodes to, given per-group parameters such as a scale),
  * how group parameters are fitted and how weights are rounded onto the levels,
  * how codes and parameters are laid out as bytes (pack/unpack), hence its exact bits per weight.

Algorithms (RTN, GPTQ, ...) only call :meth:`Format.fit`, :meth:`Format.expand`, :meth:`Format.encode`,
:meth:`Format.decode` and :meth:`Format.pack`; they never see bytes.

Scalar formats have one code per weight. Vector codebooks (E8 lattice: ``vector_dim = 8``) have one code per
``vector_dim`` consecutive columns; ``encode`` maps [rows, k] weights to [rows, k // vector_dim] codes. A
format's group parameters may have any number of columns per group (IQ2_XXS: one super-scale and eight
sub-scales per 256 columns); :meth:`Format.expand` turns them into per-column parameters [rows, cols], the form
``encode``/``decode`` accept for any column range (scalar formats also accept per-group [rows, 1] parameters).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]
"""Per-group parameters: each tensor is [rows, n_groups] (a single group during fitting: [rows, 1])."""


@dataclass
class QuantizedTensor:
    """A packed weight matrix: the format's name, the logical [out, in] shape and the stored tensors."""

    format: str
    shape: tuple[int, int]
    data: dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        """Measured from the bytes actually stored (codes + scales + zeros + any metadata)."""
        return 8.0 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.format, self.shape, {k: v.to(device) for k, v in self.data.items()})

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Output rows [start, stop) as views, for formats that store every tensor one row per output feature
        (every packed format here: each row is quantized on its own)."""
        if any(t.shape[0] != self.shape[0] for t in self.data.values()):
            raise ValueError(f"{self.format}: stored tensors are not one row per output feature")
        stop = min(stop, self.shape[0])
        data = {k: v[start:stop] for k, v in self.data.items()}
        return QuantizedTensor(self.format, (stop - start, self.shape[1]), data)


class Format(ABC):
    """A weight format. Subclasses are immutable; the registry builds them from names."""

    name: str
    #: Columns sharing one set of group parameters; ``None`` means one group per row (per-channel).
    group_size: int | None = None
    #: Consecutive columns sharing one code (1 for scalar grids, 8 for E8 lattice codebooks).
    vector_dim: int = 1
    #: Group parameters stored as floats (scales, mins) that may be tuned after rounding with the codes held
    #: fixed (algorithms/finetune.py); integer-valued parameters (4-bit sub-scales) are not listed.
    float_params: tuple[str, ...] = ()
    #: Bits of code per weight, the grid's resolution (its step is ~2^(1 - bits) of a group's range); the lattice
    #: codebooks spend 16 bits on 8 weights. Sizes +ft's steps (algorithms/finetune.py).
    bits: int

    # ----- rounding primitives (what algorithms use) -------------------------------------------
    @abstractmethod
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        """Fit parameters for one group: ``w`` is [rows, g]; returns tensors of shape [rows, 1].

        ``importance`` ([g] or [rows, g], non-negative) weights the fitting error, e.g. diag(H).
        """

    @abstractmethod
    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest codes (int64, [rows, k // vector_dim]) for ``w`` [rows, k] given per-column parameters.

        ``importance`` (as in :meth:`fit`) weights the distance; it only matters for vector codebooks.
        """

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """Float32 values [rows, k] of ``codes`` given per-column parameters ([rows, k] or broadcastable)."""

    def column_rounding(self, params: Params) -> Callable[[torch.Tensor, int, torch.Tensor | None],
                                                          tuple[torch.Tensor, torch.Tensor]]:
        """GPTQ's rounding of one code's columns at a time: ``params`` are per-column ([rows, k]); the returned
        ``round_at(w, j, importance)`` gives the codes of ``w`` (columns j..j + vector_dim) and their decoded
        values, as :meth:`encode` and :meth:`decode` would. Formats whose rounding can share work across the
        columns (a reciprocal of every scale) override it with the same results."""
        vd = self.vector_dim

        def round_at(w: torch.Tensor, j: int, importance: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
            p = {k: v[:, j : j + vd] for k, v in params.items()}
            codes = self.encode(w, p, importance)
            return codes, self.decode(codes, p)
        return round_at

    # ----- storage ------------------------------------------------------------------------------
    @abstractmethod
    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        """Codes [rows, cols] + parameters [rows, n_groups] -> stored tensors."""

    @abstractmethod
    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        """Inverse of :meth:`pack`."""

    @abstractmethod
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every stored tensor for a weight of ``shape`` (used to rebuild modules)."""

    # ----- derived, shared by all formats -------------------------------------------------------
    def group_cols(self, cols: int) -> int:
        """Columns per group for a row of ``cols``; the last group may be shorter (e.g. 576 = 4x128 + 64)."""
        return cols if self.group_size is None else min(self.group_size, cols)

    def n_groups(self, cols: int) -> int:
        g = self.group_cols(cols)
        return (cols + g - 1) // g

    def stored_bytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes of the stored tensors for a weight of ``shape`` (codes, scales and any metadata)."""
        return sum(math.prod(size) * torch.empty((), dtype=dtype).element_size()
                   for size, dtype in self.storage_spec(shape).values())

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Exact bits per weight of the stored tensors for a weight of ``shape`` (no rounding, no guesses)."""
        return 8.0 * self.stored_bytes(shape) / (shape[0] * shape[1])

    def best_of(self, w: torch.Tensor, candidates: Iterable[Params],
                importance: torch.Tensor | None = None) -> Params:
        """Per row, the candidate parameters with the least (importance-weighted) squared rounding error."""
        best: tuple | None = None
        keys: list[str] = []
        for cand in candidates:
            err = (w - self.decode(self.encode(w, cand, importance), cand)).pow(2)
            if importance is not None:
                err = err * importance
            keys = list(cand)
            best = keep_better(best, (*cand.values(), err.sum(dim=1, keepdim=True)))
        assert best is not None, "no candidates"
        return dict(zip(keys, best[:-1], strict=True))

    def tuned(self, params: Params, t: dict[str, torch.Tensor]) -> Params:
        """``params`` moved by the trainable ``t`` (one tensor like each of ``float_params``, 0 = unchanged) as +ft
        trains them (algorithms/finetune.py): each scaled by ``exp(t)``, so one step size fits every magnitude
        and no sign flips. Formats whose parameters are not all scales override it."""
        return {k: v * t[k].exp() if k in t else v for k, v in params.items()}

    def expand(self, params: Params, cols: int) -> Params:
        """Per-group parameters (concatenated over groups) -> per-column parameters [rows, cols].

        The default repeats [rows, n_groups] tensors; formats with richer group parameters override it.
        """
        g = self.group_cols(cols)
        return {k: v.repeat_interleave(g, dim=1)[:, :cols] for k, v in params.items()}

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        codes, params = self.unpack(qt)
        return self.decode(codes, self.expand(params, qt.shape[1]))

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Round-to-nearest of a whole matrix: fit each group, encode, pack."""
        w = w.float()
        g = self.group_cols(w.shape[1])
        codes, params = [], []
        for j in range(0, w.shape[1], g):
            imp = None if importance is None else importance[..., j : j + g]
            p = self.fit(w[:, j : j + g], imp)
            cols = w[:, j : j + g]
            codes.append(self.encode(cols, self.expand(p, cols.shape[1]), imp))
            params.append(p)
        return self.pack(torch.cat(codes, dim=1), cat_params(params), tuple(w.shape))

    def __repr__(self) -> str:
        return f"<format {self.name}>"


def keep_better(best: tuple | None, cand: tuple) -> tuple:
    """Elementwise (per row), whichever of two candidates has the smaller error; the error is the last item.

    Every scale/codebook search keeps its running best with this: tensors broadcast against the error.
    """
    if best is None:
        return cand
    better = cand[-1] < best[-1]
    return (*(torch.where(better, c, b) for c, b in zip(cand[:-1], best[:-1], strict=True)),
            torch.minimum(cand[-1], best[-1]))


def cat_params(groups: list[Params]) -> Params:
    """Concatenate per-group parameters ([rows, 1] each) into [rows, n_groups]."""
    return {k: torch.cat([p[k] for p in groups], dim=1) for k in groups[0]}
