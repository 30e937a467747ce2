"""llama.cpp's k-quants, bit-exact: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.

A k-quant row is a run of superblocks of 256 weights (ggml ``block_q*_K``), each split into sub-blocks of 16 or 32
weights that have an integer scale (and, for the scale + min types, an integer min) relative to fp16 super-scales:

| type | sub-block | code ``q`` | weight | integers per sub-block | fp16 | bytes | bits/weight |
|---|---|---|---|---|---|---|---|
| Q2_K | 16 | 0..3 | ``(d sc) q - (dmin mn)`` | 4-bit ``sc``, ``mn`` | ``d``, ``dmin`` | 84 | 2.625 |
| Q3_K | 16 | 0..7 | ``(d sc) (q - 4)`` | 6-bit ``sc`` in -32..31 | ``d`` | 110 | 3.4375 |
| Q4_K | 32 | 0..15 | ``(d sc) q - (dmin mn)`` | 6-bit ``sc``, ``mn`` | ``d``, ``dmin`` | 144 | 4.5 |
| Q5_K | 32 | 0..31 | ``(d sc) q - (dmin mn)`` | 6-bit ``sc``, ``mn`` | ``d``, ``dmin`` | 176 | 5.5 |
| Q6_K | 16 | 0..63 | ``(d sc) (q - 32)`` | int8 ``sc`` | ``d`` | 210 | 6.5625 |

ggml's dequantize_row_q*_K computes ``d * sc`` (and ``dmin * mn``) in float32 first, then one multiply (and one
subtract) per weight; :meth:`KQuantFormat.decode` does the same operations in the same order, so the stored bytes
decode to exactly what the format reports (tested against ``gguf.quants.dequantize``). Rows must be multiples of
256 long; each stored row (``qs``) is exactly llama.cpp's block array for that row, so a GGUF writer copies it
verbatim. For other rows llama.cpp writes another type (:attr:`KQuantFormat.fallback`).

Byte layouts (ggml-common.h; ``L`` is a superblock's codes in natural order, ``L[i]`` covers weight ``i``, and
weight ``i`` belongs to sub-block ``i // sub``):

* Q2_K: ``scales[16]`` (``sc | mn << 4``), ``qs[64]``, ``d``, ``dmin``. ``qs`` holds two halves of 128 weights in
  32 bytes each: weight ``128 h + 32 j + m`` is bits ``2j, 2j+1`` of byte ``32 h + m``.
* Q3_K: ``hmask[32]`` (bit 2 of ``L[32 k + m]`` is bit ``k`` of byte ``m``), ``qs[64]`` (the low 2 bits, as Q2_K),
  ``scales[12]`` (``sc + 32`` as 6 bits: low nibbles of sub-blocks ``k`` and ``k + 8`` in byte ``k``, the top 2
  bits of sub-block ``4 a + m`` at bits ``2a`` of byte ``8 + m``), ``d``.
* Q4_K: ``d``, ``dmin``, ``scales[12]`` (ggml's get_scale_min_k4 packing of 8 six-bit scales and 8 mins),
  ``qs[128]`` (weight ``64 c + 32 a + m`` is the nibble ``a`` of byte ``32 c + m``).
* Q5_K: as Q4_K with ``qh[32]`` before ``qs``: bit 4 of ``L[32 k + m]`` is bit ``k`` of ``qh[m]``.
* Q6_K: ``ql[128]`` (weight ``128 h + 64 a + 32 b + m`` is the nibble ``a`` of byte ``64 h + 32 b + m``),
  ``qh[64]`` (its top 2 bits at bits ``2k`` of byte ``32 h + m`` for weight ``128 h + 32 k + m``), int8
  ``scales[16]``, ``d``.

Codes: one int64 per weight, ggml's unsigned ``L``. Group parameters (one superblock; a fit over several returns one
set per superblock, concatenated): ``d`` (and ``dmin``) [rows, 1] (float16 values held in float32) and ``sc`` (and
``mn``) [rows, n_sub] (integers held in float32). :meth:`KQuantFormat.expand` gives per-column ``scale = d * sc``
(and ``min = dmin * mn``), so ``encode`` is nearest rounding column by column (GPTQ), and ``+ft`` tunes ``d`` (and
``dmin``) with the codes and integers fixed.

Fit (in the spirit of llama.cpp's make_qkx2_quants / make_qx_quants; importance-weighted when importance is given,
uniformly weighted otherwise: the error that is minimized is the one of what is stored):

* sub-blocks: scale + min types try an asymmetric grid from the min/max range stretched by a set of factors, each
  refined by the weighted least-squares (scale, min) of its codes (the min may not be positive); scale-only types try
  signed scales mapping the largest-magnitude weight to either end of the code range at a set of stretches, each
  refined by least squares. The least weighted error wins.
* superblock: ``d`` (and ``dmin``) maps the largest sub-block scale (min) onto the top of the integer range, times a
  few factors (scale-only types: either end of the signed range), rounded to float16; the integers are rounded to
  nearest against it and the codes re-encoded with what is stored; per superblock the least error is kept.
* :attr:`KQuantFormat.refine` (all but Q2_K, whose fit is kept as measured in docs/gguf.md): the scale + min
  sub-block search makes a second pass with the range anchored at the best min so far (make_qkx2_quants moves its
  min the same way), and after the superblock step each sub-block's integers are moved by -1, 0 or +1 where that
  lowers its error with the codes re-encoded. On random Gaussian rows the weight MSE is 4-10% below llama.cpp's
  reference quantizer's (tests/test_kquants.py).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, Params, QuantizedTensor, keep_better

QK_K = 256  # weights per superblock
_D_FACTORS = (1.0, 0.9, 1.1)  # super-scale candidates: (largest sub-block scale / top integer) times these
_STEPS = (-1, 0, 1)  # sub-block integer moves tried after the superblock is fixed


class KQuantFormat(Format):
    """What the k-quants share: 256-weight superblocks stored as ggml's bytes, integer sub-block parameters against
    fp16 super-scales, and the pack/unpack driven by each type's field list."""

    group_size = QK_K
    sub: int  # weights per sub-block
    bits: int  # bits per code
    fallback: str  # llama.cpp's type for rows that do not fill superblocks (llama-quant.cpp tensor_type_fallback)
    ints: dict[str, tuple[int, int]]  # integer sub-block parameters -> their stored range
    halves: tuple[str, ...]  # fp16 superblock parameters
    fields: tuple[tuple[str, int], ...]  # ggml's block_q*_K members in order, with their sizes in bytes
    refine: bool = True  # the second sub-block pass and the +-1 integer moves (module docstring)

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    @property
    def block_bytes(self) -> int:
        return sum(n for _, n in self.fields)

    def check_cols(self, cols: int) -> None:
        if cols <= 0 or cols % QK_K:
            raise LowbitError(f"{self.name} needs rows whose length is a multiple of {QK_K} (llama.cpp "
                              f"block_{self.name[:2]}_K superblocks of {QK_K} weights); got {cols} columns")

    def _blocks(self, w: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``w`` and its error weights as [rows, superblocks, n_sub, sub]."""
        self.check_cols(w.shape[1])
        w = w.float()
        imp = torch.ones_like(w) if importance is None else \
            importance.float().to(w.device).expand_as(w).clamp_min(0.0)
        shape = (w.shape[0], w.shape[1] // QK_K, self.n_sub, self.sub)
        return w.reshape(shape), imp.reshape(shape)

    def _sub_to_cols(self, v: torch.Tensor, cols: int) -> torch.Tensor:
        return v.repeat_interleave(self.sub, dim=1)[:, :cols]

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        self.check_cols(cols)
        return {"qs": ((rows, cols // QK_K * self.block_bytes), torch.uint8)}

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        rows, cols = shape
        self.check_cols(cols)
        nsb = cols // QK_K
        if tuple(codes.shape) != (rows, cols):
            raise LowbitError(f"{self.name}: codes of shape {tuple(codes.shape)} do not match weight shape {shape}")
        if any(tuple(params[k].shape) != (rows, nsb) for k in self.halves) \
                or any(tuple(params[k].shape) != (rows, nsb * self.n_sub) for k in self.ints):
            raise LowbitError(f"{self.name}: parameters do not match weight shape {shape}")
        codes = codes.to(torch.int64)
        ints = {k: params[k].round().to(torch.int64) for k in self.ints}
        if codes.min() < 0 or codes.max() >= 1 << self.bits \
                or any(v.min() < self.ints[k][0] or v.max() > self.ints[k][1] for k, v in ints.items()):
            raise LowbitError(f"{self.name}: codes, scales or mins out of range")
        fields = self._lay_out(codes.reshape(rows, nsb, QK_K),
                               {k: v.reshape(rows, nsb, self.n_sub) for k, v in ints.items()})
        fields.update({k: _f16_bytes(params[k]) for k in self.halves})
        blocks = torch.cat([fields[name] for name, _ in self.fields], dim=-1)  # [rows, nsb, block_bytes]
        return QuantizedTensor(self.name, (rows, cols), {"qs": blocks.reshape(rows, -1).to(torch.uint8).contiguous()})

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        rows, cols = qt.shape
        self.check_cols(cols)
        nsb = cols // QK_K
        raw = qt.data["qs"]
        if tuple(raw.shape) != (rows, nsb * self.block_bytes):
            raise LowbitError(f"{self.name}: stored qs {tuple(raw.shape)} does not match weight shape {qt.shape}")
        b = raw.to(torch.int64).reshape(rows, nsb, self.block_bytes)
        fields = dict(zip([n for n, _ in self.fields], b.split([s for _, s in self.fields], dim=-1), strict=True))
        codes, ints = self._read(fields)
        params = {k: _from_f16_bytes(fields[k]) for k in self.halves}
        params.update({k: v.reshape(rows, -1).float() for k, v in ints.items()})
        return codes.reshape(rows, cols), params

    @abstractmethod
    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Codes [rows, nsb, 256] and integers [rows, nsb, n_sub] -> the byte fields other than the fp16 ones."""

    @abstractmethod
    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Inverse of :meth:`_lay_out`."""


# ----- scale + min types: Q2_K, Q4_K, Q5_K ------------------------------------------------------------------------
class _ScaleMinKQuant(KQuantFormat):
    """``w = (d sc) q - (dmin mn)``: unsigned codes, unsigned integer scales and mins, fp16 ``d`` and ``dmin``."""

    float_params = ("d", "dmin")  # sc/mn are integers
    halves = ("d", "dmin")
    top: int  # largest stored sc / mn
    stretches: tuple[float, ...]  # make_qkx2's iscale multipliers nmax + rmin + rdelta * i

    @property
    def ints(self) -> dict[str, tuple[int, int]]:
        return {"sc": (0, self.top), "mn": (0, self.top)}

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        x, wt = self._blocks(w, importance)
        rows, nsb = x.shape[:2]
        nmax = (1 << self.bits) - 1
        scale, wmin = _fit_sub_blocks(x, wt, nmax, self.stretches, self.refine)  # scale >= 0, wmin <= 0
        mins = -wmin
        max_s, max_m = scale.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
        best = None
        for fd in _D_FACTORS:
            d = _fp16(max_s / self.top * fd)
            sc = _round_to(scale, d, 0, self.top)
            for fm in _D_FACTORS:
                dmin = _fp16(max_m / self.top * fm)
                mn = _round_to(mins, dmin, 0, self.top)
                err = self._error(x, wt, d, dmin, sc, mn).sum((-1, -2))[..., None]  # [rows, nsb, 1]
                best = keep_better(best, (d, dmin, sc, mn, err))
        d, dmin, sc, mn, _ = best
        if self.refine:
            sc, mn = _refine(lambda s, m: self._error(x, wt, d, dmin, s, m).sum(-1), (sc, mn), 0, self.top)
        return {"d": d.reshape(rows, nsb), "dmin": dmin.reshape(rows, nsb),
                "sc": sc.reshape(rows, nsb * self.n_sub), "mn": mn.reshape(rows, nsb * self.n_sub)}

    def _error(self, x: torch.Tensor, wt: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor,
               mn: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per weight of what these parameters store, the codes re-encoded against them."""
        s_col = (d * sc)[..., None]  # exactly expand()'s float32 products
        m_col = (dmin * mn)[..., None]
        q = _encode_asym(x, s_col, m_col, (1 << self.bits) - 1)
        return (s_col * q - m_col - x).square() * wt

    def expand(self, params: Params, cols: int) -> Params:
        """{"scale", "min"}: [rows, cols] float32 ``d * sc`` and ``dmin * mn``, as llama.cpp computes them."""
        d = params["d"].float().repeat_interleave(self.n_sub, dim=1)
        dmin = params["dmin"].float().repeat_interleave(self.n_sub, dim=1)
        return {"scale": self._sub_to_cols(d * params["sc"].float(), cols),
                "min": self._sub_to_cols(dmin * params["mn"].float(), cols)}

    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        scale, mins = params["scale"].float().to(w.device), params["min"].float().to(w.device)
        return _encode_asym(w.float(), scale, mins, (1 << self.bits) - 1).to(torch.int64)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        # dequantize_row_q{2,4,5}_K: dl * q - ml with dl = d * sc and ml = dmin * mn (float32)
        return params["scale"].float() * codes.float() - params["min"].float()


class Q2KFormat(_ScaleMinKQuant):
    name = "q2_k"
    sub, bits, top, fallback = 16, 2, 15, "q4_0"
    # make_qkx2_quants(nmax=3, rmin=-0.5, rdelta=0.1, nstep=15)
    stretches = tuple(3 - 0.5 + 0.1 * i for i in range(16))
    refine = False  # its fit stays the one measured in docs/gguf.md
    fields = (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))

    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"scales": ints["sc"] | ints["mn"] << 4, "qs": _pack(codes, (2, 4, 32), 1, 2)}

    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = fields["scales"]
        return _unpack(fields["qs"], (2, 4, 32), 1, 2), {"sc": s & 15, "mn": s >> 4}


class Q4KFormat(_ScaleMinKQuant):
    name = "q4_k"
    sub, bits, top, fallback = 32, 4, 63, "int5_g32_sym"  # Q5_0
    # make_qkx2_quants(nmax=15, rmin=-1, rdelta=0.1, nstep=20) and make_qkx3's (-0.9, 0.05, 36): every 0.05 in
    # nmax - 1 .. nmax + 1
    stretches = tuple(15 - 1 + 0.05 * i for i in range(41))
    fields = (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))

    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"scales": _scales_k4(ints["sc"], ints["mn"]), "qs": _pack(codes, (4, 2, 32), 1, 4)}

    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sc, mn = _scales_k4_read(fields["scales"])
        return _unpack(fields["qs"], (4, 2, 32), 1, 4), {"sc": sc, "mn": mn}


class Q5KFormat(_ScaleMinKQuant):
    name = "q5_k"
    sub, bits, top, fallback = 32, 5, 63, "int5_g32_asym"  # Q5_1
    # make_qkx2_quants(nmax=31, rmin=-0.5, rdelta=0.1, nstep=15) and make_qkx3's (-0.9, 0.05, 36)
    stretches = tuple(31 - 1 + 0.05 * i for i in range(41))
    fields = (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))

    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"scales": _scales_k4(ints["sc"], ints["mn"]), "qh": _pack(codes >> 4, (8, 32), 0, 1),
                "qs": _pack(codes & 15, (4, 2, 32), 1, 4)}

    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sc, mn = _scales_k4_read(fields["scales"])
        codes = _unpack(fields["qs"], (4, 2, 32), 1, 4) | _unpack(fields["qh"], (8, 32), 0, 1) << 4
        return codes, {"sc": sc, "mn": mn}


# ----- scale-only types: Q3_K, Q6_K -------------------------------------------------------------------------------
class _ScaleKQuant(KQuantFormat):
    """``w = (d sc) (q - 2^(bits-1))``: signed levels, signed integer scales, one fp16 ``d`` (of either sign)."""

    float_params = ("d",)  # sc is an integer
    halves = ("d",)
    sc_range: tuple[int, int]  # stored sc, lowest and highest
    stretches = tuple(0.1 * i for i in range(-9, 10))  # make_qx_quants: iscale = -(nmax + 0.1 is) / max

    @property
    def ints(self) -> dict[str, tuple[int, int]]:
        return {"sc": self.sc_range}

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        x, wt = self._blocks(w, importance)
        rows, nsb = x.shape[:2]
        scale = _fit_signed_sub_blocks(x, wt, self.offset, self.stretches)  # [rows, nsb, n_sub]
        biggest = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))  # [rows, nsb, 1], signed
        best = None
        for end in self.sc_range:  # the largest |scale| onto -32 (as ggml does) or onto +31
            for f in _D_FACTORS:
                d = _fp16(biggest / end * f, signed=True)
                sc = _round_to(scale, d, *self.sc_range)
                best = keep_better(best, (d, sc, self._error(x, wt, d, sc).sum((-1, -2))[..., None]))
        d, sc, _ = best
        if self.refine:
            (sc,) = _refine(lambda s: self._error(x, wt, d, s).sum(-1), (sc,), *self.sc_range)
        return {"d": d.reshape(rows, nsb), "sc": sc.reshape(rows, nsb * self.n_sub)}

    def _error(self, x: torch.Tensor, wt: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per weight of what these parameters store, the codes re-encoded against them."""
        s_col = (d * sc)[..., None]
        level = _encode_sym(x, s_col, self.offset) - self.offset
        return (s_col * level - x).square() * wt

    def expand(self, params: Params, cols: int) -> Params:
        """{"scale"}: [rows, cols] float32 ``d * sc``, as llama.cpp computes it."""
        d = params["d"].float().repeat_interleave(self.n_sub, dim=1)
        return {"scale": self._sub_to_cols(d * params["sc"].float(), cols)}

    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        return _encode_sym(w.float(), params["scale"].float().to(w.device), self.offset).to(torch.int64)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        # dequantize_row_q3_K / q6_K: (d * sc) * (q - offset) in float32, the level an exact small integer
        return params["scale"].float() * (codes - self.offset).float()


class Q3KFormat(_ScaleKQuant):
    name = "q3_k"
    sub, bits, sc_range, fallback = 16, 3, (-32, 31), "q4_0"
    fields = (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))

    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = ints["sc"] + 32  # 6-bit unsigned
        return {"hmask": _pack(codes >> 2, (8, 32), 0, 1), "qs": _pack(codes & 3, (2, 4, 32), 1, 2),
                "scales": torch.cat([_pack(u & 15, (2, 8), 0, 4), _pack(u >> 4, (4, 4), 0, 2)], dim=-1)}

    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = fields["scales"]
        u = _unpack(s[..., :8], (2, 8), 0, 4) | _unpack(s[..., 8:], (4, 4), 0, 2) << 4
        codes = _unpack(fields["qs"], (2, 4, 32), 1, 2) | _unpack(fields["hmask"], (8, 32), 0, 1) << 2
        return codes, {"sc": u - 32}


class Q6KFormat(_ScaleKQuant):
    name = "q6_k"
    sub, bits, sc_range, fallback = 16, 6, (-128, 127), "q8_0"
    fields = (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))

    def _lay_out(self, codes: torch.Tensor, ints: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ql": _pack(codes & 15, (2, 2, 2, 32), 1, 4), "qh": _pack(codes >> 4, (2, 4, 32), 1, 2),
                "scales": ints["sc"] & 255}  # int8, two's complement

    def _read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = fields["scales"]
        codes = _unpack(fields["ql"], (2, 2, 2, 32), 1, 4) | _unpack(fields["qh"], (2, 4, 32), 1, 2) << 4
        return codes, {"sc": torch.where(s >= 128, s - 256, s)}


K_QUANTS: dict[str, type[KQuantFormat]] = {c.name: c for c in (Q2KFormat, Q3KFormat, Q4KFormat, Q5KFormat, Q6KFormat)}


# ----- bytes ------------------------------------------------------------------------------------------------------
def _pack(v: torch.Tensor, groups: tuple[int, ...], axis: int, width: int) -> torch.Tensor:
    """The last axis of ``v`` read as the row-major array ``groups``, its entries along ``axis`` OR-ed into one
    integer (entry ``i`` at bit ``width * i``): [..., prod(groups)] -> [..., prod(groups) // groups[axis]]."""
    lead = v.shape[:-1]
    shift = (width * torch.arange(groups[axis], device=v.device)).reshape(-1, *[1] * (len(groups) - axis - 1))
    return (v.reshape(*lead, *groups) << shift).sum(len(lead) + axis).reshape(*lead, -1)


def _unpack(b: torch.Tensor, groups: tuple[int, ...], axis: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_pack`."""
    lead = b.shape[:-1]
    shift = (width * torch.arange(groups[axis], device=b.device)).reshape(-1, *[1] * (len(groups) - axis - 1))
    b = b.reshape(*lead, *groups[:axis], 1, *groups[axis + 1 :])
    return ((b >> shift) & ((1 << width) - 1)).reshape(*lead, -1)


def _scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins [..., 8] -> ggml's 12 bytes (the inverse of get_scale_min_k4): bytes 0-3 hold
    scales 0-3, bytes 4-7 mins 0-3, each with the top 2 bits of scale / min j + 4 above; bytes 8-11 the low nibbles of
    scale and min j + 4."""
    hi_s, hi_m = sc[..., 4:], mn[..., 4:]
    return torch.cat([sc[..., :4] | (hi_s >> 4) << 6, mn[..., :4] | (hi_m >> 4) << 6, (hi_s & 15) | (hi_m & 15) << 4],
                     dim=-1)


def _scales_k4_read(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, mid, hi = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([lo & 63, (hi & 15) | (lo >> 6) << 4], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | (mid >> 6) << 4], dim=-1)
    return sc, mn


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float [rows, nb] -> the little-endian bytes of its float16 [rows, nb, 2]."""
    bits = t.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    return (bits[..., None] >> torch.tensor([0, 8], device=t.device)) & 255


def _from_f16_bytes(b: torch.Tensor) -> torch.Tensor:
    bits = b[..., 0] | (b[..., 1] << 8)
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.float16).float()


# ----- rounding and fitting ---------------------------------------------------------------------------------------
def _fp16(x: torch.Tensor, signed: bool = False) -> torch.Tensor:
    return x.clamp(-65504.0 if signed else 0.0, 65504.0).to(torch.float16).float()


def _round_to(v: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Nearest integer multiples of ``unit`` in [lo, hi] (0 where the unit is 0)."""
    safe = torch.where(unit != 0, unit, torch.ones_like(unit))
    return torch.where(unit != 0, torch.round(v / safe), torch.zeros_like(v)).clamp(lo, hi)


def _refine(error: Callable[..., torch.Tensor], ints: tuple[torch.Tensor, ...], lo: int,
            hi: int) -> tuple[torch.Tensor, ...]:
    """Per sub-block, the integers ``ints`` each moved by -1, 0 or +1 (within [lo, hi]), whichever combination has the
    least ``error(*ints)`` ([rows, nsb, n_sub]); unmoved is a candidate, so the error never grows."""
    best = None
    for steps in itertools.product(_STEPS, repeat=len(ints)):
        cand = tuple((v + s).clamp(lo, hi) for v, s in zip(ints, steps, strict=True))
        best = keep_better(best, (*cand, error(*cand)))
    return best[:-1]


def _encode_asym(x: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, nmax: int) -> torch.Tensor:
    """clamp(round((x + min) / scale), 0, nmax) as float; code 0 where the scale is 0."""
    scale = scale.expand_as(x)
    y = torch.where(scale > 0, (x + mins) / scale.clamp_min(1e-30), torch.zeros_like(x))
    return torch.clamp(torch.round(y), 0, nmax)


def _encode_sym(x: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
    """clamp(round(x / scale), -offset, offset - 1) + offset as float; the zero level where the scale is 0."""
    scale = scale.expand_as(x)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    y = torch.where(scale != 0, x / safe, torch.zeros_like(x))
    return torch.clamp(torch.round(y), -offset, offset - 1) + offset


def _fit_sub_blocks(x: torch.Tensor, wt: torch.Tensor, nmax: int, stretches: tuple[float, ...],
                    follow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last axis), the weighted-least-error (scale >= 0, min <= 0) with x ~ scale * q + min, q in
    0..nmax (make_qkx2_quants, vectorized): codes from the min/max range stretched by each factor, refined by least
    squares. ``follow``: a second pass anchors the range at the best min so far, as make_qkx2_quants does, scored by
    the error of nearest codes."""
    lo = x.amin(-1).clamp_max(0.0)
    hi = x.amax(-1)
    sw = wt.sum(-1)
    sx = (wt * x).sum(-1)
    sx2 = (wt * x * x).sum(-1)

    def error(scale: torch.Tensor, wmin: torch.Tensor, sl: torch.Tensor, sl2: torch.Tensor,
              sxl: torch.Tensor) -> torch.Tensor:
        """sum wt (scale q + wmin - x)^2 from the weighted moments of q and x (no pass over the weights)."""
        return (sx2 + scale * (scale * sl2 - 2 * sxl) + wmin * (wmin * sw - 2 * sx + 2 * scale * sl)).clamp_min(0.0)

    def codes(anchor: torch.Tensor, stretch: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weighted moments of q, sum wt q^2 and sum wt q x of the range [anchor, hi] stretched."""
        rng = hi - anchor
        inv_rng = torch.where(rng > 0, 1.0 / rng.clamp_min(1e-30), torch.zeros_like(rng))
        q = torch.clamp(torch.round((x - anchor[..., None]) * (stretch * inv_rng)[..., None]), 0, nmax)
        wq = wt * q
        return wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)

    def least_squares(anchor: torch.Tensor, sl: torch.Tensor, sl2: torch.Tensor,
                      sxl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = sw * sl2 - sl * sl
        ok = det > 0
        safe = det.clamp_min(1e-30)
        scale = torch.where(ok, (sw * sxl - sx * sl) / safe, torch.zeros_like(det))
        wmin = torch.where(ok, (sl2 * sx - sl * sxl) / safe, anchor)
        # the min may not be positive (stored as -min: an unsigned multiple of dmin)
        pos = wmin > 0
        scale = torch.where(pos, torch.where(sl2 > 0, sxl / sl2.clamp_min(1e-30), torch.zeros_like(sl2)), scale)
        wmin = torch.where(pos, torch.zeros_like(wmin), wmin)
        return scale.clamp_min(0.0), wmin

    best = None
    for stretch in (nmax, *stretches):  # plain min/max first, then make_qkx2's stretched ranges
        sl, sl2, sxl = codes(lo, stretch)
        if best is None:  # the min/max candidate as is
            best = ((hi - lo) / nmax, lo, error((hi - lo) / nmax, lo, sl, sl2, sxl))
        scale, wmin = least_squares(lo, sl, sl2, sxl)
        best = keep_better(best, (scale, wmin, error(scale, wmin, sl, sl2, sxl)))
    if follow:
        def stored(scale: torch.Tensor, wmin: torch.Tensor) -> torch.Tensor:
            q = _encode_asym(x, scale[..., None], -wmin[..., None], nmax)
            return ((scale[..., None] * q + wmin[..., None] - x).square() * wt).sum(-1)

        best = (best[0], best[1], stored(best[0], best[1]))
        for stretch in stretches:
            scale, wmin = least_squares(best[1], *codes(best[1], stretch))
            wmin = wmin.clamp_max(0.0)
            best = keep_better(best, (scale, wmin, stored(scale, wmin)))
    return best[0], best[1]


def _fit_signed_sub_blocks(x: torch.Tensor, wt: torch.Tensor, offset: int,
                           stretches: tuple[float, ...]) -> torch.Tensor:
    """Per sub-block (last axis), the weighted-least-error signed scale with x ~ scale * l, l in -offset..offset-1
    (make_qx_quants, vectorized): the largest-magnitude weight maps near -offset (ggml's choice) or near offset - 1,
    at each stretch, and the codes' least-squares scale is kept."""
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed
    inv = torch.where(big != 0, 1.0 / torch.where(big != 0, big, torch.ones_like(big)), torch.zeros_like(big))
    sx2 = (wt * x * x).sum(-1)
    plain = -big / offset  # ggml's rmse_type 0: no search
    level = torch.clamp(torch.round(x * (-offset * inv)[..., None]), -offset, offset - 1)
    best = (plain, ((plain[..., None] * level - x).square() * wt).sum(-1))
    for end in (-offset, offset - 1):
        for s in stretches:
            iscale = (end - s if end < 0 else end + s) * inv
            level = torch.clamp(torch.round(x * iscale[..., None]), -offset, offset - 1)
            wl = wt * level
            sxl, sl2 = (wl * x).sum(-1), (wl * level).sum(-1)
            ok = sl2 > 0
            scale = torch.where(ok, sxl / sl2.clamp_min(1e-30), torch.zeros_like(sl2))
            best = keep_better(best, (scale, (sx2 - scale * sxl).clamp_min(0.0)))
    return best[0]
