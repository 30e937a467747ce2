"""llama.cpp's IQ2_XXS (2.0625 bits per weight), bit-exact, with an exact nearest-codeword encoder.

Layout (ggml ``block_iq2_xxs``): a superblock of 256 weights is a float16 ``d`` followed by 32 little-endian
uint16, read as 8 pairs of uint32 ``aux32[0], aux32[1]``, one pair per 32-weight sub-block. Byte ``k`` of
``aux32[0]`` indexes the 256-entry ``iq2xxs_grid`` for the ``k``-th 8-vector (entries 8, 25 or 43);
``aux32[1]`` holds four 7-bit sign indices (bits 7k..7k+6; ``ksigns_iq2xs`` expands each to 8 sign bits, the
8th making the count of negative signs even) and the 4-bit sub-block scale ``ls`` in bits 28..31. llama.cpp
dequantizes ``y = (d * (0.5f + ls) * 0.25f) * grid[j]``, negated where the sign bit is set; :meth:`decode`
does the same float32 operations in the same order, so the stored bytes decode to exactly what this format
reports (tested against ``gguf.quants.dequantize``). The grid and sign tables come from the ``gguf`` package.

Codes: one int64 per 8 weights, ``grid_index * 128 + sign_index`` (``sign_index`` = the 7 low sign bits).
Group parameters (one 256-column superblock): ``d`` [rows, 1] (float16 values held in float32) and ``ls``
[rows, n_sub] (the 4-bit sub-block scales as integer-valued float32). Rows must be a multiple of 32 long; a
row that is not a multiple of 256 ends in a shorter superblock (576 = 2 x 256 + 64) stored as 2 bytes of
``d`` + 8 bytes per sub-block present. For rows that are multiples of 256, the stored ``qs`` row is exactly
llama.cpp's ``block_iq2_xxs`` array for that row, so a GGUF writer can copy it verbatim.

Rounding: the 8-vector code is the exact nearest codeword (importance-weighted squared error) under the
parity rule: signs follow the weights, and when that gives an odd number of negatives, the coordinate whose
flip costs least *for each grid point* is flipped (llama.cpp picks the flip coordinate before the grid
point, which is at best as good). The fit (not llama.cpp's heuristic) searches each sub-block's scale over a grid of
candidates plus a least-squares refinement, then rounds ``d`` to float16 and picks each 4-bit ``ls`` among
the neighbours of the ideal value by the error it actually gives, over a few choices of ``d`` per row.
Without importance all weights count equally (llama.cpp's IQ2_XXS requires an imatrix and weights errors by
``imatrix * sqrt(sigma^2 + x^2)``; pass that as importance to use its weighting).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, Params, QuantizedTensor, keep_better
from lowbit.formats.signed_codebook import SignedCodebook

SUPER = 256  # weights per superblock (QK_K)
SUB = 32  # weights per sub-block (one 4-bit scale)
_BLOCK_BYTES = 2 + SUPER // 4  # sizeof(block_iq2_xxs) = 66
_GRID_MAX = 43.0
_MAX_LS_SCALE = (0.5 + 15) * 0.25  # effective scale / d at ls = 15
# sub-block scale candidates: the largest grid value (43) lands at this fraction of the largest |w|
_SCALE_CANDIDATES = torch.linspace(0.55, 1.1, 8).tolist()
_D_CANDIDATES = (1.0, 0.95, 1.05)  # d = max sub-block scale / 3.875 times these (ls = 15 at 1.0)
_ROW_CHUNK = 256  # rows fitted at once: bounds the [rows, n_vectors, 256] cost tables


@cache
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(``iq2xxs_grid`` as float32 [256, 8] with entries 8/25/43, ``ksigns_iq2xs`` as int64 [128])."""
    from gguf.quants import IQ2_XXS

    IQ2_XXS.init_grid()
    grid = torch.from_numpy(np.asarray(IQ2_XXS.grid, dtype=np.float32).reshape(256, 8).copy())
    ksigns = torch.tensor(list(IQ2_XXS.ksigns), dtype=torch.int64)
    return grid, ksigns


@cache
def _tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in tables())


@cache
def _codebook() -> SignedCodebook:
    grid, _ = tables()
    return SignedCodebook(grid, torch.zeros(256, dtype=torch.bool))  # always an even number of negatives


def check_cols(cols: int) -> None:
    if cols <= 0 or cols % SUB:
        raise LowbitError(f"iq2_xxs needs rows whose length is a multiple of {SUB} (sub-blocks of {SUB} weights, "
                          f"superblocks of {SUPER}); got {cols} columns")


def row_bytes(cols: int) -> int:
    """Stored bytes per row: 66 per full superblock, 2 + 8 per sub-block for a shorter last one."""
    check_cols(cols)
    full, rest = divmod(cols, SUPER)
    return full * _BLOCK_BYTES + (2 + rest // 4 if rest else 0)


def _weights(importance: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if importance is None:
        return torch.ones_like(like)
    return importance.float().to(like.device).expand_as(like).clamp_min(0.0)


class IQ2XXSFormat(Format):
    name = "iq2_xxs"
    group_size = SUPER
    vector_dim = 8
    float_params = ("d",)  # ls is a 4-bit integer
    bits = 2  # 2.06 bits a weight: an 8-bit grid index and 7 sign bits per 8 weights, 4-bit scales

    # ----- parameters -------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        check_cols(w.shape[1])
        w = w.float()
        imp = _weights(importance, w)
        chunks = range(0, w.shape[0], _ROW_CHUNK)
        parts = [self._fit_rows(w[r : r + _ROW_CHUNK], imp[r : r + _ROW_CHUNK]) for r in chunks]
        return {k: torch.cat([p[k] for p in parts]) for k in ("d", "ls")}

    def _fit_rows(self, w: torch.Tensor, imp: torch.Tensor) -> Params:
        rows, cols = w.shape
        nsub = cols // SUB
        # cost tables at unit scale, one row per 8-vector: err(t, g) = sum w x^2 + t^2 C - 2 t B for scale t
        b, c = _codebook().costs(w.reshape(-1, 8), imp.reshape(-1, 8))
        neg2b, c = (b * -2.0).contiguous(), c.contiguous()

        def per_vector(t: torch.Tensor) -> torch.Tensor:  # [rows, nsub] -> [rows * nsub * 4, 1], contiguous
            return t[..., None].expand(rows, nsub, 4).reshape(-1, 1)

        def sub_err(t: torch.Tensor) -> torch.Tensor:  # t: [rows, nsub] -> error (less a constant) [rows, nsub]
            # t >= 0, so min_g t (t C - 2 B) = t min_g (t C - 2 B): one fused pass over the table per call
            return torch.addcmul(neg2b, c, per_vector(t)).amin(1).reshape(rows, nsub, 4).sum(-1) * t

        # 1) continuous sub-block scales: candidate grid, then the least-squares scale of the best codes
        t0 = w.abs().reshape(rows, nsub, SUB).amax(-1) / _GRID_MAX
        best_t, best_e = t0, sub_err(t0)
        for f in _SCALE_CANDIDATES:
            best_t, best_e = keep_better((best_t, best_e), (t0 * f, sub_err(t0 * f)))
        g = torch.addcmul(neg2b, c, per_vector(best_t)).argmin(1, keepdim=True)
        num = b.gather(1, g).reshape(rows, nsub, 4).sum(-1)
        den = c.gather(1, g).reshape(rows, nsub, 4).sum(-1)
        t_ls = torch.where(den > 0, num / den.clamp_min(1e-30), best_t).clamp_min(0.0)
        e = sub_err(t_ls)
        best_t = torch.where(e < best_e, t_ls, best_t)

        # 2) float16 d per row and 4-bit ls per sub-block, judged by the error of what is stored
        tmax = best_t.amax(1, keepdim=True)
        best = None
        for f in _D_CANDIDATES:
            d = _fp16(tmax * f / _MAX_LS_SCALE)
            ls, err = self._best_ls(best_t, d, sub_err)
            best = keep_better(best, (d, ls, err.sum(1, keepdim=True)))
        return {"d": best[0], "ls": best[1]}

    @staticmethod
    def _best_ls(t: torch.Tensor, d: torch.Tensor,
                 sub_err: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block, the 4-bit scale next to the ideal t (and the error it gives) for super-scale d."""
        unit = d * 0.25
        l0 = torch.round(torch.where(unit > 0, t / unit.clamp_min(1e-30), torch.zeros_like(t)) - 0.5)
        best = None
        for dl in (-1.0, 0.0, 1.0):
            ls = (l0 + dl).clamp(0, 15)
            best = keep_better(best, (ls, sub_err(d * (0.5 + ls) * 0.25)))
        return best

    def expand(self, params: Params, cols: int) -> Params:
        """{"scale": [rows, cols]}: d * (0.5 + ls) * 0.25, computed in float32 as llama.cpp does."""
        d = params["d"].float().repeat_interleave(SUPER, dim=1)[:, :cols]
        ls = params["ls"].float().repeat_interleave(SUB, dim=1)[:, :cols]
        return {"scale": d * (0.5 + ls) * 0.25}

    # ----- rounding ---------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        rows, k = w.shape
        if k % 8:
            raise LowbitError(f"iq2_xxs encodes 8 columns at a time, got {k}")
        w = w.float()
        s = params["scale"].float().to(w.device).expand_as(w)
        # err = sum imp (x - s q)^2 = sum imp s^2 (x / s - q)^2: a nearest search in units of the scale
        y = torch.where(s > 0, w / s.clamp_min(1e-30), torch.zeros_like(w))
        wt = _weights(importance, w) * s.square()
        idx, neg, _ = _codebook().nearest(y.reshape(-1, 8), wt.reshape(-1, 8))
        sign7 = (neg[:, :7].to(torch.int64) << torch.arange(7, device=w.device)).sum(1)
        return (idx * 128 + sign7).reshape(rows, k // 8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        grid, ksigns = _tables_on(codes.device)
        rows, n = codes.shape
        vals = grid[codes >> 7].reshape(rows, n * 8)
        sbyte = ksigns[codes & 127]
        neg = ((sbyte[..., None] >> torch.arange(8, device=codes.device)) & 1).reshape(rows, n * 8).bool()
        y = params["scale"].float() * vals  # (db * grid[j]) first, then the sign, as in dequantize_row_iq2_xxs
        return torch.where(neg, -y, y)

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        return {"qs": ((rows, row_bytes(cols)), torch.uint8)}

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        rows, cols = shape
        check_cols(cols)
        if tuple(codes.shape) != (rows, cols // 8):
            raise LowbitError(f"iq2_xxs: codes of shape {tuple(codes.shape)} do not match weight shape {shape}")
        codes = codes.to(torch.int64)
        d16 = params["d"].to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF  # [rows, n_super]
        ls = params["ls"].to(torch.int64)
        if codes.min() < 0 or codes.max() >= 256 * 128 or ls.min() < 0 or ls.max() > 15:
            raise LowbitError("iq2_xxs: codes or sub-block scales out of range")
        q = codes.reshape(rows, cols // SUB, 4)
        aux0 = q >> 7  # the four grid indices are the four bytes of aux32[0]
        aux1 = ((q & 127) << torch.tensor([0, 7, 14, 21], device=q.device)).sum(-1) | (ls << 28)
        aux1_bytes = (aux1[..., None] >> torch.tensor([0, 8, 16, 24], device=q.device)) & 255
        sub = torch.cat([aux0, aux1_bytes], dim=-1)  # [rows, n_sub, 8]
        out = []
        for j, s0 in enumerate(range(0, cols // SUB, SUPER // SUB)):
            s1 = min(s0 + SUPER // SUB, cols // SUB)
            out += [d16[:, j : j + 1] & 255, d16[:, j : j + 1] >> 8, sub[:, s0:s1].reshape(rows, -1)]
        qs = torch.cat(out, dim=1).to(torch.uint8).contiguous()
        return QuantizedTensor(self.name, (rows, cols), {"qs": qs})

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        rows, cols = qt.shape
        qs = qt.data["qs"].to(torch.int64)
        if tuple(qs.shape) != (rows, row_bytes(cols)):
            raise LowbitError(f"iq2_xxs: stored qs {tuple(qs.shape)} does not match weight shape {qt.shape}")
        d16, subs = [], []
        for c0 in range(0, cols, SUPER):
            o = c0 // SUPER * _BLOCK_BYTES
            n_sub = min(SUPER, cols - c0) // SUB
            d16.append(qs[:, o : o + 1] | (qs[:, o + 1 : o + 2] << 8))
            subs.append(qs[:, o + 2 : o + 2 + 8 * n_sub].reshape(rows, n_sub, 8))
        d16 = torch.cat(d16, dim=1)
        d = torch.where(d16 >= 32768, d16 - 65536, d16).to(torch.int16).view(torch.float16).float()
        sub = torch.cat(subs, dim=1)
        aux1 = (sub[..., 4:] << torch.tensor([0, 8, 16, 24], device=qs.device)).sum(-1)
        sign7 = (aux1[..., None] >> torch.tensor([0, 7, 14, 21], device=qs.device)) & 127
        codes = (sub[..., :4] * 128 + sign7).reshape(rows, cols // 8)
        return codes, {"d": d, "ls": (aux1 >> 28).float()}


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 65504.0).to(torch.float16).float()
