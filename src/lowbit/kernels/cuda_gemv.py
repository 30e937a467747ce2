"""Tensor-core GEMV for decode (1 to 8 rows of activations per launch, up to 16 in two) on 2- to 6-bit affine
grids, E8P, IQ2_XXS and llama.cpp's K-quants, in CUDA C++ (``cuda/gemv_mma.cu``), compiled at first use by
:mod:`cuda_jit`.

:func:`plan` says whether a packed weight can take this path and with which compile-time constants; the
constants of the fp16 decode are computed here and checked to be exact, so a format the kernel cannot decode
bit-exactly is simply not planned (the Triton kernels serve it). :func:`decode_reference` replays the kernel's
bit operations in torch on the CPU, which is how CI checks the constants and the E8P tables without a GPU.

IQ2_XXS is read from a kernel layout derived once per weight on the device (:func:`iq2xxs_layout`): llama.cpp's
66-byte superblocks put every 4-byte field at an offset of 2 mod 4, so the 8-byte sub-blocks are gathered into
rows of their own and the superblock scales into a separate fp16 array (the same bytes, 2.0625 bits per weight).
The K-quants (Q2_K .. Q6_K) are read from one too (:func:`kquant_layout`): the low 2 or 4 bits of every code
packed as the 2- or 4-bit grids pack theirs, so the same decode serves them, the high bits in a plane beside them,
each chunk's integer scales in one 16- or 32-bit word and each superblock's fp16 (d, -dmin) in one 32-bit word (at
most 0.19 bits per weight more than ggml's bytes: Q4_K 4.625). The 3-, 5- and 6-bit affine grids (int3_*, q5_0,
q5_1, int5_*, int6_*) are split the same way (:func:`affine_layout`: the low 2 or 4 bits of each code as a 2- or
4-bit grid, the rest in a plane beside them, Q3_K's, Q5_K's and Q6_K's decode), their fp16 scales read as stored.
A layout is built on the device at a weight's first GEMV, beside its stored bytes (which GGUF export and the other
paths read): twice the weight's memory there, until :func:`hold` moves the stored bytes to host memory (what
:class:`~lowbit.serve.fast_decode.StaticDecoder` does for every such weight), after which the device holds the
layout alone and a prompt decodes its dense weight from the layout (:mod:`triton_layouts`).
E8P's stored order is the kernel's own (:func:`lowbit.formats.e8p.to_stored`: pattern bytes apart from sign words
the kernel turns into flip masks with a multiply, so a code costs one table read).

Variants that measured slower on an H200 and were taken out (a cp.async ring feeding persistent blocks, E8P's sign
byte turned into its flip mask by 12 ALU instructions, the +rht input transform folded into the staging) are in
docs/kernel-measurements.md.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from lowbit.formats import E8PFormat, Format, IQ2XXSFormat, KQuantFormat, QuantizedTensor, UniformFormat
from lowbit.formats import e8p as e8p_format
from lowbit.formats import iq2xxs as iq2xxs_format
from lowbit.formats.bitpack import pack_bits, unpack_bits
from lowbit.formats.kquants import QK_K
from lowbit.kernels import cuda_jit, verified
from lowbit.kernels.device import hopper, shared_memory, sm_count
from lowbit.kernels.reference import decode_lut, rms_norm_reference

MAX_M = 8  # batch columns of the m16n8k16 MMA
# Batches of 9-16 rows run the kernel once per 8 rows: the weights are read twice, still a fraction of what
# dequantizing the whole matrix for cuBLAS reads and writes (the path larger batches take).
MAX_ROWS = 16
# Warps per block (they split a row block's K): 16 when each still gets >= 2 steps of 4 chunks to pipeline, else 8.
# Measured on an H200 (docs/kernel-measurements.md): 16 helps the 4-bit grids most (q4_0 batch 8 at 4096x14336: 29.6 ->
# 21.2 us) and 2-bit rows of >= 11008; 2-bit rows of 4096 (16 steps) lose with 16 (E8P 12.9 -> 14.7 us at 11008x4096).
WARPS_FEW, WARPS_MANY = 8, 16

ROWS_PER_BLOCK = 16
_MAGIC = 1024.0  # 0x6400


@dataclass(frozen=True)
class Plan:
    kind: int  # 0 affine grid, 1 E8P, 2 IQ2_XXS, 3 K-quant
    bits: int  # bits per code the magic-number decode reads (with hi_bits: the low 2 or 4)
    asym: bool
    group_shift: int  # log2(columns per scale group); 30 = one per row
    row_scale: bool
    dq: tuple[tuple[float, float], ...]  # (A_i, B_i): level = A_i * magic_i + B_i, one per code position
    # code bits beyond the low ones, read from a plane of their own (3-, 5-bit grids, Q3_K, Q5_K: 1; 6-bit, Q6_K: 2)
    hi_bits: int = 0

    def defines(self, staged_x: int = 0, warps: int = WARPS_FEW, min_blocks: int = 1, gated: bool = False,
                full: bool = False, norm_qs: int = 0, resid: bool = False, resident: bool = False,
                tiles: int = 1) -> str:
        lines = [f"#define KIND {self.kind}", f"#define BITS {self.bits}", f"#define ASYM {int(self.asym)}",
                 f"#define GROUP_SHIFT {self.group_shift}", f"#define ROW_SCALE {int(self.row_scale)}",
                 f"#define WARPS {warps}", f"#define XS {int(staged_x)}", f"#define MIN_BLOCKS {min_blocks}",
                 f"#define GATED {int(gated)}", f"#define FULL {int(full)}", f"#define NORM {int(norm_qs > 0)}",
                 f"#define NORM_QS {max(norm_qs, 1)}", f"#define RESID {int(resid)}",
                 f"#define RESIDENT {int(resident)}", f"#define KQ_HB {self.hi_bits}", f"#define TILES {tiles}",
                 f"#define STEP_SCALE {int(self.step_scaled())}"]
        if self.hi_bits:
            at = ", ".join(str(q) for row in hi_positions(self.bits, self.hi_bits) for q in row)
            lines.append(f"#define KQ_HI_AT {{{at}}}")
        for i, (a, b) in enumerate(self.dq):
            lines += [f"#define DQ_A{i} 0x{_half2_bits(a):08x}u", f"#define DQ_B{i} 0x{_half2_bits(b):08x}u"]
        return "\n".join(lines) + "\n"

    def step_scaled(self) -> bool:
        """Whether a scale group spans a whole step (the quad's four chunks), so the step's sums take the scale once
        in fp32 (STEP_SCALE in the .cu) instead of every weight pair: IQ2_XXS's superblock d (its weights then exact),
        and symmetric groups of >= 4 chunks (int4_g128_sym, e8p_g256). Measured on an H200 against scaling every
        pair (docs/kernel-measurements.md, "Group scales once per step"): int4_g128_sym TG-128 553.1 -> 630.3 tok/s."""
        whole_steps = not self.row_scale and 1 << self.group_shift >= 4 * half_per_chunk(self)
        return self.kind == 2 or (self.kind in (0, 1) and not self.asym and whole_steps)

    def chunk_scale(self) -> bool:
        """Whether each 16-byte chunk of codes lies inside one scale group (CHUNK_SCALE in the .cu, which
        STEP_SCALE also turns on): its scales are then loaded with its codes."""
        per_chunk_log2 = half_per_chunk(self).bit_length() - 1
        return self.kind >= 2 or (self.kind == 0 and not self.row_scale and self.group_shift >= per_chunk_log2)


def half_per_chunk(p: Plan) -> int:
    """Weights in a 16-byte chunk of codes: 64 (2-bit grids, E8P, IQ2_XXS) or 32 (4-bit grids, K-quants)."""
    return 32 if p.kind in (0, 3) and p.bits == 4 else 64


# ``LOWBIT_CUDA_WARPS``: warps per block for every call, 1 to 32 (for sweeps: benchmarks/gemv_ab.py --set
# LOWBIT_CUDA_WARPS=8); "auto" (default): :func:`warps_for`'s choice.
WARPS_SET = os.environ.get("LOWBIT_CUDA_WARPS", "auto")


def warps_for(p: Plan, cols: int) -> int:
    if WARPS_SET != "auto":
        if not WARPS_SET.isdigit() or not 1 <= int(WARPS_SET) <= 32:  # 1024 threads a block at most
            raise ValueError(f"LOWBIT_CUDA_WARPS must be auto or 1..32, got {WARPS_SET!r}")
        return int(WARPS_SET)
    steps = -(-cols // half_per_chunk(p) // 4)
    return WARPS_MANY if steps >= 2 * WARPS_MANY else WARPS_FEW


def _half2_bits(v: float) -> int:
    h = torch.tensor([v], dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    return h | (h << 16)


def _exact_half(v: float) -> bool:
    return float(torch.tensor(v, dtype=torch.float16)) == v


def _position_scales(bits: int, high: bool = False) -> list[float]:
    """Weight of the code in the magic number at each decode position (DQ_SRC / DQ_MASK in the .cu); ``high``: a
    2-bit code with a high bit above it (Q3_K), whose position 4 is read 4 bits lower to leave it room."""
    if bits == 4:
        return [1.0, 16.0]
    return [4.0, 4.0, 16.0, 64.0, 16.0 if high else 256.0, 4.0, 16.0, 64.0]


def _affine_levels(fmt: UniformFormat) -> tuple[float, float] | None:
    """(A, B) with level(q) = A q + B at unit scale, or None when the format's levels are not affine."""
    lut = decode_lut(fmt, torch.device("cpu")).double()
    a, b = float(lut[1] - lut[0]), float(lut[0])
    if not torch.equal(torch.arange(len(lut), dtype=torch.float64) * a + b, lut):
        return None
    return a, b


def _group_shift(fmt: Format, cols: int, min_cols: int) -> int | None:
    g = fmt.group_cols(cols)
    if fmt.n_groups(cols) == 1:
        return 30
    if g & (g - 1) or g < min_cols:
        return None
    return g.bit_length() - 1


def _kquant_plan(fmt: KQuantFormat, cols: int) -> Plan | None:
    """Q2_K, Q3_K: the low 2 bits of a code decode as a 2-bit grid's; Q4_K, Q5_K, Q6_K: the low 4 bits as a 4-bit
    grid's (positions 1 and 16). The high bits join them in the magic number. The level is q (scale + min types) or
    q - 2^(bits-1) (Q3_K, Q6_K), exactly in fp16."""
    if cols % QK_K:
        return None
    low = _kquant_low_bits(fmt)
    asym = "dmin" in fmt.halves
    offset = 0 if asym else 1 << (fmt.bits - 1)
    dq = tuple((1.0 / p, -offset - _MAGIC / p) for p in _position_scales(low, fmt.bits > low))
    return Plan(3, low, asym, 5, False, dq, hi_bits=fmt.bits - low)


def _kquant_low_bits(fmt: KQuantFormat) -> int:
    return 2 if fmt.bits <= 3 else 4


@cache
def _plan(fmt: Format, cols: int) -> Plan | None:
    if isinstance(fmt, KQuantFormat):
        return _kquant_plan(fmt, cols)
    if isinstance(fmt, IQ2XXSFormat):  # 16-byte chunks are two 32-weight sub-blocks; d per 256 columns
        return None if cols % 64 else Plan(2, 2, False, 8, False, ())
    if isinstance(fmt, E8PFormat):
        if cols % 64:
            return None
        shift = _group_shift(fmt, cols, 16)
        return None if shift is None else Plan(1, 2, False, shift, shift == 30, ())
    if not isinstance(fmt, UniformFormat) or fmt.bits not in _LOW_BITS:
        return None
    low = _LOW_BITS[fmt.bits]
    levels = _affine_levels(fmt)
    shift = _group_shift(fmt, cols, 32 // low)
    if levels is None or shift is None or (cols * low) % 128:
        return None
    a, b = levels
    dq = tuple((a / p, b - _MAGIC * a / p) for p in _position_scales(low, fmt.bits > low))
    if not all(_exact_half(v) for pair in dq for v in pair):
        return None
    return Plan(0, low, not fmt.symmetric, shift, fmt.symmetric and shift == 30, dq, hi_bits=fmt.bits - low)


# Affine grids the kernel decodes, by bits per code -> the low bits it reads as a 2- or 4-bit grid reads its codes.
# 3-, 5- and 6-bit codes are split as Q3_K's, Q5_K's and Q6_K's are (:func:`split_codes`): their high bits join the
# magic number from a plane of their own. 7 bits would not: 127 codes at the 4-bit grid's position 16 pass 1024.
_LOW_BITS = {2: 2, 3: 2, 4: 4, 5: 4, 6: 4}


def plan(fmt: Format, shape: tuple[int, int]) -> Plan | None:
    """The kernel configuration for a weight of ``shape`` in ``fmt``, or None when this kernel cannot serve it."""
    return _plan(fmt, shape[1])


@cache
def e8p_tables() -> torch.Tensor:
    """int32 [512]: the pattern words E2[t][pattern] of the kernel's E8P decode, t = 1 (shift -1/4) first.

    Coordinate i is the nibble 2 k + b at bits 4i, so the coordinate is n / 2 - 3.75: E holds k = 4 + floor(|a_i|)
    (|a_i| = 1/2, 3/2, ...) with the pattern's odd-parity sign on coordinate 7 pre-applied; a negated coordinate
    has 14 XORed onto its nibble (k -> 7 - k), and b = 1 in every nibble is the shift +1/4. The kernel XORs a
    flip mask made from the code's sign word (:func:`lowbit.formats.e8p.to_stored`) onto E2; its nibble 7 negates
    coordinate 7 once more where t = 1, which E2 undoes (0xE0000000), and E2 sets b for t = 0 (0x11111111)."""
    pats = e8p_format.abs_patterns()
    odd = e8p_format._parity()
    table = []
    for idx in range(256):
        word = 0
        for i in range(8):
            nib = 8 + int(2 * pats[idx, i]) - 1  # 2 k: k = 4 + floor(|a|)
            if i == 7 and odd[idx]:
                nib ^= 14
            word |= nib << (4 * i)
        table.append(word)
    return _int32(torch.tensor([w ^ 0xE0000000 for w in table] + [w ^ 0x11111111 for w in table]))


@cache
def iq2xxs_grid_table() -> torch.Tensor:
    """int32 [1024]: grid row i as four fp16 pairs (v_2p low, v_2p+1 high); 8, 25 and 43 are exact in fp16. What the
    kernel decodes the byte table (:func:`iq2xxs_grid_bytes`) to, and the reference replays."""
    grid, _ = iq2xxs_format.tables()
    return grid.to(torch.float16).reshape(-1).view(torch.int32).contiguous()


@cache
def iq2xxs_grid_bytes() -> torch.Tensor:
    """int32 [512]: grid row i as its 8 values in bytes, v_0 the lowest: the kernel's table in shared memory, half
    the bytes of the fp16 pairs it decodes them to (measured on an H200: IQ2_XXS batch 1 at 4096x14336 17.5 ->
    14.6 us, docs/kernel-measurements.md)."""
    grid, _ = iq2xxs_format.tables()
    return grid.to(torch.uint8).reshape(-1).view(torch.int32).contiguous()


def _kind_tables(kind: int) -> torch.Tensor:
    if kind == 2:
        return iq2xxs_grid_bytes()
    return e8p_tables()


@cache
def _iq2xxs_index(cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int16-word indices into a ``qs`` row: the sub-blocks' 4 words each, in order, and each superblock's d."""
    sub = torch.arange(cols // iq2xxs_format.SUB)
    words = (sub // 8 * 33 + 1 + sub % 8 * 4)[:, None] + torch.arange(4)
    return words.reshape(-1), torch.arange(0, cols, iq2xxs_format.SUPER) // iq2xxs_format.SUPER * 33


def iq2xxs_layout(qs: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's ``block_iq2_xxs`` rows -> the kernel's (sub-blocks int32 [rows, cols / 16], superblock d fp16
    [rows, n_super], sub-block scales int32 [rows, n_super]).

    A sub-block is two words: llama.cpp's four grid indices, then its four codes' 8 sign bits whole, the parity bit
    llama.cpp leaves out worked out here (byte c: the 7 stored bits of code c and their parity as bit 7). The
    sub-blocks' 4-bit scales move to a word per superblock, sub-block j at bits 4 j (70 bytes per 256 weights
    against llama.cpp's 66: the kernel reads a code's signs with one PRMT)."""
    words = qs.contiguous().view(torch.int16)
    sub_idx, d_idx = (i.to(qs.device) for i in _iq2xxs_index(cols))
    sub, d = words[:, sub_idx].contiguous().view(torch.int32), words[:, d_idx].contiguous().view(torch.float16)
    aux = sub.to(torch.int64).reshape(sub.shape[0], -1, 2) & 0xFFFFFFFF  # [rows, n_sub, (aux0, aux1)]
    c = torch.arange(4, device=qs.device)
    si = (aux[..., 1, None] >> (7 * c)) & 127  # [rows, n_sub, 4]
    signs = ((si | (_PARITY.to(qs.device)[si] << 7)) << (8 * c)).sum(-1)
    per = iq2xxs_format.SUPER // iq2xxs_format.SUB
    ls = aux[..., 1] >> 28  # [rows, n_sub]
    ls = torch.nn.functional.pad(ls, (0, -ls.shape[1] % per)).reshape(ls.shape[0], -1, per)
    ls_words = (ls << (4 * torch.arange(per, device=qs.device))).sum(-1)
    return _int32(torch.stack([aux[..., 0], signs], -1).reshape(sub.shape)), d, _int32(ls_words)


_PARITY = torch.tensor([bin(i).count("1") & 1 for i in range(128)])  # of a 7-bit sign index


_LAYOUT_ROWS = 2048  # rows unpacked at once by kquant_layout (int64 temporaries: ~10 bytes per weight)


def kquant_layout(fmt: KQuantFormat, qs: torch.Tensor, cols: int) -> tuple[torch.Tensor, ...]:
    """llama.cpp's ``block_q*_K`` rows -> the kernel layout (the .cu's KIND 3), on ``qs``'s device:

    * codes int32 [rows, cols / 8] (Q2_K, Q3_K: [rows, cols / 16]): the low 4 (2) bits of every code, packed as a
      4-bit (2-bit) grid packs its codes;
    * scales int16 [rows, cols / 32]: per 32-weight chunk two 8-bit integers, Q4_K / Q5_K the sub-block's ``sc``
      (low byte) and ``mn``, Q6_K the int8 ``sc`` of its two 16-weight sub-blocks plus 128 (Q2_K, Q3_K: int32
      [rows, cols / 64], per 64-weight chunk a byte per 16-weight sub-block: ggml's ``sc | mn << 4``, Q3_K's int8
      ``sc`` plus 128);
    * dm int32 [rows, cols / 256]: per superblock fp16 ``d`` (low half) and ``-dmin`` (Q3_K, Q6_K: ``d`` again);
    * hi int32 [rows, cols / 32 * hi_bits]: the high code bits (the .cu's magic_with_hi), or one zero when there are
      none.
    """
    return _in_row_slices(qs, lambda rows: _kquant_rows(fmt, rows, cols))


def _in_row_slices(t: torch.Tensor, build) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """``build`` over slices of :data:`_LAYOUT_ROWS` rows of ``t``, each field of its result concatenated: a layout
    built in pieces, so its int64 temporaries stay a slice's."""
    parts = [build(t[r:r + _LAYOUT_ROWS]) for r in range(0, t.shape[0], _LAYOUT_ROWS)]
    return tuple(torch.cat(field).contiguous() for field in zip(*parts, strict=True))


# Where the high bits of a split code go in its hi word (:func:`hi_positions`): by (low bits, high bits), for each
# magic position p of a pair's low bits, the shifts s of the successive pairs at p in a hi word: pair k at p takes the
# field at p + s[k]. Pairs at different positions share each shift, and no two words share one, so a hi word takes 6
# shifts to decode (3-bit codes: 3 a word), 8 (5-bit: 2 a word) or 4 (6-bit: 2 a word) instead of 13, 15 and 7 with
# the fields in code order. The fields tile the 16 bits of each half exactly.
_SHIFTS_3 = (-4, -3, 8, 2, 3, 9)
_SHIFTS_5 = (-4, -3, -2, -1, 4, 5, 6, 7)
_SHIFTS_6 = (-4, -2, 4, 6)
_HI_SHIFTS = {(2, 1): {4: _SHIFTS_3, 6: _SHIFTS_3, 8: (-4, -3, 2, 3)}, (4, 1): {4: _SHIFTS_5, 8: _SHIFTS_5},
              (4, 2): {4: _SHIFTS_6, 8: _SHIFTS_6}}


@cache
def hi_positions(low_bits: int, hi_bits: int) -> tuple[tuple[int, ...], ...]:
    """[word j of a chunk][pair i of the word] -> the bit where the pair's high bits start in its hi word (the pair's
    first code; its second code's 16 higher). A hi word serves 16 / hi_bits pairs: words 2e and 2e + 1 of the chunk
    (3- and 6-bit codes) or all four (5-bit codes). magic_with_hi in the .cu shifts each field to the pair's magic
    position p (its low bits' position plus ``low_bits``) and masks it there; the fields tile each half of the hi
    word (tests/test_cuda_gemv.py)."""
    half = 16 // low_bits  # pairs per word
    per_hi = 16 // hi_bits // half  # words one hi word serves
    scales = _position_scales(low_bits, True)
    at = [int(scales[i % len(scales)]).bit_length() - 1 + low_bits for i in range(half)]  # p of pair i
    shifts, rows = _HI_SHIFTS[(low_bits, hi_bits)], []
    for j in range(4):
        if j % per_hi == 0:
            placed = dict.fromkeys(at, 0)  # pairs of this hi word placed so far, by magic position
        row = []
        for p in at:
            row.append(p + shifts[p][placed[p]])
            placed[p] += 1
        rows.append(tuple(row))
    return tuple(rows)


def hi_code_positions(low_bits: int, hi_bits: int) -> torch.Tensor:
    """int64 [word j, half h, index i] on the CPU: the bit of its hi word where each code of a 16-byte chunk keeps its
    high bits (:func:`hi_positions`, plus 16 for a pair's second code), in the order the chunk's codes come."""
    at = torch.tensor(hi_positions(low_bits, hi_bits)).view(4, 1, 16 // low_bits)
    return at + 16 * torch.arange(2).view(1, 2, 1)


def split_codes(codes: torch.Tensor, low_bits: int, hi_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [rows, cols] (int64) -> the kernel's two planes: the low ``low_bits`` of every code packed as a 2- or
    4-bit grid packs its codes (int32 [rows, cols * low_bits / 32]), and the ``hi_bits`` above them (the .cu's
    magic_with_hi, int32 [rows, cols * hi_bits / 32]; one zero per row when there are none)."""
    rows, cols = codes.shape
    low = pack_bits(codes & ((1 << low_bits) - 1), low_bits).view(torch.int32)
    if not hi_bits:
        return low, torch.zeros(rows, 1, dtype=torch.int32, device=codes.device)
    # pair i of word j (codes i, i + half): at bits q, q + 16 of its hi word, q = hi_positions[j][i]
    lb, hb = low_bits, hi_bits
    half, chunk = 16 // lb, 128 // lb  # codes per half word, per 16-byte chunk
    h = (codes >> lb).reshape(rows, cols // chunk, 4, 2, half)  # [row, chunk, word j, half, code i]
    pos = hi_code_positions(lb, hb).to(codes.device)
    words = (h << pos).reshape(rows, cols // chunk, hb * chunk // 32, -1).sum(-1)  # disjoint bits: an OR
    return low, _int32(words.reshape(rows, -1))


def affine_layout(fmt: UniformFormat, packed: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-, 5- or 6-bit grid's stored codes (uint8 [rows, cols * bits / 8]) -> :func:`split_codes`'s planes,
    on ``packed``'s device, a slice of rows at a time (int64 temporaries)."""
    lb = _LOW_BITS[fmt.bits]
    return _in_row_slices(packed, lambda rows: split_codes(unpack_bits(rows, fmt.bits, cols).to(torch.int64), lb,
                                                           fmt.bits - lb))


def _kquant_rows(fmt: KQuantFormat, qs: torch.Tensor, cols: int) -> tuple[torch.Tensor, ...]:
    rows = qs.shape[0]
    codes, params = fmt.unpack(QuantizedTensor(fmt.name, (rows, cols), {"qs": qs}))
    lb = _kquant_low_bits(fmt)
    low, hi = split_codes(codes, lb, fmt.bits - lb)
    # Scale bytes in the order the kernel reads them (little-endian words): Q2_K one byte sc | mn << 4 per 16-weight
    # sub-block, Q3_K / Q6_K their int8 sc plus 128 (unsigned: one PRMT puts it into the magic number, kq_scales),
    # Q4_K / Q5_K (sc, mn) per 32-weight sub-block.
    sc = params["sc"].to(torch.int64)
    asym = "dmin" in fmt.halves
    if not asym:
        sc = sc + 128
    if lb == 2:
        scale_bytes, word = sc | params["mn"].to(torch.int64) << 4 if asym else sc, torch.int32
    else:
        scale_bytes, word = torch.stack([sc, params["mn"].to(torch.int64)], -1) if asym else sc, torch.int16
    scales = (scale_bytes & 255).to(torch.uint8).reshape(rows, -1).view(word)
    # the kernel's HFMA2 adds (-dmin) mn; the scale-only types take (d, d)
    dm = torch.stack([params["d"], -params["dmin"] if asym else params["d"]], -1).half().reshape(rows, -1)
    return low, scales, dm.view(torch.int32), hi


def _int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


_LAYOUTS: dict[int, tuple] = {}
# Kernel layouts (K-quants, IQ2_XXS, the 3-, 5- and 6-bit grids) are a second copy of a weight's bytes on the device,
# keyed by the stored tensor (the host copy once :func:`hold` moved it there): (data_ptr, _version, layout, device,
# build). ``LOWBIT_CUDA_LAYOUTS=0``: none is built, and those formats decode on Triton at their stored size (3-bit:
# ~1.7x slower decode on an H100, docs/kernels.md). Where the device has no memory left for one, the weight keeps
# the Triton path too (a warning says so, once per process).
LAYOUTS = os.environ.get("LOWBIT_CUDA_LAYOUTS", "1") != "0"
_REFUSED = object()  # a _LAYOUTS entry for a weight whose layout could not be allocated
_refusal_warned = False


def needs_layout(p: Plan) -> bool:
    """Whether the kernel reads this plan's weights from a layout built on the device, not from the stored bytes."""
    return p.kind in (2, 3) or p.hi_bits > 0


def _cached_layout(qs: torch.Tensor, build) -> tuple[torch.Tensor, ...] | None:  # noqa: ANN001
    """The kernel layout ``build(qs)`` of ``qs``, built at its first GEMV and dropped with it (keyed by the tensor's
    identity; an in-place change of ``qs`` rebuilds it, on the device of the layout it replaces: a stored tensor
    held in host memory, :func:`hold`, keeps its layout on the GPU); None when :data:`LAYOUTS` is off or the device
    had no memory for it."""
    if not LAYOUTS:
        return None
    key = id(qs)
    hit = _LAYOUTS.get(key)
    if hit is None or hit[:2] != (qs.data_ptr(), qs._version):
        if hit is None:
            weakref.finalize(qs, _LAYOUTS.pop, key, None)
        device = qs.device if hit is None else hit[3]
        try:
            layout = build(qs.to(device))
        except torch.OutOfMemoryError:
            layout = _REFUSED
            _warn_refused(qs)
        hit = _LAYOUTS[key] = (qs.data_ptr(), qs._version, layout, device, build)
    return None if hit[2] is _REFUSED else hit[2]


def stored_key(p: Plan) -> str:
    """The stored tensor a layout of plan ``p`` is built from (and replaces, :func:`hold`)."""
    return "qs" if p.kind in (2, 3) else "codes"


def layout_builder(fmt: Format, p: Plan, cols: int):  # noqa: ANN201 - Callable[[Tensor], tuple[Tensor, ...]]
    """The function that builds plan ``p``'s kernel layout (:func:`needs_layout`) from its stored tensor
    (:func:`stored_key`) of ``cols`` columns."""
    if p.kind == 3:
        return lambda qs: kquant_layout(fmt, qs, cols)
    if p.kind == 2:
        return lambda qs: iq2xxs_layout(qs, cols)
    return lambda codes: affine_layout(fmt, codes, cols)


def hold(fmt: Format, qt: QuantizedTensor, p: Plan) -> dict[str, torch.Tensor] | None:
    """For a GPU weight whose kernel reads a layout (:func:`needs_layout`): that layout, built (or the one built at
    its first GEMV), now keyed to a copy of the stored tensor in host memory, which is returned ({key: host
    tensor}) to take the device tensor's place. The device then holds the layout alone, not the stored bytes
    beside it. None (nothing changed) where no layout could be had. The host copy stays the weight's storage of
    record (saving, export, the reference); :func:`held` gives its layout to the prompt path."""
    key = stored_key(p)
    stored = qt.data[key]
    if not needs_layout(p) or not stored.is_cuda or _weights(fmt, qt, p) is None:
        return None
    _, _, layout, device, build = _LAYOUTS[id(stored)]
    host = stored.to("cpu")
    _LAYOUTS[id(host)] = (host.data_ptr(), host._version, layout, device, build)
    weakref.finalize(host, _LAYOUTS.pop, id(host), None)
    return {key: host}


def held(t: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.device] | None:
    """(layout, its device) for a stored tensor :func:`hold` moved to host memory, else None."""
    hit = _LAYOUTS.get(id(t))
    if hit is None or hit[2] is _REFUSED or hit[3] == t.device:
        return None
    layout = _cached_layout(t, hit[4])  # rebuilt where t changed in place since
    return None if layout is None else (layout, hit[3])


def release(t: torch.Tensor) -> None:
    """Drop the layout :func:`hold` keyed to the host tensor ``t`` (its device memory is freed with it)."""
    hit = _LAYOUTS.get(id(t))
    if hit is not None and hit[3] != t.device:
        del _LAYOUTS[id(t)]


def _warn_refused(qs: torch.Tensor) -> None:
    global _refusal_warned
    if not _refusal_warned:
        _refusal_warned = True
        warnings.warn(f"lowbit: no GPU memory for the CUDA GEMV's layout of a {tuple(qs.shape)} weight (a second copy "
                      "of its bytes); such weights decode on the slower Triton path. LOWBIT_CUDA_LAYOUTS=0 builds "
                      "none.", stacklevel=4)


def _weights(fmt: Format, qt: QuantizedTensor, p: Plan) -> tuple | None:
    """(codes, scales, mins, tables, groups): what the kernel reads for ``qt``, its layout built at the first call;
    None where :func:`needs_layout` and no layout could be had (:func:`_cached_layout`)."""
    k = qt.shape[1]
    layout = None
    if needs_layout(p):
        layout = _cached_layout(qt.data[stored_key(p)], layout_builder(fmt, p, k))
        if layout is None:
            return None
    if p.kind == 3:  # the K-quant layout's high-bit plane takes the place of the decode tables
        return (*layout, k // 32)
    if p.kind == 2:  # the kernel reads whole sign bytes and a word of sub-block scales (in the place of mins)
        # the tables go where the layout is: the stored bytes may be held in host memory (hold)
        return (*layout, _kind_tables_on(2, layout[0].device), layout[1].shape[1])
    scales = qt.data["scale"]
    mins = qt.data.get("min", scales)
    if p.hi_bits:  # 3-, 5-, 6-bit grids: the high-bit plane takes the place of the decode tables
        return layout[0], scales, mins, layout[1], fmt.n_groups(k)
    codes = qt.data["codes"]
    return codes, scales, mins, _kind_tables_on(p.kind, codes.device), fmt.n_groups(k)


def _kind_tables_on(kind: int, device: torch.device) -> torch.Tensor:
    table = _TABLES.get((device, kind))
    if table is None:
        table = _TABLES[device, kind] = _kind_tables(kind).to(device)
    return table


def layout_ready(fmt: Format, qt: QuantizedTensor, p: Plan) -> bool:
    """Whether :func:`gemv` can serve ``qt`` (plan ``p``): always for the formats read as stored; for the others
    once their layout is built (here, at the first call) and not refused (:func:`_cached_layout`)."""
    return not needs_layout(p) or _weights(fmt, qt, p) is not None


@cache
def _source(p: Plan, staged_x: int = 0, warps: int = WARPS_FEW, min_blocks: int = 1, gated: bool = False,
            full: bool = False, norm_qs: int = 0, resid: bool = False, resident: bool = False, tiles: int = 1,
            pin: bool = False) -> str:
    """The kernel's source for these settings; ``norm_qs`` > 0: the batch-1 row is RMS-normalized while staged,
    each thread holding that many groups of its units in registers (:func:`norm_groups`); ``resident``: blocks loop
    over row blocks (:data:`RESIDENT_GRID`); ``tiles``: row blocks per warp (:func:`row_tiles`); ``pin``: the staged
    batch-1 row's address kept in a register (:data:`PIN_XS`)."""
    defines = p.defines(staged_x, warps, min_blocks, gated, full, norm_qs, resid, resident, tiles)
    return cuda_jit.source("gemv_mma.cu", defines + f"#define PIN_XS {int(pin)}\n")


# The staged batch-1 row's shared-memory address kept in a register (PIN_XS in the .cu) instead of recomputed on
# every pass of the step loop, as ptxas does at the register cap. Measured on an H100 (docs/kernel-measurements.md,
# "The staged row's address kept in a register"), batch-1 means of the large shapes with "auto": nz2_ch 48.4 ->
# 49.3% of copy bandwidth, q4_0 72.5 -> 73.1%, int2_g64_sym level (it spills with it, so "auto" leaves it plain;
# pinned everywhere it went 48.1 -> 46.3%). ``LOWBIT_CUDA_PIN_XS``: "auto" (default) pins the affine grids' kernels
# where the pinned kernel spills no more than without it (it is compiled at a call's first use, and the plain one
# too where it spills), "1" every kernel, "0" none.
PIN_XS = os.environ.get("LOWBIT_CUDA_PIN_XS", "auto")
# "auto" leaves E8P's, IQ2_XXS's and the K-quants' kernels plain: their pass loses 0-6 instructions with it, and
# pinned they measured level (e8p_ch, q4_k, iq2_xxs) or 1.7% slower (q2_k) on an H100
_PIN_AUTO_KINDS = frozenset({0})


def pinned(p: Plan, plain: str, pinned_source: str, device: torch.device) -> bool:
    """Whether a call of plan ``p`` runs ``pinned_source`` (the row's address pinned) rather than ``plain``
    (:data:`PIN_XS`). "auto" compiles the plain kernel only where the pinned one spills: one that does not spills no
    more than any."""
    if PIN_XS not in ("0", "1", "auto"):
        raise ValueError(f"LOWBIT_CUDA_PIN_XS must be 0, 1 or auto, got {PIN_XS!r}")
    if PIN_XS != "auto" or device.type != "cuda":  # the CPU build (cuda_host) reads the row as before either way
        return PIN_XS == "1"
    if p.kind not in _PIN_AUTO_KINDS:
        return False
    spills = _spill_bytes(pinned_source, device)
    return spills == 0 or spills <= _spill_bytes(plain, device)


def _spill_bytes(source: str, device: torch.device) -> int:
    return cuda_jit.kernel(source, "gemv_mma", device).attribute(3)  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES


def min_blocks_for(warps: int, m: int = 8, tiles: int = 1) -> int:
    """Blocks of ``warps`` that must fit on an SM at once (``__launch_bounds__``) for batch ``m``: 2 of 16 warps
    (<= 64 registers per thread), 4 of 8 at batch 1 (<= 64) and 3 of 8 for batches (<= 85). Measured on an H200
    (docs/kernel-measurements.md): left free, the 16-warp 4-bit kernels took 66-80 registers, one block per SM, and ran
    15-25% slower (q4_0 4096x11008 batch 1: 16.5 -> 13.7 us); 4 blocks of 8 warps (<= 64 registers) slowed batch 8 on
    2-bit rows (iq2_xxs 11008x4096: 28.0 -> 36.0 us, with spills). At batch 1 the 8-warp kernels fit 64 registers
    without spilling (NVRTC), so 4 blocks, 32 warps, stay resident per SM. Two row blocks per warp (``tiles`` 2)
    hold twice the codes and sums: 95-128 registers (NVRTC, sm_90), so one block of 16 warps or two of 8. Other
    warp counts (``LOWBIT_CUDA_WARPS``) get as many blocks as keep 64 registers a thread."""
    if tiles == 2:
        return 1 if warps >= WARPS_MANY else 2
    policy = 2 if warps >= WARPS_MANY else 4 if m == 1 else 3
    return max(1, min(policy, 32 // warps))  # >= 64 registers a thread for any LOWBIT_CUDA_WARPS


def norm_blocks(p: Plan, warps: int, blocks: int) -> int:
    """Blocks of ``warps`` per SM (``__launch_bounds__``) of the kernel that RMS-normalizes its staged row (NORM),
    where the plain kernel takes ``blocks``: 3 of 8 warps (<= 85 registers) for the split-plane formats (high-bit
    planes: in practice the 3-bit grids and Q3_K, whose kernels run 8 warps at K = 4096; the 5- and 6-bit ones run
    16 there). At 4 (<= 64 registers) the norm's registers pushed Q3_K's step loop into local memory (13 accesses a
    step, NVRTC sm_90); at 3 none, and TG-128 of the 7B shape on an H100 ran q3_k at 512 tok/s instead of 475
    (int3_g128_sym 588 against 583; docs/kernel-measurements.md). 16-warp kernels loop over row blocks as resident
    blocks and keep their 2."""
    return min(blocks, 3) if p.hi_bits and warps < WARPS_MANY else blocks


# Two row blocks per warp (the .cu's TILES 2) for batches: each activation fragment a lane reads feeds the MMAs of 32
# rows instead of 16. At batch 8 the activations a 16-row block reads are 4x its 2-bit codes (8 rows of K fp16 against
# 16 rows of K / 4 bytes), and every block of a matrix reads them again. Measured on an H200
# (docs/kernel-measurements.md, "Two row blocks per warp for batches"), formats of 64 weights per 16-byte chunk: with
# the rows read from L1/L2 (K >= 11008 at batch 4 and 8) 16-41% faster (nz2_ch 4096x14336 batch 8: 20.2 -> 15.7 us, q2_k
# 25.2 -> 15.9); with the rows staged in shared memory faster at batch 8 for the 2-bit grids and E8P (nz2_ch 11008x4096
# 14.6 -> 11.2), level at batch 4 and slower for the K-quants and IQ2_XXS; slower at batch 2 (mostly staged), at batch
# 1, for the 4-bit grids and where the pairs of row blocks leave most SMs idle (1024 rows: nz2_ch 4.5 -> 5.4 us).
# ``LOWBIT_CUDA_TILES``: "1" or "2" for every call, "auto" (default) :func:`row_tiles`'s choice.
ROW_TILES = os.environ.get("LOWBIT_CUDA_TILES", "auto")


def row_tiles(p: Plan, m: int, staged: int, row_blocks: int, sms: int, wide: bool = False) -> int:
    """Row blocks per warp (TILES) for a call of plan ``p`` on ``m`` rows (staging ``staged``, ``row_blocks`` blocks
    of 16 rows, or 8 gated, on ``sms`` SMs): :data:`ROW_TILES` where set; else 2 where it measured faster (above)
    once ``row_tiles`` has left dispatch.GPU_UNVERIFIED: batches on formats of 64 weights per chunk, with staged
    rows only for the 2-bit grids and E8P at more than 4 rows, and IQ2_XXS where they are staged past 64 KB
    (``wide``, which :func:`launch` then stages at 8 rows of 14336 too; H100, batch 8: 4096x14336 22.3 -> 20.1-20.3
    us, 4096x11008 16.7 -> 16.3-16.6), and only where the pairs of row blocks fill at least half the SMs."""
    if ROW_TILES != "auto":
        if ROW_TILES not in ("1", "2"):  # the kernel has one- and two-row-block variants only
            raise ValueError(f"LOWBIT_CUDA_TILES must be auto, 1 or 2, got {ROW_TILES!r}")
        return int(ROW_TILES)
    if m == 1 or half_per_chunk(p) != 64 or "row_tiles" in verified.GPU_UNVERIFIED:
        return 1
    if staged and (m <= 4 or p.kind == 3 or (p.kind == 2 and not wide)):
        return 1
    return 2 if -(-row_blocks // 2) >= sms // 2 else 1


# A batch-1 activation row up to this size is staged once per block in shared memory: the warps then read it
# there instead of from L1/L2, whose latency each step otherwise waits for. 32 KB + the warps' partial sums (8 KB at
# 16 warps) + the IQ2_XXS grid (2 KB) stay under the 48 KB a block gets without opting in to more.
STAGED_X_BYTES = 32 * 1024
STAGED_X = os.environ.get("LOWBIT_CUDA_STAGED_X", "1") != "0"  # 0: batch 1 reads activations from global memory
# Batches of 2..STAGED_ROWS rows are staged too, up to STAGED_ROWS_BYTES (batch 8 at K = 4096: 64 KB), where a
# 16-byte chunk holds 64 weights (2-bit grids, E8P, IQ2_XXS). Measured on an H200 at batch 8 and K = 4096
# (docs/kernel-measurements.md): 20-33% faster for those (e8p_ch 14336x4096: 31.9 -> 21.3 us), 25-35% slower for the
# 4-bit grids (q4_0: 18.7 -> 24.8 us), whose chunks of 32 weights read twice the activations per byte of codes.
STAGED_ROWS = int(os.environ.get("LOWBIT_CUDA_STAGED_ROWS", "8"))
STAGED_ROWS_BYTES = 64 * 1024
# Batches of more than 4 rows on plans without high-bit planes (E8P, IQ2_XXS, the 2-bit grids, Q2_K) are staged in all
# the shared memory a block may opt in to (227 KB on Hopper: 8 rows of up to 14336), where each block then stages them
# once for two row blocks (two per warp, or blocks looping over row blocks). Measured on an H100
# (docs/kernel-measurements.md, "Batch rows staged past 64 KB"), batch 8: 9-23% faster at 4096x11008 and 4096x14336
# (e8p_ch 17.5 -> 13.5 us at 4096x11008); slower at batch 4 (one row block per warp, each block staging for 16 rows:
# nz2_ch 4096x11008 9.9 -> 11.0 us) and for int3 (high bits: 4096x14336 18.9 -> 22.3 us).
# ``LOWBIT_CUDA_STAGED_ROWS_BIG=0`` keeps every call within 64 KB.
STAGED_ROWS_BIG = os.environ.get("LOWBIT_CUDA_STAGED_ROWS_BIG", "1") != "0"
_STATIC_SHARED = 3 * 1024  # the kernel's own shared memory besides `part`: decode tables (2 KB), warp sums


def staging(m: int, k: int, p: Plan, room: int = STAGED_ROWS_BYTES) -> int:
    """XS in the .cu for a call of plan ``p`` on ``m`` rows of ``k`` activations: 0 = read from L1/L2, 1 = the
    one row staged in shared memory, 2 = all ``m`` rows staged (within ``room`` bytes)."""
    if not STAGED_X or m > max(1, STAGED_ROWS):
        return 0
    if m == 1:
        return int(2 * k <= STAGED_X_BYTES)
    return 2 if half_per_chunk(p) == 64 and staged_bytes(m, k) <= room else 0


def rows_room(device: torch.device) -> int:
    """Bytes of staged batch rows a block may hold on ``device``: all the shared memory it may opt in to but the
    kernel's own (:data:`STAGED_ROWS_BIG`), at least 64 KB."""
    if not STAGED_ROWS_BIG:
        return STAGED_ROWS_BYTES
    return max(STAGED_ROWS_BYTES, shared_memory(device)[0] - _STATIC_SHARED)


def part_bytes(warps: int) -> int:
    """Shared memory of the warps' partial sums (the .cu's ``part``)."""
    return warps * 32 * 4 * 4


# Programmatic dependent launch (Hopper and later): a GEMV starts and loads its first weights while the kernel before
# it finishes, waits for it only before reading the activations, and lets the kernel after it start once its weights
# are read. Off by default: alone it measured slower on an H200 (docs/kernel-measurements.md, nz2_ch TG-128 487.5 ->
# 474.4 tok/s), since the kernels around a GEMV did not take part. The compiled decode step turns it on together with
# Inductor's own PDL (serve.fast_decode, through :func:`early_launch`), where it measured faster.
EARLY_LAUNCH = os.environ.get("LOWBIT_CUDA_PDL", "0") == "1"
_early = threading.local()  # early_launch's setting, per thread: concurrent decoders may differ


def launches_early() -> bool:
    """Whether GEMVs launched now, on this thread, use programmatic dependent launch (before checking the GPU)."""
    return getattr(_early, "on", EARLY_LAUNCH)


def pdl_on(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` uses programmatic dependent launch: inside :func:`early_launch`
    (or with ``LOWBIT_CUDA_PDL=1``) on a GPU of compute capability 9.0 or more."""
    return launches_early() and hopper(device)


@contextmanager
def early_launch(on: bool = True) -> Iterator[None]:
    """GEMVs launched inside the block, on this thread, use programmatic dependent launch (``on``) or plain
    launches; a CUDA graph captured inside keeps the choice."""
    before = getattr(_early, "on", None)
    _early.on = on
    try:
        yield
    finally:
        if before is None:
            del _early.on
        else:
            _early.on = before


_TABLES: dict[tuple[torch.device, int], torch.Tensor] = {}  # the decode tables of each (device, kind)


def staged_bytes(m: int, k: int) -> int:
    """Shared memory of ``m`` staged activation rows of ``k`` fp16 (16-byte units): one row with a unit of padding
    after every 8 (the kernel's XS 1), several rows each padded to a multiple of 8 units (XS_UNITS, swizzled)."""
    units = -(-k // 8)
    return 16 * (units + -(-units // 8)) if m == 1 else m * 16 * -(-units // 8) * 8


def gemv(x: torch.Tensor, fmt: Format, qt: QuantizedTensor, p: Plan, gated: bool = False,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M <= 16, K] W^T, fp16 in and out, through the kernel planned by :func:`plan` (once per 8 rows).
    ``gated``: W is a fused [gate; up] weight of 2N rows and y = silu(x gate^T) * (x up^T), from the fp32 sums.
    ``norm`` (weight [K], eps): x is first RMS-normalized (:func:`rms_norm_reference`), inside the kernel where it
    stages the row (batch 1). ``residual`` [M, N]: y = residual + x W^T, added in the kernel (not with ``gated``)."""
    m, k = x.shape
    n = qt.shape[0] // 2 if gated else qt.shape[0]
    if not 0 < m <= MAX_ROWS or k != qt.shape[1]:
        raise ValueError(f"cuda gemv takes [1..{MAX_ROWS}, {qt.shape[1]}] inputs, got {tuple(x.shape)}")
    if residual is not None and (gated or tuple(residual.shape) != (m, n)):
        raise ValueError(f"a residual must be [{m}, {n}] and the GEMV not gated, got {tuple(residual.shape)}")
    if m > MAX_M:
        return torch.cat([gemv(x[i:i + MAX_M], fmt, qt, p, gated, norm,
                               None if residual is None else residual[i:i + MAX_M]) for i in range(0, m, MAX_M)])
    if gated and qt.shape[0] % 2:
        raise ValueError(f"a gated GEMV needs [gate; up] rows, got {qt.shape[0]} rows")
    device = x.device
    call = _call(p, m, k, n, device, gated, norm is not None, residual is not None)
    at = call.at
    if norm is not None and not call.norm_qs:  # only a staged batch-1 row that fits the registers is normalized inside
        x, norm = rms_norm_reference(x.to(torch.float16), *norm), None
    x = _half(x)
    nw = x if norm is None else _half(norm[0])
    res = None if residual is None else _half(residual)
    y = torch.empty(m, n, dtype=torch.float16, device=device)
    weights = _weights(fmt, qt, p)
    if weights is None:
        raise RuntimeError(f"no kernel layout for this {fmt.name} weight (layout_ready says when there is one)")
    codes, scales, mins, tables, groups = weights
    kern = cuda_jit.kernel(call.source, "gemv_mma", device)
    kern.allow_shared(at.shared)
    eps = _NO_EPS if norm is None else ctypes.c_float(norm[1])
    kern(call.grid, call.block, [codes, scales, mins, x, y, tables, n, k, m, groups, nw, y if res is None else res, eps,
                                 at.tiles], shared=at.shared, early=pdl_on(device))
    return y


_NO_EPS = ctypes.c_float(0.0)  # the eps argument of a call without a norm (read, never written)


@dataclass(frozen=True)
class Call:
    """What every :func:`gemv` call of one configuration launches: its :class:`Launch`, the NORM_QS of its source
    (:func:`norm_groups`; 0 where the norm is left to torch), that source, and the grid and block it launches."""

    at: Launch
    norm_qs: int
    source: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


# Every call of one configuration (plan, sizes, device, what it fuses) launches the same kernel at the same sizes,
# worked out once: in an eager decode loop (transformers' generate, a prompt) that Python arithmetic ran per call,
# ahead of every GEMV (benchmarks/linear_host_time.py). The settings in the key are what :func:`launch` and
# :func:`_source` read besides the call (the switches below, which tests and sweeps change at run time, and the
# device lookups tests replace): a switch either reads belongs in :func:`_settings`.
_CALLS: dict[tuple, tuple[Plan, Call]] = {}


def _settings() -> tuple:
    return (PIN_XS, WARPS_SET, ROW_TILES, STAGED_X, STAGED_ROWS, STAGED_ROWS_BIG, RESIDENT_GRID,
            verified.GPU_UNVERIFIED, sm_count, shared_memory)


def _call(p: Plan, m: int, k: int, n: int, device: torch.device, gated: bool, normed: bool, resid: bool) -> Call:
    """The :class:`Call` of :func:`gemv` on ``m`` rows of ``k`` for ``n`` outputs (``normed``: with a norm,
    ``resid``: with a residual), from :data:`_CALLS` after its first."""
    # keyed by the plan's id (hashing its fields costs more than the rest of the key): each entry holds its plan,
    # so no other plan can take that id while the entry is there
    key = (id(p), m, k, n, device, gated, normed, resid, _settings())
    hit = _CALLS.get(key)
    if hit is None:
        at = launch(p, m, k, n, device, gated)
        norm_qs = norm_groups(p, k, at.warps) if normed and at.xs == 1 else 0
        full = k % (4 * half_per_chunk(p)) == 0  # whole steps of 4 chunks: no lane past the row's end
        blocks = norm_blocks(p, at.warps, at.blocks) if norm_qs else at.blocks
        args = (p, at.xs, at.warps, blocks, gated, full, norm_qs, resid, at.grid < at.tiles, at.per_warp)
        source = _source(*args)
        if at.xs == 1 and PIN_XS != "0" and pinned(p, source, _source(*args, pin=True), device):
            source = _source(*args, pin=True)
        if len(_CALLS) >= 4096:  # plans made and dropped over and over (tests) leave no unbounded trail
            _CALLS.clear()
        hit = _CALLS[key] = (p, Call(at, norm_qs, source, (at.grid, 1, 1), (at.warps * 32, 1, 1)))
    return hit[1]


@dataclass(frozen=True)
class Launch:
    """How a call runs: staging (the .cu's XS), warps per block, row blocks per warp (TILES), blocks of them that
    must fit an SM (``__launch_bounds__``), tiles (groups of ``per_warp`` row blocks), blocks launched (fewer than
    tiles: they loop, RESIDENT) and dynamic shared memory."""

    xs: int
    warps: int
    per_warp: int
    blocks: int
    tiles: int
    grid: int
    shared: int


def launch(p: Plan, m: int, k: int, n: int, device: torch.device, gated: bool = False) -> Launch:
    """The launch of plan ``p`` on ``m`` rows of ``k`` activations for ``n`` output rows (``gated``: n gate rows and
    their up rows). Batch rows past 64 KB are staged only where it measured faster (:data:`STAGED_ROWS_BIG`)."""
    big = rows_room(device) if m > 4 and not p.hi_bits else STAGED_ROWS_BYTES
    rows_per_block = ROWS_PER_BLOCK // 2 if gated else ROWS_PER_BLOCK  # gated: 8 gate rows + their 8 up rows
    warps = warps_for(p, k)
    for room in dict.fromkeys((big, STAGED_ROWS_BYTES)):
        xs = staging(m, k, p, room)
        wide = xs == 2 and staged_bytes(m, k) > STAGED_ROWS_BYTES
        per_warp = row_tiles(p, m, xs, -(-n // rows_per_block), sm_count(device), wide)
        blocks = min_blocks_for(warps, m, per_warp)
        tiles = -(-n // (rows_per_block * per_warp))
        grid, shared = _grid(device, tiles, warps, blocks, xs, staged_bytes(m, k) if xs else 0)
        once = per_warp == 2 or grid < tiles  # each block stages the rows once for two row blocks or more
        if xs != 2 or staged_bytes(m, k) <= STAGED_ROWS_BYTES or once:
            break
    return Launch(xs, warps, per_warp, blocks, tiles, grid, shared)


def _grid(device: torch.device, tiles: int, warps: int, blocks: int, xs: int, staged: int) -> tuple[int, int]:
    """(blocks launched, dynamic shared memory) of a call of ``tiles`` tiles. Looping blocks (fewer than tiles:
    16-warp kernels, and blocks with staged batch rows) launch as many as stay resident at once, by registers
    (``blocks`` per SM) and by shared memory. Staged batch rows (``xs`` 2) keep the warps' partial sums after
    them where blocks loop, else over them (the .cu's ``part``)."""
    sms = sm_count(device)
    loop = _resident_grid() and (warps >= WARPS_MANY or xs == 2)
    if xs != 2:
        return (min(tiles, blocks * sms) if loop else tiles), staged
    optin, per_sm = shared_memory(device)
    looped = staged + part_bytes(warps)
    if loop and looped <= optin - _STATIC_SHARED:
        fit = per_sm // (looped + _STATIC_SHARED + 1024)  # + the 1 KB the GPU reserves per block
        grid = min(tiles, min(blocks, max(fit, 1)) * sms)
        if grid < tiles:
            return grid, looped
    return tiles, max(staged, part_bytes(warps))


# 16-warp kernels can launch only the blocks that stay resident together (``min_blocks_for`` per SM: 2), each
# looping over row blocks, so the activations are staged (and normalized) once per block instead of once per 16
# rows: q4_0's q/k/v and gate/up GEMVs had 3 and 5 waves of blocks. TG-128 of the 7B shape on an H200
# (docs/kernel-measurements.md): q4_0 467.6 -> 503.9 tok/s; nz2_ch, whose rows of 4096 take 8-warp blocks (4 per SM,
# fewer waves), 725.5 -> 719.0 with every kernel looping, so 8-warp kernels at batch 1 keep one block per row block.
# 8-warp blocks of staged batch rows (up to 64 KB each) loop too: on an H100 (docs/kernel-measurements.md, "Batch
# rows staged past 64 KB") up to 25% faster at batch 4 and 8 where a matrix has more tiles than resident blocks (e8p_ch
# 22016x4096 batch 8: 26.2 -> 21.2 us), level at 4096 rows; the losses: 12288 rows at batch 8 (nz2_ch 12.1 -> 12.9
# us, int3_g128_sym 18.0 -> 19.7; e8p_ch level) and up to 6% at batch 2 for q2_k, int2_g64_sym and int3.
# ``LOWBIT_CUDA_RESIDENT``: "1" on, "0" one block per row block everywhere, "auto" (default) on unless
# ``resident_gemv`` is in :data:`lowbit.kernels.dispatch.GPU_UNVERIFIED` (it left it when its GPU test passed on an
# H200; default TG-128 there: q4_0 508.9 tok/s).
RESIDENT_GRID = os.environ.get("LOWBIT_CUDA_RESIDENT", "auto")


def _resident_grid() -> bool:
    if RESIDENT_GRID != "auto":
        return RESIDENT_GRID == "1"
    return "resident_gemv" not in verified.GPU_UNVERIFIED


# Register groups a thread may hold while it normalizes the staged row (the kernel's NORM_QS): 7B-class rows of 4096
# need one (2-bit grids: 512 units in pairs over 256 threads; 4-bit: 512 over 512 threads), 8192 two at most.
MAX_NORM_QS = 4


def norm_groups(p: Plan, k: int, warps: int) -> int:
    """NORM_QS for a normalized batch-1 row of ``k``: the groups of staged units (pairs on 2-bit grids, as the
    staging permutes them) each thread holds; 0 when that passes :data:`MAX_NORM_QS` (torch normalizes first)."""
    per_group = 2 if p.kind in (0, 3) and p.bits == 2 else 1
    qs = -(-(k // 8 // per_group) // (warps * 32))
    return qs if qs <= MAX_NORM_QS else 0


def _half(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp16, contiguous, at a 16-byte aligned address (the kernel reads activations, norm weights and
    residuals in 16-byte units); ``t`` itself where it is all three."""
    if t.dtype != torch.float16:
        t = t.to(torch.float16)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


# ----- the kernel's decode replayed in torch (CPU tests) ------------------------------------------------------


def _as_half(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 0xFFFF).to(torch.int16).view(torch.float16)


def _fma_half(v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """fp16 fma as the GPU does it: exact product and sum, one rounding (exact in float64 for these sizes)."""
    return (v.double() * a + b).to(torch.float16)


def decode_reference(fmt: Format, cols: int, codes: torch.Tensor) -> torch.Tensor:
    """Unit-scale levels the kernel produces for ``codes`` (int64), through its LOP3/magic/HFMA2 steps.

    Affine grids: one code per element, decoded at every position the kernel reads it from; returns
    [positions, codes]. E8P: 16-bit codes -> [codes, 8] coordinates."""
    p = plan(fmt, (1, cols))
    if p is None:
        raise ValueError(f"{fmt.name} is not served by the CUDA GEMV at {cols} columns")
    if p.kind == 2:
        raise ValueError("iq2_xxs: replay whole weights with decode_iq2xxs_reference")
    if p.kind == 1:
        return _decode_e8p(codes)
    out = []
    for pos, (a, b) in zip(_position_scales(p.bits, p.hi_bits > 0), p.dq, strict=True):
        magic = 0x6400 | (codes * int(pos))  # the LOP3: the code, already at its bit position, into 1024.0
        out.append(_fma_half(_as_half(magic), a, b))
    return torch.stack(out)


def _decode_e8p(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's E8P steps on ``codes`` (a multiple of 8 of them) through their stored order (code_pairs in
    gemv_mma.cu; words [chunk, 4])."""
    m32 = 0xFFFFFFFF
    tab = e8p_tables().to(torch.int64) & m32
    words = e8p_format.to_stored(codes.reshape(1, -1)).view(torch.int32).to(torch.int64).reshape(-1, 4) & m32
    e = []
    for q in range(8):  # code q of each chunk
        w, r = q // 4, q % 4
        pw, y = words[:, w], words[:, 2 + w]
        t = (y >> (28 + r)) & 1  # the PRMT's byte-3 sign bit of y << (3 - r)
        e2 = tab[256 + ((pw >> (8 * r)) & 255) - 256 * t]
        lo, hi = (y, (y << 4) & m32) if r < 2 else (y >> 2, (y << 2) & m32)
        f = (lo ^ hi) & (0x11111111 << (r % 2))
        e.append(e2 ^ ((f * (7 if r % 2 else 14)) & m32))
    e = torch.stack(e, 1).reshape(-1)
    steps = [(e << 1, 1), (e, 4), (e >> 7, 1), (e >> 7, 5)]  # (word, p): coordinates i and i + 4 at bits p..p+3
    coords = [None] * 8
    for i, (w, p) in enumerate(steps):
        for half, pos in ((0, i), (16, i + 4)):
            nib = (w >> (half + p)) & 0xF
            coords[pos] = _e8p_coordinate(0x6400 | (nib << p), p)  # the LOP3 into 1024.0's mantissa
    return torch.stack(coords, dim=1)


def _e8p_coordinate(magic: torch.Tensor, p: int) -> torch.Tensor:
    """The HFMA2 of the E8P decode: 1024 + 2^p n (a nibble n at bit p of 1024.0's mantissa) -> n / 2 - 3.75."""
    return _fma_half(_as_half(magic), 2.0 ** -(p + 1), -(512 / 2**p + 3.75))


def decode_iq2xxs_reference(qs: torch.Tensor, cols: int) -> torch.Tensor:
    """The weight [rows, cols] the kernel multiplies, from ``qs`` through its layout (:func:`iq2xxs_layout`), tables
    and bit steps: the layout's sign bytes XORed onto fp16 grid values (those the kernel makes of its byte table,
    :func:`iq2xxs_grid_table`; the CPU tests check the two agree) scaled by the HFMA2's ``(0.5 + ls) / 4`` (exact
    in fp16), then d, which multiplies the step's fp32 sums: ggml's fp32 weights, exactly (float32)."""
    sub, d, ls_words = iq2xxs_layout(qs, cols)
    aux = sub.to(torch.int64).reshape(sub.shape[0], -1, 2) & 0xFFFFFFFF  # [rows, n_sub, (aux0, signs)]
    d_sub = d.float().repeat_interleave(iq2xxs_format.SUPER // iq2xxs_format.SUB, dim=1)[:, : aux.shape[1]]
    grid = iq2xxs_grid_table().view(torch.float16).reshape(256, 8)
    c = torch.arange(4)
    gi = (aux[..., 0, None] >> (8 * c)) & 255  # [rows, n_sub, 4]
    sbyte = (aux[..., 1, None] >> (8 * c)) & 255  # code c's 8 signs
    per = iq2xxs_format.SUPER // iq2xxs_format.SUB
    nib = (ls_words.to(torch.int64)[..., None] >> (4 * torch.arange(per))) & 15  # nibble j: sub-block j's ls
    ls = nib.reshape(nib.shape[0], -1)[:, : aux.shape[1]]
    neg = ((sbyte[..., None] >> torch.arange(8)) & 1).bool()  # [rows, n_sub, 4, 8]
    k = iq2xxs_sub_factor(ls)[..., None, None].double()  # (0.5 + ls) / 4, the kernel's HFMA2
    vk = ((1024 + grid[gi].double()) * k - 1024 * k).to(torch.float16)  # (1024 + v) k - 1024 k, one rounding
    vals = torch.where(neg, -vk, vk)
    w = (vals.double() * d_sub[..., None, None].double()).float()  # exact: 11 x 11 significant bits
    return w.reshape(sub.shape[0], cols)


def iq2xxs_sub_factor(ls: torch.Tensor) -> torch.Tensor:
    """The kernel's (0.5 + ls) / 4 for 4-bit ``ls``: ls into both halves of 1024.0 (one IMAD), then
    one HFMA2 by 0.25 and -255.875, fp16."""
    return _fma_half(_as_half(0x6400 | ls), 0.25, -255.875)


def decode_kquant_reference(fmt: KQuantFormat, qs: torch.Tensor, cols: int) -> torch.Tensor:
    """The fp16 weight [rows, cols] the kernel multiplies for a K-quant ``qs`` it serves, from its layout
    (:func:`kquant_layout`) through the .cu's bit steps: each pair's magic number from the low code bits (DQ_SRC,
    DQ_MASK) and the high bits (magic_with_hi, kq_hi), the plan's HFMA2 constants, the scales of kq_scales /
    kq_sub_scales (the integers made fp16 exactly, one HMUL2 by (d, -dmin)), then one HFMA2 (``s q - m``) or HMUL2
    (``s (q - 32)``)."""
    p = plan(fmt, (1, cols))
    if p is None or p.kind != 3:
        raise ValueError(f"{fmt.name} at {cols} columns is not a K-quant the CUDA GEMV serves")
    low, sm, dm, hi = (t.to(torch.int64) & 0xFFFFFFFF for t in kquant_layout(fmt, qs, cols))
    per_word = 32 // p.bits
    rows, chunks, half = qs.shape[0], cols // (4 * per_word), per_word // 2
    words = low.reshape(rows, chunks, 4)  # [row, chunk, word j]
    hb = p.hi_bits
    level = torch.empty(rows, chunks, 4, per_word, dtype=torch.float16)  # [row, chunk, word j, code]
    for j in range(4):
        hi_words = hb * 4 * per_word // 32
        h = hi.reshape(rows, chunks, hi_words)[..., j // 2 if hi_words == 2 else 0] if hb else None  # kq_hi
        for i in range(half):  # pair i: codes i and i + half
            w = words[..., j]
            if p.bits == 2:  # DQ_SRC, DQ_MASK (Q3_K: position 4 read 4 bits lower)
                low_at = (2, 2, 4, 6, 4 if hb else 8, 2, 4, 6)[i]
                src = w << 2 if i == 0 else (w >> 4 if hb else w) if i == 4 else w if i < 5 else w >> 8
            else:
                low_at = 4 * (i % 2)
                src = w if i < 2 else w >> 8
            magic = 0x64006400 | (src & (((1 << p.bits) - 1) * 0x00010001) << low_at)
            if hb:  # magic_with_hi
                pos = low_at + p.bits
                sh = pos - hi_positions(p.bits, hb)[j][i]
                magic |= ((h << sh) if sh >= 0 else (h >> -sh)) & ((((1 << hb) - 1) * 0x00010001) << pos)
            a, b = p.dq[i % len(p.dq)]  # 4-bit: DQ_CONSTS_A {A0, A1, A0, A1}
            level[..., j, i] = _fma_half(_as_half(magic), a, b)
            level[..., j, i + half] = _fma_half(_as_half(magic >> 16), a, b)
    per_super = QK_K // (4 * per_word)  # chunks per superblock
    d2 = torch.stack([_as_half(dm), _as_half(dm >> 16)], -1).double().repeat_interleave(per_super, dim=1)
    if p.bits == 2:  # kq_sub_scales: byte j of sm -> (sc, mn) of word j (Q3_K: int8 sc plus 128, and (d, d))
        byte = (sm[..., None] >> torch.tensor([0, 8, 16, 24])) & 0xFF  # [row, chunk, word j]
        ints = torch.stack([byte & 15, byte >> 4] if p.asym else [byte - 128] * 2, -1).double()
        s = (ints * d2[:, :, None]).to(torch.float16).double()  # [row, chunk, j, (d sc, -dmin mn)]
        m = s[..., 1, None] if p.asym else 0.0
        w = (level.double() * s[..., 0, None] + m).to(torch.float16)
        return w.reshape(rows, cols)
    ints = torch.stack([sm & 0xFF, (sm >> 8) & 0xFF], -1)  # [row, chunk, 2]
    ints = ints.double() if p.asym else (ints.double() - 128)  # exact: fp16 holds 0..255 and -128..127
    s = (ints * d2).to(torch.float16).double()  # one rounding of d * sc (and -dmin * mn)
    lv = level.double()
    if p.asym:  # s0 q + (-dmin) mn, one rounding
        w = (lv * s[..., 0, None, None] + s[..., 1, None, None]).to(torch.float16)
    else:  # words 0, 1: sub-block 2c; words 2, 3: 2c + 1
        w = (lv * s.repeat_interleave(2, dim=-1)[..., None]).to(torch.float16)
    return w.reshape(rows, cols)
