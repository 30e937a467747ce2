"""Uniform grids with an integer zero point: ``w = (q - z) * s`` (GPTQ's and AWQ's asymmetric scheme).

lowbit's own asymmetric format (Q4_1 style, :mod:`lowbit.formats.uniform`) stores a float16 minimum ``m``;
GPTQ and compressed-tensors checkpoints store an integer zero point ``z`` instead, which holds ``m`` only when
``m / d`` happens to be an integer. This format rounds onto the integer-zero-point grid directly, so its
tensors export to those layouts exactly (:mod:`lowbit.io.hf_quant`).

Fit, as GPTQ's quantizer: the range is widened to include 0, ``s = (max - min) / (2^b - 1)`` (float16) and
``z = round(-min / s)``. One difference: ``z`` is kept in ``[1, 2^b - 1]``. GPTQ "v1" checkpoints (the layout
transformers, GPTQModel and vLLM read) store ``z - 1`` in ``b`` bits, so ``z = 0`` would wrap to ``2^b - 1``
(GPTQModel's v1->v2 conversion notes the overflow). Only a group with no negative weight has ``z = 0``; it gets
``z = 1`` and ``s = max / (2^b - 2)``, costing that rare group one level. Codes are computed against the stored
(float16) scale. Storage: b-bit codes, a float16 scale and a b-bit zero point per group.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import Format, Params, QuantizedTensor
from lowbit.formats.bitpack import pack_bits, packed_row_bytes, unpack_bits
from lowbit.formats.uniform import _fp16, range_fit


class ZeroPointFormat(Format):
    float_params = ("scale",)  # the zero point is an integer: +ft tunes the scale only

    def __init__(self, bits: int, group_size: int | None, fit: str = "minmax", name: str = ""):
        if not 2 <= bits <= 8:
            raise ValueError(f"zero-point formats support 2..8 bits, got {bits}")
        if fit not in ("minmax", "mse"):
            raise ValueError(f"fit must be 'minmax' or 'mse', got {fit!r}")
        self.bits = bits
        self.group_size = group_size
        self.fit_method = fit
        self.qmax = (1 << bits) - 1
        g = "ch" if group_size is None else f"g{group_size}"
        self.name = name or f"int{bits}_{g}_zp" + ("_mse" if fit == "mse" else "")

    # ----- parameters -------------------------------------------------------------------------
    def _params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = _fp16((hi - lo) / self.qmax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: any scale is exact
        zero = torch.round(-lo / scale)
        # z = 0 is not storable in GPTQ v1 (see the module docstring): give the top of the grid to the maximum
        low = zero < 1
        scale = torch.where(low & (hi > 0), _fp16(hi / (self.qmax - 1)), scale)
        return {"scale": scale, "zero": torch.where(low, torch.ones_like(zero), zero).clamp(max=self.qmax)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        lo = w.amin(dim=1, keepdim=True)
        hi = w.amax(dim=1, keepdim=True)
        return range_fit(self, w, importance, lambda p: self._params_for_range(lo * p, hi * p))

    # ----- rounding ---------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        q = torch.round(w.float() / params["scale"].float()) + params["zero"].float()
        return q.clamp(0, self.qmax).to(torch.int64)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (codes.float() - params["zero"].float()) * params["scale"].float()

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        n_groups = self.n_groups(cols)
        return {"codes": ((rows, packed_row_bytes(cols, self.bits)), torch.uint8),
                "scale": ((rows, n_groups), torch.float16),
                "zero": ((rows, packed_row_bytes(n_groups, self.bits)), torch.uint8)}

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        return QuantizedTensor(self.name, tuple(shape), {
            "codes": pack_bits(codes, self.bits),
            "scale": params["scale"].to(torch.float16).contiguous(),
            "zero": pack_bits(params["zero"].round().to(torch.int64), self.bits)})

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        codes = unpack_bits(qt.data["codes"], self.bits, qt.shape[1]).to(torch.int64)
        zero = unpack_bits(qt.data["zero"], self.bits, self.n_groups(qt.shape[1])).float()
        return codes, {"scale": qt.data["scale"], "zero": zero}
