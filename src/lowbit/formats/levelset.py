"""Fixed level sets in units of a per-group scale: ``w ~ s * levels[q]`` (no zero point).

After a randomized Hadamard rotation, weight rows are close to Gaussian, and a 2-bit grid that contains zero
wastes one of its four levels on the densest region while the outer side gets only one level. The no-zero set
``{-1.5, -0.5, +0.5, +1.5}`` (equivalently ``{-1, -r, r, 1}`` with inner/outer ratio ``r = 1/3``) is close to the
Lloyd-Max quantizer of a Gaussian (r ~ 0.30). Variants: any ratio ``r`` (``nz2r30`` = r 0.30), ``{+-1, +-2}``
(r = 0.5), the standard ``{-2, -1, 0, +1}`` and its mirrored form ``std2m`` (per group, the set or its reflection
{-1, 0, 1, 2}, stored as the sign of the scale: the extra level goes to whichever side needs it, at no cost),
all with the scale found by an error-minimizing search.

The same machinery holds llama.cpp's IQ4_NL: 16 fixed non-uniform levels (``IQ4_NL_LEVELS``, denser near zero)
times a float16 scale per group of 32, whose sign may flip the asymmetric set (as llama.cpp's own search does).

Storage is the symmetric uniform layout (b-bit codes, b = log2(#levels), + one float16 scale per group), so the
bits per weight are those of ``int{b}_*_sym``.
"""

from __future__ import annotations

import torch

from lowbit.formats.base import Params
from lowbit.formats.uniform import UniformFormat, _fp16

_SEARCH_GRID = 48  # candidate scales between max|w|/max|level| and 10% of it
_STEP = 0.9 / _SEARCH_GRID


def _shrink(i: int | torch.Tensor) -> float | torch.Tensor:
    """The i-th candidate's fraction of max|w| / max|level|."""
    return 1.0 - _STEP * i


class LevelSetFormat(UniformFormat):
    def __init__(self, levels: tuple[float, ...], group_size: int | None, name: str, mirror: bool = False):
        bits = len(levels).bit_length() - 1
        if len(levels) != 1 << bits or bits < 1 or list(levels) != sorted(levels):
            raise ValueError(f"need 2^b increasing levels, got {levels}")
        super().__init__(bits, group_size, symmetric=True, name=name)
        self.mirror = mirror  # also try the negated scale: the set reflected, {-1,0,1,2} for {-2,-1,0,1}
        self.levels = torch.tensor(levels, dtype=torch.float32)
        self._mids = (self.levels[1:] + self.levels[:-1]) / 2
        self._zero_code = int(self.levels.abs().argmin())
        self._lut = _code_table(self._mids)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        top = w.abs().amax(dim=1, keepdim=True) / self.levels.abs().max()
        signs = (1.0, -1.0) if self.mirror else (1.0,)
        # Coarse to fine: every other candidate of the grid, then the two skipped neighbours of each row's best.
        # Against the whole grid: half the encodes (the fits were most of an IQ4_NL file's time on a CPU) for
        # +0.05% weighted error on random groups.
        # Each candidate carries its grid index, which the rounding ignores, so the best one's neighbours are known.
        coarse = self.best_of(w, ({"scale": _fp16(top * _shrink(i) * sg), "index": torch.full_like(top, i)}
                                  for i in range(0, _SEARCH_GRID, 2) for sg in signs), importance)
        i, sign = coarse.pop("index"), torch.sign(coarse["scale"])
        fine = ({"scale": _fp16(top * _shrink(torch.clamp(i + k, 0, _SEARCH_GRID - 1)) * sign)} for k in (-1, 1))
        return self.best_of(w, (coarse, *fine), importance)

    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        s = params["scale"].float()
        x = w.float() / torch.where(s == 0, torch.ones_like(s), s)
        if self._lut is None:
            codes = torch.bucketize(x.contiguous(), self._mids.to(x.device))
        else:  # the same codes as bucketize, ~6x faster on a CPU (the level-set fits' search is most of their time)
            q, lo, table = self._lut
            idx = torch.ceil(x * q).clamp_(lo, lo + table.numel() - 1).to(torch.int64).sub_(lo)
            codes = table.to(x.device)[idx]
        return torch.where(s == 0, torch.full_like(codes, self._zero_code), codes)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return self.levels.to(codes.device)[codes] * params["scale"].float()


def _code_table(mids: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
    """Nearest-level codes by table lookup, for level sets whose midpoints lie on a lattice of step 1/q (q a small
    power of two: IQ4_NL's, nz2's, std2's). With no midpoint strictly inside ((i-1)/q, i/q], every x there has the
    code of i/q, so ``table[ceil(q x) - lo]`` equals ``bucketize(x, mids)`` (a midpoint itself takes the lower
    level, as bucketize does). None for other sets (bucketize is used)."""
    for q in (1, 2, 4, 8):
        scaled = mids * q
        if torch.equal(scaled, scaled.round()) and scaled.abs().max() < 4096:
            lo, hi = int(scaled.min()), int(scaled.max()) + 1
            return q, lo, torch.bucketize(torch.arange(lo, hi + 1, dtype=torch.float32) / q, mids)
    return None


def no_zero_levels(ratio: float) -> tuple[float, float, float, float]:
    """{-1, -r, r, 1}: the no-zero 2-bit set with inner/outer ratio r (r = 1/3 is {+-0.5, +-1.5} / 1.5)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"inner/outer ratio must be in (0, 1), got {ratio}")
    return (-1.0, -ratio, ratio, 1.0)


# ggml's kvalues_iq4nl: block_iq4_nl dequantizes to d * IQ4_NL_LEVELS[q] (ggml-common.h)
IQ4_NL_LEVELS = (-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                 1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0)

NAMED_LEVELS = {
    "nz2": (-1.5, -0.5, 0.5, 1.5),  # no-zero, ratio 1/3
    "pm12": (-2.0, -1.0, 1.0, 2.0),  # {+-1, +-2}, ratio 1/2
    "std2": (-2.0, -1.0, 0.0, 1.0),  # the standard 2-bit grid, MSE-fitted scale
}
