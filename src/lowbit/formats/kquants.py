"""llama.cpp's k-quants, bit-exact: Q2_K (2.625 bits per weight).

Layout (ggml ``block_q2_K``, 84 bytes per superblock of 256 weights): ``uint8 scales[16]`` (low nibble: the 4-bit
scale ``sc`` of a 16-weight sub-block, high nibble: its 4-bit min ``mn``), ``uint8 qs[64]`` (2-bit codes), fp16
``d``, fp16 ``dmin``. ``qs`` holds two halves of 128 weights in 32 bytes each: weight ``32 j + m`` of a half
(j = 0..3, m = 0..31) is bits ``2j, 2j+1`` of byte ``m`` of that half. Sub-block ``s`` covers weights
``16 s .. 16 s + 15`` in natural order. llama.cpp dequantizes ``y = (d * sc) * q - (dmin * mn)`` in float32;
:meth:`Q2KFormat.decode` does the same operations in the same order, so the stored bytes decode to exactly what this
format reports (tested against ``gguf.quants.dequantize``). Rows must be multiples of 256 long; each stored row is
exactly llama.cpp's ``block_q2_K`` array for that row, so a GGUF writer copies it verbatim.

Codes: one int64 in 0..3 per weight. Group parameters (one 256-column superblock; a fit over several superblocks
returns one set per superblock): ``d``, ``dmin`` [rows, 1] (float16 values held in float32) and ``sc``, ``mn``
[rows, 16] (4-bit integers held in float32). :meth:`Q2KFormat.expand` gives per-column ``scale = d * sc`` and
``min = dmin * mn``, so ``encode`` is ``clamp(round((w + min) / scale), 0, 3)`` and works column by column in GPTQ.

Fit (in the spirit of llama.cpp's ``make_qkx2_quants``, importance-weighted when importance is given, uniformly
weighted otherwise): per sub-block, an asymmetric 2-bit (scale >= 0, w_min = -min <= 0) from the min/max range
and a grid of 16 range-stretch factors, each refined by the weighted least-squares (scale, min) of its codes; then
``d = max(scale) / 15`` and ``dmin = max(min) / 15`` (a few multiples of each are tried per superblock), rounded to
float16, the 4-bit scales and mins rounded to nearest against them, and the codes re-encoded with what is stored;
per superblock the candidate with the least (weighted) error of the stored weights is kept.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, Params, QuantizedTensor, keep_better

QK_K = 256  # weights per superblock
SUB = 16  # weights per sub-block (one 4-bit scale and min)
N_SUB = QK_K // SUB
Q2K_BLOCK_BYTES = N_SUB + QK_K // 4 + 4  # sizeof(block_q2_K) = 84
_NMAX = 3
# make_qkx2_quants(nmax=3, rmin=-0.5, rdelta=0.1, nstep=15): iscale = (nmax + rmin + rdelta * i) / (max - min)
_STRETCH = [_NMAX - 0.5 + 0.1 * i for i in range(16)]
_D_FACTORS = (1.0, 0.9, 1.1)  # d (and dmin) candidates: max / 15 times these


def check_cols(cols: int) -> None:
    if cols <= 0 or cols % QK_K:
        raise LowbitError(f"q2_k needs rows whose length is a multiple of {QK_K} (llama.cpp block_q2_K superblocks "
                          f"of {QK_K} weights); got {cols} columns")


def _weights(importance: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if importance is None:
        return torch.ones_like(like)
    return importance.float().to(like.device).expand_as(like).clamp_min(0.0)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 65504.0).to(torch.float16).float()


def _f16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def _from_f16_bits(b: torch.Tensor) -> torch.Tensor:
    return torch.where(b >= 32768, b - 65536, b).to(torch.int16).view(torch.float16).float()


class Q2KFormat(Format):
    name = "q2_k"
    group_size = QK_K
    float_params = ("d", "dmin")  # sc/mn are 4-bit integers

    # ----- parameters -------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        check_cols(w.shape[1])
        w = w.float()
        rows, cols = w.shape
        nsb = cols // QK_K
        imp = _weights(importance, w)
        x = w.reshape(rows, nsb, N_SUB, SUB)
        wt = imp.reshape(rows, nsb, N_SUB, SUB)
        scale, wmin = _fit_sub_blocks(x, wt)  # [rows, nsb, N_SUB]: scale >= 0, wmin <= 0
        mins = -wmin
        max_s, max_m = scale.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
        best = None
        for fd in _D_FACTORS:
            d = _fp16(max_s / 15 * fd)
            sc = _round_to(scale, d)
            for fm in _D_FACTORS:
                dmin = _fp16(max_m / 15 * fm)
                mn = _round_to(mins, dmin)
                s_col = (d * sc)[..., None]  # exactly expand()'s float32 products
                m_col = (dmin * mn)[..., None]
                q = _encode(x, s_col, m_col)
                err = ((s_col * q - m_col - x).square() * wt).sum((-1, -2))[..., None]  # [rows, nsb, 1]
                best = keep_better(best, (d, dmin, sc, mn, err))
        d, dmin, sc, mn, _ = best
        return {"d": d.reshape(rows, nsb), "dmin": dmin.reshape(rows, nsb),
                "sc": sc.reshape(rows, nsb * N_SUB), "mn": mn.reshape(rows, nsb * N_SUB)}

    def expand(self, params: Params, cols: int) -> Params:
        """{"scale", "min"}: [rows, cols] float32 ``d * sc`` and ``dmin * mn``, as llama.cpp computes them."""
        d = params["d"].float().repeat_interleave(N_SUB, dim=1)
        dmin = params["dmin"].float().repeat_interleave(N_SUB, dim=1)
        scale = (d * params["sc"].float()).repeat_interleave(SUB, dim=1)[:, :cols]
        mins = (dmin * params["mn"].float()).repeat_interleave(SUB, dim=1)[:, :cols]
        return {"scale": scale, "min": mins}

    # ----- rounding ---------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        return _encode(w.float(), params["scale"].float().to(w.device), params["min"].float().to(w.device)) \
            .to(torch.int64)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        # dequantize_row_q2_K: dl * q - ml with dl = d * sc and ml = dmin * mn (float32)
        return params["scale"].float() * codes.float() - params["min"].float()

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        check_cols(cols)
        return {"qs": ((rows, cols // QK_K * Q2K_BLOCK_BYTES), torch.uint8)}

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        rows, cols = shape
        check_cols(cols)
        nsb = cols // QK_K
        if tuple(codes.shape) != (rows, cols):
            raise LowbitError(f"q2_k: codes of shape {tuple(codes.shape)} do not match weight shape {shape}")
        codes = codes.to(torch.int64)
        sc, mn = params["sc"].to(torch.int64), params["mn"].to(torch.int64)
        if tuple(sc.shape) != (rows, nsb * N_SUB) or tuple(mn.shape) != (rows, nsb * N_SUB) \
                or tuple(params["d"].shape) != (rows, nsb) or tuple(params["dmin"].shape) != (rows, nsb):
            raise LowbitError(f"q2_k: parameters do not match weight shape {shape}")
        if codes.min() < 0 or codes.max() > 3 or sc.min() < 0 or sc.max() > 15 or mn.min() < 0 or mn.max() > 15:
            raise LowbitError("q2_k: codes, scales or mins out of range")
        dev = codes.device
        scales = (sc | (mn << 4)).reshape(rows, nsb, N_SUB)
        # [rows, nsb, half, j, m] -> byte m of half = sum_j code << 2j
        q = codes.reshape(rows, nsb, 2, 4, 32) << (2 * torch.arange(4, device=dev)).reshape(1, 1, 1, 4, 1)
        qs = q.sum(3).reshape(rows, nsb, QK_K // 4)
        shifts = torch.tensor([0, 8], device=dev)
        d = (_f16_bits(params["d"])[..., None] >> shifts) & 255
        dmin = (_f16_bits(params["dmin"])[..., None] >> shifts) & 255
        blocks = torch.cat([scales, qs, d, dmin], dim=-1)  # [rows, nsb, 84]
        return QuantizedTensor(self.name, (rows, cols), {"qs": blocks.reshape(rows, -1).to(torch.uint8).contiguous()})

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        rows, cols = qt.shape
        check_cols(cols)
        nsb = cols // QK_K
        raw = qt.data["qs"]
        if tuple(raw.shape) != (rows, nsb * Q2K_BLOCK_BYTES):
            raise LowbitError(f"q2_k: stored qs {tuple(raw.shape)} does not match weight shape {qt.shape}")
        b = raw.to(torch.int64).reshape(rows, nsb, Q2K_BLOCK_BYTES)
        scales, qs = b[..., :N_SUB], b[..., N_SUB : N_SUB + QK_K // 4]
        o = N_SUB + QK_K // 4
        d = _from_f16_bits(b[..., o] | (b[..., o + 1] << 8))
        dmin = _from_f16_bits(b[..., o + 2] | (b[..., o + 3] << 8))
        shifts = (2 * torch.arange(4, device=raw.device)).reshape(1, 1, 1, 4, 1)
        codes = ((qs.reshape(rows, nsb, 2, 1, 32) >> shifts) & 3).reshape(rows, cols)
        return codes, {"d": d, "dmin": dmin, "sc": (scales & 15).reshape(rows, -1).float(),
                       "mn": (scales >> 4).reshape(rows, -1).float()}


def _encode(x: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """clamp(round((x + min) / scale), 0, 3) as float; code 0 where the scale is 0."""
    scale = scale.expand_as(x)
    y = torch.where(scale > 0, (x + mins) / scale.clamp_min(1e-30), torch.zeros_like(x))
    return torch.clamp(torch.round(y), 0, _NMAX)


def _round_to(v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """4-bit nearest multiples of ``unit`` (0 where the unit is 0)."""
    return torch.where(unit > 0, torch.round(v / unit.clamp_min(1e-30)), torch.zeros_like(v)).clamp(0, 15)


def _fit_sub_blocks(x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last axis), the weighted-least-error 2-bit (scale >= 0, min <= 0) with x ~ scale * q + min."""
    lo = x.amin(-1).clamp_max(0.0)
    hi = x.amax(-1)
    rng = hi - lo
    inv_rng = torch.where(rng > 0, 1.0 / rng.clamp_min(1e-30), torch.zeros_like(rng))

    sw = wt.sum(-1)
    sx = (wt * x).sum(-1)
    sx2 = (wt * x * x).sum(-1)

    def error(scale: torch.Tensor, wmin: torch.Tensor, sl: torch.Tensor, sl2: torch.Tensor,
              sxl: torch.Tensor) -> torch.Tensor:
        """sum wt (scale q + wmin - x)^2 from the weighted moments of q and x (no pass over the weights)."""
        return (sx2 + scale * (scale * sl2 - 2 * sxl) + wmin * (wmin * sw - 2 * sx + 2 * scale * sl)).clamp_min(0.0)

    def moments(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wq = wt * q
        return wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)

    best = None
    for stretch in (_NMAX, *_STRETCH):  # plain min/max first, then make_qkx2's stretched ranges
        q = torch.clamp(torch.round((x - lo[..., None]) * (stretch * inv_rng)[..., None]), 0, _NMAX)
        sl, sl2, sxl = moments(q)
        if best is None:  # the min/max candidate as is
            best = (rng / _NMAX, lo, error(rng / _NMAX, lo, sl, sl2, sxl))
        det = sw * sl2 - sl * sl
        ok = det > 0
        safe = det.clamp_min(1e-30)
        scale = torch.where(ok, (sw * sxl - sx * sl) / safe, torch.zeros_like(det))
        wmin = torch.where(ok, (sl2 * sx - sl * sxl) / safe, lo)
        # the min may not be positive (q2_K stores -min as an unsigned 4-bit multiple of dmin)
        pos = wmin > 0
        scale = torch.where(pos, torch.where(sl2 > 0, sxl / sl2.clamp_min(1e-30), torch.zeros_like(sl2)), scale)
        wmin = torch.where(pos, torch.zeros_like(wmin), wmin)
        scale = scale.clamp_min(0.0)
        best = keep_better(best, (scale, wmin, error(scale, wmin, sl, sl2, sxl)))
    return best[0], best[1]
