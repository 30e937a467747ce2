"""Exact nearest-codeword search in "sign-flip" 8-dimensional codebooks (IQ2_XXS, QuIP#'s E8P).

Both codebooks are built the same way: K non-negative 8-vectors ``v`` ("absolute patterns") times sign
patterns ``tau`` in {-1, +1}^8 whose number of negative signs has a fixed parity ``parity(v)`` (IQ2_XXS:
always even; E8P: the parity of ``sum(v)``, which keeps ``tau * v`` in D8-hat, the half-integer coset of E8).
The parity rule is what lets 7 stored bits describe 8 signs.

For a target ``y`` with non-negative weights ``w``, the error of ``tau * v`` is smallest with
``tau = sign(y)``; if that sign pattern has the wrong parity, exactly one coordinate must be flipped, and the
cheapest one costs ``4 * min_i w_i |y_i| v_i`` extra. So, exactly,

    err(v) = sum w y^2 + base(v) + [odd(y) != parity(v)] * 4 * flip(v),
    base(v) = sum w v^2 - 2 sum (w |y|) v,      flip(v) = min_i (w |y|)_i v_i.

:meth:`SignedCodebook.nearest` needs ``flip`` only for the few patterns whose ``base`` (a lower bound of their
error) is below the error of a known candidate, about one per vector on Gaussian data, so it costs little more
than one [N, 16] x [16, K] product. :meth:`SignedCodebook.costs` returns the whole tables for scale sweeps.
"""

from __future__ import annotations

import torch

_CHUNK = 16384  # vectors per step: bounds the [chunk, K] temporaries to a few tens of MB


class SignedCodebook:
    """K absolute patterns ``absv`` [K, 8] (>= 0) with the required parity of negative signs ``parity`` [K]."""

    def __init__(self, absv: torch.Tensor, parity: torch.Tensor):
        if absv.dim() != 2 or absv.shape[1] != 8 or (absv < 0).any():
            raise ValueError("absolute patterns must be a non-negative [K, 8] tensor")
        absv = absv.float().contiguous()
        parity = parity.to(torch.bool)
        self.levels = torch.unique(absv).tolist()
        # patterns of parity 0 come first in this order, so "best pattern of matching parity" is a slice min
        order = torch.argsort(parity.to(torch.int64), stable=True)
        self._k0 = int((~parity).sum())
        bits = 1 << torch.arange(8, dtype=torch.int64)
        self._cpu = {
            "absv": absv,
            "parity": parity,
            "order": order,
            # base(v) = [w, w|y|] @ base_mat (patterns in parity order): one product for both terms
            "base_mat": torch.cat([absv.square(), -2.0 * absv], dim=1)[order].t().contiguous(),
            "sq_t": absv.square().t().contiguous(),
            # per level, the coordinates of each pattern that hold it, as an 8-bit mask (a subset-table row)
            **{f"mask{i}": ((absv == lv).to(torch.int64) * bits).sum(1) for i, lv in enumerate(self.levels)},
        }
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _on(self, dev: torch.device) -> dict[str, torch.Tensor]:
        """The constant tensors on ``dev``, copied there once."""
        if dev not in self._by_device:
            self._by_device[dev] = {k: v.to(dev) for k, v in self._cpu.items()}
        return self._by_device[dev]

    # ----- exact nearest --------------------------------------------------------------------------
    def nearest(self, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact nearest signed codeword of each row of ``y`` [N, 8] under weights ``w`` [N, 8] (>= 0).

        Returns (pattern index [N] int64, negative-sign mask [N, 8] bool, weighted squared error [N]).
        """
        y, w = y.float(), w.float()
        idx = torch.empty(y.shape[0], dtype=torch.int64, device=y.device)
        err = torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
        for s in range(0, y.shape[0], _CHUNK):
            idx[s : s + _CHUNK], err[s : s + _CHUNK] = self._nearest_chunk(y[s : s + _CHUNK], w[s : s + _CHUNK])
        return idx, self.signs(y, w, idx), err

    def _nearest_chunk(self, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._on(y.device)
        order, absv, parity = t["order"], t["absv"], t["parity"]
        p = w * y.abs()
        odd = (y < 0).sum(1) % 2 == 1
        base = torch.cat([w, p], dim=1) @ t["base_mat"]  # [N, K], patterns in parity order

        def exact(rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # err - sum w y^2 of pattern k
            v = order[k]
            flip = (p[rows] * absv[v]).amin(1)
            return base[rows, k] + torch.where(odd[rows] != parity[v], 4.0 * flip, torch.zeros_like(flip))

        # two exact candidates: the best pattern needing no sign flip (its error is its base) and the best
        # pattern overall (the better of the two parity blocks' minima), with its flip penalty if it needs one
        k0 = self._k0
        even_e, even_k = _slice_min(base, 0, k0)
        odd_e, odd_k = _slice_min(base, k0, base.shape[1])
        odd_k += k0
        best_e, best_k = torch.where(odd, odd_e, even_e), torch.where(odd, odd_k, even_k)
        any_k = torch.where(odd_e < even_e, odd_k, even_k)
        rows = torch.arange(y.shape[0], device=y.device)
        any_e = exact(rows, any_k)
        take = any_e < best_e
        best_e, best_k = torch.where(take, any_e, best_e), torch.where(take, any_k, best_k)
        # any other pattern can only win if its base (a lower bound of its error) is below the best so far;
        # those are few (about one per vector on Gaussian data), so find the rows that have any first
        cand = base < best_e[:, None]
        sel = cand.any(1).nonzero()[:, 0]
        if sel.numel():
            r, k = cand[sel].nonzero(as_tuple=True)
            r = sel[r]
            e = exact(r, k)
            row_min = torch.full_like(best_e, float("inf")).scatter_reduce(0, r, e, "amin")
            better = row_min < best_e
            hit = (e == row_min[r]) & better[r]
            pick = torch.full_like(best_k, base.shape[1]).scatter_reduce(0, r[hit], k[hit], "amin")
            best_e, best_k = torch.where(better, row_min, best_e), torch.where(better, pick, best_k)
        return order[best_k], best_e + (w * y.square()).sum(1)

    def signs(self, y: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Negative-sign mask [N, 8] of the best signed version of pattern ``idx`` [N] for ``y``."""
        t = self._on(y.device)
        v = t["absv"][idx]
        neg = y < 0
        wrong = (neg.sum(1) % 2 == 1) != t["parity"][idx]
        flip = torch.nn.functional.one_hot((w * y.abs() * v).argmin(1), 8).to(torch.bool)
        return neg ^ (flip & wrong[:, None])

    # ----- full tables ----------------------------------------------------------------------------
    def costs(self, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C), each [N, K], such that err(v) = sum w y^2 + C - 2 B for targets ``y`` and weights ``w`` [N, 8].

        B includes the parity penalty. Scaling every pattern by t > 0 turns (B, C) into (t B, t^2 C) (the
        targets become y / t and the weights w t^2), which is what lets IQ2_XXS's fit sweep sub-block scales
        without recomputing them.
        """
        t = self._on(y.device)
        p = w * y.abs()
        pt = p.t().contiguous()
        b = t["absv"] @ pt  # pattern-major [K, N], as the flip table below
        odd = (y < 0).sum(1) % 2 == 1
        mismatch = odd[None, :] != t["parity"][:, None]
        b.sub_(self._flip_table(pt, t).mul_(mismatch).mul_(2.0))
        return b.t(), w @ t["sq_t"]

    def _flip_table(self, pt: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """flip(v) = min_i p_i v_i for every pattern and vector: [K, N], from ``pt`` = (w|y|)^T [8, N].

        The patterns use only a few distinct levels, so min_i p_i v_i = min over levels of level * (min of p
        over the coordinates holding it): a table of the minimum of p over each of the 256 coordinate subsets,
        and one row gather per level (pattern-major because whole-row gathers are fast).
        """
        sub = torch.empty((256, pt.shape[1]), dtype=pt.dtype, device=pt.device)  # sub[m] = min_{i in m} p_i
        sub[0] = float("inf")
        for b in range(8):
            lo = 1 << b
            torch.minimum(sub[:lo], pt[b], out=sub[lo : 2 * lo])
        out = None
        for i, lv in enumerate(self.levels):
            term = sub.index_select(0, t[f"mask{i}"]).mul_(lv)
            out = term if out is None else torch.minimum(out, term, out=out)
        return out


def _slice_min(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (min, argmin - lo) over columns [lo, hi); +inf when the slice is empty."""
    if hi <= lo:
        n = x.shape[0]
        return torch.full((n,), float("inf"), device=x.device), torch.zeros(n, dtype=torch.int64, device=x.device)
    v, i = x[:, lo:hi].min(1)
    return v, i
