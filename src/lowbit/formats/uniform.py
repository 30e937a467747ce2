"""Uniform integer grids with per-group scales (the ggml Q4_0 / Q4_1 family, any bit width 2..8).

* symmetric, "fixed zero offset" (Q4_0 style): ``w = (q - 2^(b-1)) * d``; the largest-magnitude weight of the
  group maps exactly to the level ``-2^(b-1)`` (ggml's choice: the sign of ``d`` follows that weight, so the
  extra negative level is spent on whichever side has the outlier).
* asymmetric, "scale + min" (Q4_1 style): ``w = q * d + m`` with ``m`` = group minimum, ``d = (max-min)/(2^b-1)``.

Scales and mins are stored as float16, and codes are always computed against the float16-rounded
parameters, so what is stored dequantizes to exactly what the algorithms saw.

``fit="mse"`` replaces the min/max rule by a search over shrunken ranges (clipping), picking per row the
candidate with the least (importance-weighted) squared error; storage is identical. For asymmetric grids it also
tries the full range with a coarser step, (max - min) / k for k from 2^b - 2 down to 2^(b-1): weights that already
lie on a coarser grid (a model derived from a 4-bit file, stored again at 5 bits) are then stored exactly, as
llama.cpp's scale search (make_qkx3_quants) finds them.

``fit="ls"`` (symmetric grids) is ggml's ``make_qx_quants`` as llama.cpp's Q4_0 / Q5_0 quantizers use it with an
importance matrix: 19 reciprocal scales from -(h - 0.9) / max to -(h + 0.9) / max (h = 2^(b-1), max the group's
signed largest weight), each rounding the group to codes; kept is the one whose codes explain the most of the
group by weighted least squares, and what is stored is that least-squares scale. On the bundled model at Q4_0
(docs/gguf.md) it beat the shrunken-range search under GPTQ act-order in and out of domain, at a KL lower or level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain

import torch

from lowbit.formats.base import Format, Params, QuantizedTensor
from lowbit.formats.bitpack import pack_bits, packed_row_bytes, unpack_bits

_SEARCH_GRID = 32  # candidates between the full range and 20% of it (as GPTQ's mse grid, maxshrink 0.8)


class UniformFormat(Format):
    def __init__(self, bits: int, group_size: int | None, symmetric: bool, fit: str = "minmax", name: str = ""):
        if not 2 <= bits <= 8:
            raise ValueError(f"uniform formats support 2..8 bits, got {bits}")
        if fit not in ("minmax", "mse", "ls"):
            raise ValueError(f"fit must be 'minmax', 'mse' or 'ls', got {fit!r}")
        if fit == "ls" and not symmetric:
            raise ValueError("fit 'ls' (ggml's make_qx_quants) is for symmetric grids")
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.fit_method = fit
        self.float_params = ("scale",) if symmetric else ("scale", "min")
        self.qmax = (1 << bits) - 1
        self.offset = 1 << (bits - 1)
        self.name = name or _canonical_name(bits, group_size, symmetric, fit)

    # ----- parameters -------------------------------------------------------------------------
    def _params_for_range(self, lo: torch.Tensor, hi: torch.Tensor, signed_amax: torch.Tensor) -> Params:
        if self.symmetric:
            return {"scale": _fp16(signed_amax / -self.offset)}
        return {"scale": _fp16((hi - lo) / self.qmax), "min": _fp16(lo)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        if self.fit_method == "ls":
            return {"scale": _fp16(least_squares_search(w, importance, self.offset))}
        lo = w.amin(dim=1, keepdim=True)
        hi = w.amax(dim=1, keepdim=True)
        signed_amax = torch.where(hi.abs() >= lo.abs(), hi, lo)
        coarser = () if self.symmetric else ({"scale": _fp16((hi - lo) / k), "min": _fp16(lo)}
                                             for k in range(self.qmax - 1, self.qmax // 2, -1))
        return range_fit(self, w, importance, lambda p: self._params_for_range(lo * p, hi * p, signed_amax * p),
                         coarser)

    def tuned(self, params: Params, t: dict[str, torch.Tensor]) -> Params:
        """Asymmetric grids: the scale's multiplier scales the whole group about zero (min too), and the min moves
        by ``t["min"]`` grid steps. Scaling ``q * scale`` and ``min`` apart would move a weight by a share of both
        terms, ~half the group's range each, whatever the weight: on an input channel of massive activations (the
        bundled model has them) a 0.01% step of both, against the gradient, raised the KL by half
        (Q5_1 at Q5_K_M's types)."""
        if self.symmetric:
            return super().tuned(params, t)
        g = t["scale"].exp()
        return {**params, "scale": params["scale"] * g, "min": params["min"] * g + params["scale"] * t["min"]}

    # ----- rounding ---------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        x = w.float() if self.symmetric else w.float() - params["min"].float()
        return self._levels(x, _inverse(params["scale"].float())).to(torch.int64)

    def _levels(self, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """Codes (as float integers) of ``x`` (the weights less the group's min, for asymmetric grids) at the
        reciprocal scales ``inv``."""
        return torch.clamp(torch.round(x * inv) + (self.offset if self.symmetric else 0), 0, self.qmax)

    def _values(self, q: torch.Tensor, d: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
        """Float32 values of codes ``q`` (float) at scales ``d`` and, asymmetric, mins ``lo``."""
        return (q - self.offset) * d if self.symmetric else q * d + lo

    def column_rounding(self, params: Params) -> Callable[[torch.Tensor, int, torch.Tensor | None],
                                                          tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`encode` and :meth:`decode` of one column, the same float operations, with every column's
        reciprocal scale taken once: GPTQ rounds column by column, and on a CPU the per-column reciprocal was a
        third of its time. Codes come back as float32 integers."""
        if type(self).encode is not UniformFormat.encode or type(self).decode is not UniformFormat.decode:
            return super().column_rounding(params)  # a subclass with its own rounding (level sets)
        d = params["scale"].float()
        inv = _inverse(d)
        lo = None if self.symmetric else params["min"].float()

        def round_at(w: torch.Tensor, j: int, importance: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
            lo_j = None if lo is None else lo[:, j : j + 1]
            q = self._levels(w.float() if lo_j is None else w.float() - lo_j, inv[:, j : j + 1])
            return q, self._values(q, d[:, j : j + 1], lo_j)
        return round_at

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return self._values(codes.float(), params["scale"].float(), None if self.symmetric else params["min"].float())

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        n_groups = self.n_groups(cols)
        spec = {"codes": ((rows, packed_row_bytes(cols, self.bits)), torch.uint8),
                "scale": ((rows, n_groups), torch.float16)}
        if not self.symmetric:
            spec["min"] = ((rows, n_groups), torch.float16)
        return spec

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        data = {"codes": pack_bits(codes, self.bits), "scale": params["scale"].to(torch.float16).contiguous()}
        if not self.symmetric:
            data["min"] = params["min"].to(torch.float16).contiguous()
        return QuantizedTensor(self.name, tuple(shape), data)

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        codes = unpack_bits(qt.data["codes"], self.bits, qt.shape[1]).to(torch.int64)
        params = {k: qt.data[k] for k in ("scale", "min") if k in qt.data}
        return codes, params


def range_fit(fmt: Format, w: torch.Tensor, importance: torch.Tensor | None,
              params_at: Callable[[float], Params], extra: Iterable[Params] = ()) -> Params:
    """``params_at(1.0)`` (the min/max range) for ``fit="minmax"``; for ``fit="mse"`` the best, per row, of the
    range shrunk by each factor of the grid (the clipping search of GPTQ's quantizer) and the ``extra``
    candidates."""
    if fmt.fit_method == "minmax":
        return params_at(1.0)
    shrink = [1.0 - 0.8 * i / _SEARCH_GRID for i in range(_SEARCH_GRID)]
    return fmt.best_of(w, chain((params_at(p) for p in shrink), extra), importance)


LS_STEPS = [0] + [s for s in range(-9, 10) if s != 0]  # make_qx_quants' order: on a tie the earlier one stays


def least_squares_search(w: torch.Tensor, importance: torch.Tensor | None, half: int) -> torch.Tensor:
    """Per row of ``w`` [rows, g], the scale [rows, 1] ggml's make_qx_quants(g, half, w, L, 1, importance) returns
    for codes -half..half-1 (:func:`make_qx_quants`). A row of zeros gets 0."""
    return make_qx_quants(w, importance, half)[1]


def least_squares_scale(w: torch.Tensor, codes: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` [rows, g], the scale s [rows, 1] that minimizes sum q (w - s codes)^2, and the weighted
    energy of the row it explains, s sum q w codes = (sum q w codes)^2 / sum q codes^2; both 0 where the codes
    carry no weight."""
    sumlx, suml2 = (q * w * codes).sum(dim=1, keepdim=True), (q * codes * codes).sum(dim=1, keepdim=True)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp_min(1e-30), torch.zeros_like(sumlx))
    return scale, scale * sumlx


def make_qx_quants(w: torch.Tensor, importance: torch.Tensor | None,
                   half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants on every row of ``w`` [rows, g] at once: each reciprocal scale -(half + 0.1 s) / max
    rounds the row to codes -half..half-1, and kept are the codes that maximize (sum q l x)^2 / sum q l^2 (q: the
    importance, or x^2 without one, as ggml weighs ``rmse_type`` 1). Returns those codes [rows, g] (floats), their
    least-squares scale [rows, 1] (what ggml stores) and the scale they were rounded at; 0 for a row of zeros."""
    q = w.pow(2) if importance is None else importance.to(w.dtype).expand_as(w)
    mx = w.gather(1, w.abs().argmax(dim=1, keepdim=True))
    live = mx.abs() >= 1e-15  # ggml's GROUP_MAX_EPS
    mx = torch.where(live, mx, torch.ones_like(mx))
    best = None  # (codes, scale, rounding scale, explained)
    for step in LS_STEPS:
        iscale = -(half + 0.1 * step) / mx
        codes = torch.round(w * iscale).clamp(-half, half - 1)
        scale, explained = least_squares_scale(w, codes, q)
        cand = (codes, scale, 1 / iscale, explained)
        if best is None:
            best = cand
            continue
        # ggml also asks sum q l^2 > 0; such codes explain 0, which never beats the best (>= 0)
        take = cand[3] > best[3]
        best = tuple(torch.where(take, c, b) for c, b in zip(cand, best, strict=True))
    codes, scale, plain, _ = best
    zero = torch.zeros_like(scale)
    return torch.where(live, codes, 0.0), torch.where(live, scale, zero), torch.where(live, plain, zero)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d is 0."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (what is stored) and back, saturating instead of overflowing to inf."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _canonical_name(bits: int, group_size: int | None, symmetric: bool, fit: str) -> str:
    g = "ch" if group_size is None else f"g{group_size}"
    name = f"int{bits}_{g}_{'sym' if symmetric else 'asym'}"
    return name + ("" if fit == "minmax" else f"_{fit}")
