"""Weight formats and the registry that maps names to them.

Names:
  ``int{b}_g{N}_{sym|asym}[_mse]``  uniform b-bit (2..8), groups of N input columns
  ``int{b}_ch_{sym|asym}[_mse]``    uniform b-bit, one group per output channel (row)
  ``int{b}_{gN|ch}_zp[_mse]``       uniform b-bit with an integer zero point, ``(q - z) * s`` (GPTQ's asymmetric)
  ``int{b}_{gN|ch}_sym_ls``         the symmetric grid with ggml's least-squares scale search (make_qx_quants)
  ``q4_0``, ``q4_1``, ``q5_0``,     ggml block formats (= int4_g32_sym, int4_g32_asym, int5_g32_sym,
  ``q5_1``, ``q8_0``                int5_g32_asym, int8_g32_sym)
  ``{nz2|pm12|std2}_{gN|ch}``       2-bit level sets {+-0.5,+-1.5}, {+-1,+-2}, {-2,-1,0,1} x per-group scale
  ``std2m_{gN|ch}``                 {-2,-1,0,1} or its mirror {-1,0,1,2}, chosen per group (sign of the scale)
  ``nz2r{RR}_{gN|ch}``              no-zero set {-1,-r,r,1} with inner/outer ratio r = RR/100
  ``iq4_nl``                        llama.cpp IQ4_NL: 16 non-uniform levels x fp16 scale per 32 (4.5 bpw)
  ``iq2_xxs``                       llama.cpp IQ2_XXS (E8-based 2-bit vector codebook, 2.0625 bpw), bit-exact
  ``q2_k``                          llama.cpp Q2_K k-quant (2-bit codes, 4-bit scales/mins per 16, 2.625 bpw)
  ``q3_k``                          llama.cpp Q3_K (3-bit codes, 6-bit signed scales per 16, 3.4375 bpw)
  ``q4_k``, ``q5_k``                llama.cpp Q4_K / Q5_K (4/5-bit codes, 6-bit scales and mins per 32; 4.5 / 5.5 bpw)
  ``q6_k``                          llama.cpp Q6_K (6-bit codes, int8 scales per 16, 6.5625 bpw)
                                    (k-quants are bit-exact ggml blocks for rows in multiples of 256; see
                                    :func:`row_format` for llama.cpp's fallback on other rows)
  ``e8p_{gN|ch}``                   QuIP#'s E8P 2-bit lattice codebook (16 bits per 8 weights) x fp16 scale
"""

from __future__ import annotations

import re
from functools import cache

from lowbit.errors import LowbitError, UnknownFormatError
from lowbit.formats.base import Format, Params, QuantizedTensor, cat_params
from lowbit.formats.e8p import E8PFormat
from lowbit.formats.iq2xxs import IQ2XXSFormat
from lowbit.formats.kquants import K_QUANTS, KQuantFormat, Q2KFormat, Q3KFormat, Q4KFormat, Q5KFormat, Q6KFormat
from lowbit.formats.levelset import IQ4_NL_LEVELS, NAMED_LEVELS, LevelSetFormat, no_zero_levels
from lowbit.formats.uniform import UniformFormat
from lowbit.formats.zeropoint import ZeroPointFormat

__all__ = ["E8PFormat", "Format", "IQ2XXSFormat", "KQuantFormat", "LevelSetFormat", "Params", "Q2KFormat", "Q3KFormat",
           "Q4KFormat", "Q5KFormat", "Q6KFormat", "QuantizedTensor", "UniformFormat", "ZeroPointFormat", "cat_params",
           "get_format", "example_names", "row_format"]

ALIASES = {"q4_0": "int4_g32_sym", "q4_1": "int4_g32_asym", "q5_0": "int5_g32_sym", "q5_1": "int5_g32_asym",
           "q8_0": "int8_g32_sym"}
_UNIFORM = re.compile(r"^int(?P<bits>[2-8])_(?:g(?P<g>\d+)|(?P<ch>ch))_(?P<kind>sym|asym|zp)(?:_(?P<fit>mse|ls))?$")
_LEVELS = re.compile(r"^(?:(?P<set>nz2|pm12|std2m?)|nz2r(?P<ratio>\d{2}))_(?:g(?P<g>\d+)|(?P<ch>ch))$")
_E8P = re.compile(r"^e8p_(?:g(?P<g>\d+)|(?P<ch>ch))$")


@cache
def get_format(name: str) -> Format:
    """Return the format called ``name`` (see module docstring); raises UnknownFormatError with examples."""
    key = name.strip().lower()
    canonical = ALIASES.get(key, key)
    if canonical == "iq2_xxs":
        return IQ2XXSFormat()
    if canonical in K_QUANTS:
        return K_QUANTS[canonical]()
    if canonical == "iq4_nl":
        return LevelSetFormat(IQ4_NL_LEVELS, 32, "iq4_nl", mirror=True)
    m = _UNIFORM.match(canonical) or _LEVELS.match(canonical) or _E8P.match(canonical)
    if m:
        g = None if m["ch"] else int(m["g"])
        if g is not None and (g < 8 or g % 8):
            raise UnknownFormatError(f"group size must be a multiple of 8 (>= 8), got {g} in {name!r}")
        if m.re is _E8P:
            return E8PFormat(g, canonical)
        if "set" in m.groupdict():
            named = (m["set"] or "").removesuffix("m")
            levels = NAMED_LEVELS[named] if named else no_zero_levels(int(m["ratio"]) / 100)
            return LevelSetFormat(levels, g, canonical, mirror=m["set"] == "std2m")
        fit = m["fit"] or "minmax"
        if fit == "ls" and m["kind"] != "sym":
            raise UnknownFormatError(f"{name!r}: the _ls fit (ggml's make_qx_quants) is for symmetric grids only")
        if m["kind"] == "zp":
            return ZeroPointFormat(int(m["bits"]), g, fit)
        fmt = UniformFormat(int(m["bits"]), g, m["kind"] == "sym", fit)
        if key in ALIASES:
            fmt.name = key
        return fmt
    raise UnknownFormatError(f"unknown format {name!r}; known: {', '.join(example_names())} "
                             "(patterns int{2..8}_{gN|ch}_{sym|asym|zp}[_mse], int{2..8}_{gN|ch}_sym_ls, "
                             "{nz2|pm12|std2|std2m}_{gN|ch}, "
                             "nz2r{RR}_{gN|ch}, iq2_xxs, q2_k..q6_k, iq4_nl, e8p_{gN|ch})")


def example_names() -> list[str]:
    return ["int4_g128_sym", "int4_g128_asym", "int4_g128_zp", "int3_g128_asym", "int2_g64_asym_mse", "int4_ch_sym",
            "nz2_ch", "nz2r30_ch", "pm12_ch", "std2_ch", "std2m_ch", "iq2_xxs", "q2_k", "q3_k", "q4_k",
            "q5_k", "q6_k", "iq4_nl", "e8p_ch", "e8p_g256", *ALIASES]


def row_format(name: str, cols: int) -> str | None:
    """The format llama.cpp writes for a weight with rows of ``cols`` when asked for ``name``: ``name`` itself, or
    for a k-quant whose 256-weight superblocks do not divide the rows its fallback (llama-quant.cpp
    tensor_type_fallback: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), or None (keep 16-bit) where
    the fallback's 32-weight blocks do not divide them either."""
    fmt = get_format(name)
    if not isinstance(fmt, KQuantFormat) or cols % fmt.group_size == 0:
        return name
    return fmt.fallback if cols % get_format(fmt.fallback).group_size == 0 else None


def bpw_rows(shape: tuple[int, int]) -> list[tuple[str, float | str]]:
    """(name, exact bits per weight at ``shape``) for every example format name."""
    return [(n, _bpw_or_reason(get_format(n), shape)) for n in example_names()]


def _bpw_or_reason(fmt: Format, shape: tuple[int, int]) -> float | str:
    """A format may not accept every shape (IQ2_XXS needs rows in multiples of 32): say so in its row."""
    try:
        return fmt.bits_per_weight(shape)
    except (ValueError, LowbitError) as e:
        return f"n/a ({e})"
