"""The CUDA tensor-core GEMV (kernels/cuda_gemv.py + cuda/gemv_mma.cu).

On any machine: the kernel's decode (magic-number constants, E8P nibble tables), replayed in torch, gives exactly
the format's levels / codebook, and the planner refuses what the kernel cannot decode exactly. On CUDA: the kernel
against the torch reference on fresh random weights and activations, ragged shapes, batch 1-8, and activations
with massive outlier channels.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import torch

from conftest import compile_all, nvrtc_found
from lowbit.formats import Format, QuantizedTensor, e8p, get_format
from lowbit.kernels import cuda_gemv
from lowbit.kernels.reference import decode_lut

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import sass_count  # noqa: E402  (benchmarks/ is not a package)

SERVED = ["int2_g64_sym", "int2_g32_asym", "int2_g64_asym", "int4_g128_sym", "int4_g128_asym", "q4_0", "q4_1",
          "nz2_ch", "nz2_g64", "std2_g64", "std2m_ch", "int4_ch_sym", "int2_ch_asym", "e8p_ch", "e8p_g256", "iq2_xxs",
          "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "int3_g128_sym", "int3_g64_asym", "int3_ch_sym", "q5_0", "q5_1",
          "int6_g128_sym"]
NOT_SERVED = ["pm12_ch", "nz2r30_ch", "iq4_nl", "int7_g128_sym", "int8_g32_sym", "e8p_g8", "int3_g128_zp"]
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("name", [n for n in SERVED if not n.startswith(("e8p", "iq2")) and n not in K_QUANTS])
def test_affine_decode_constants_are_exact(name: str) -> None:
    fmt = get_format(name)
    levels = cuda_gemv.decode_reference(fmt, 4096, torch.arange(1 << fmt.bits))
    lut = decode_lut(fmt, torch.device("cpu"))
    for pos in levels:  # every position a code can sit at in a word decodes it to the same level
        assert torch.equal(pos.float(), lut)


def test_e8p_tables_decode_the_whole_codebook() -> None:
    got = cuda_gemv.decode_reference(get_format("e8p_ch"), 4096, torch.arange(1 << 16))
    assert torch.equal(got.float(), e8p.codebook())


@pytest.mark.parametrize("rows", [0, 17])
def test_gemv_refuses_batches_it_cannot_take(rows: int) -> None:
    """1-16 rows (9-16 as two launches); anything else is refused before the device is touched."""
    fmt = get_format("nz2_ch")
    qt = fmt.quantize(torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"1\.\.16"):
        cuda_gemv.gemv(torch.zeros(rows, 1024, dtype=torch.float16), fmt, qt, cuda_gemv.plan(fmt, qt.shape))


@pytest.mark.parametrize("cols", [1024, 576])
def test_iq2xxs_kernel_decode_is_the_format_exactly(cols: int) -> None:
    """The kernel's fp16 weights are v (0.5 + ls) / 4 and d scales the step's fp32 sums: replayed through its layout,
    tables and bit steps, exactly ggml's fp32 weights, every one (large columns included)."""
    fmt = get_format("iq2_xxs")
    w = torch.randn(40, cols, generator=torch.Generator().manual_seed(cols)) * 0.02
    w[:, ::97] *= 8
    qt = fmt.quantize(w)
    got = cuda_gemv.decode_iq2xxs_reference(qt.data["qs"], cols)
    assert got.dtype == torch.float32 and torch.equal(got, fmt.dequantize(qt).float())


def test_iq2xxs_sub_factor_and_grid_pairs_are_exact() -> None:
    """IQ2_XXS's per-sub-block steps, for every 4-bit ls and grid value: the HFMA2 of ls in 1024.0 gives
    (0.5 + ls) / 4, the HMUL2 by -1024 is exact, and the grid pair's HFMA2 (1024 + v) k + (-1024 k) gives v k in fp16
    with no rounding."""
    ls = torch.arange(16)
    k = cuda_gemv.iq2xxs_sub_factor(ls)
    assert torch.equal(k.double(), (0.5 + ls.double()) / 4)
    minus = (k.double() * -1024).to(torch.float16)  # the kernel's HMUL2
    assert torch.equal(minus.double(), -1024 * k.double())
    v = torch.tensor([8.0, 25.0, 43.0], dtype=torch.float64)[:, None]
    pair = ((1024 + v) * k.double() + minus.double()).to(torch.float16)  # one rounding, as HFMA2
    assert torch.equal(pair.double(), v * k.double())


def test_step_scale_is_planned_where_a_group_spans_a_step() -> None:
    """Symmetric groups of >= 4 chunks and IQ2_XXS's superblocks take their scale once per step; smaller or
    asymmetric groups and row scales do not."""
    planned = {n: cuda_gemv.plan(get_format(n), (64, 4096)) for n in
               ("iq2_xxs", "int4_g128_sym", "e8p_g256", "int4_g256_sym", "int2_g512_sym", "q4_0", "int4_g128_asym",
                "int2_g64_sym", "int2_g128_sym", "e8p_g128", "nz2_ch", "e8p_ch")}
    assert {n for n, p in planned.items() if p.step_scaled()} == {"iq2_xxs", "int4_g128_sym", "e8p_g256",
                                                                  "int4_g256_sym", "int2_g512_sym"}
    assert "#define STEP_SCALE 1" in cuda_gemv._source(planned["iq2_xxs"], 1)
    assert "#define STEP_SCALE 0" in cuda_gemv._source(planned["q4_0"], 1)


def test_iq2xxs_grid_bytes_decode_to_the_grid() -> None:
    """The byte table in shared memory, replayed as the kernel's PRMT (two bytes into 1024.0's mantissas,
    selectors 0x4140 and 0x4342) and HFMA2 (x 1 - 1024), gives every grid row's fp16 pairs exactly."""
    words = cuda_gemv.iq2xxs_grid_bytes().to(torch.int64).reshape(256, 2) & 0xFFFFFFFF
    pairs = []
    for w in (words[:, 0], words[:, 1]):
        for lo, hi in ((0, 1), (2, 3)):  # bytes of the PRMT's selector
            for byte in (lo, hi):
                magic = 0x6400 | ((w >> (8 * byte)) & 0xFF)
                pairs.append((magic.to(torch.int16).view(torch.float16).double() - 1024).to(torch.float16))
    got = torch.stack(pairs, dim=1)
    want = cuda_gemv.iq2xxs_grid_table().view(torch.float16).reshape(256, 8)
    assert torch.equal(got, want)


def test_iq2xxs_layout_keeps_every_field() -> None:
    """The kernel layout holds llama.cpp's block fields: the superblock d's; per sub-block its grid index bytes
    as stored; each code's 7 stored sign bits with their even parity as bit 7, in byte c; the sub-blocks' 4-bit
    scales in a word per superblock (a short last one too)."""
    fmt = get_format("iq2_xxs")
    qt = fmt.quantize(torch.randn(8, 576, generator=torch.Generator().manual_seed(1)))
    qs = qt.data["qs"]
    sub, d, ls = cuda_gemv.iq2xxs_layout(qs, 576)
    assert tuple(sub.shape) == (8, 576 // 16) and tuple(d.shape) == (8, 3) and tuple(ls.shape) == (8, 3)
    assert torch.equal(d.view(torch.uint8), torch.cat([qs[:, 0:2], qs[:, 66:68], qs[:, 132:134]], dim=1))
    body = torch.cat([qs[:, 2:66], qs[:, 68:132], qs[:, 134:]], dim=1)  # llama.cpp's sub-blocks: 2 words each
    old = body.contiguous().view(torch.int32).to(torch.int64).reshape(8, -1, 2) & 0xFFFFFFFF
    new = sub.to(torch.int64).reshape(8, -1, 2) & 0xFFFFFFFF
    assert torch.equal(old[..., 0], new[..., 0])
    for c in range(4):
        byte = (new[..., 1] >> (8 * c)) & 255
        assert torch.equal(byte & 127, (old[..., 1] >> (7 * c)) & 127)
        assert all(bin(int(b)).count("1") % 2 == 0 for b in byte.flatten())  # the 8 signs have even parity
    nib = ((ls.to(torch.int64)[..., None] & 0xFFFFFFFF) >> (4 * torch.arange(8))) & 15
    assert torch.equal(nib.reshape(8, -1)[:, :18], old[..., 1] >> 28)  # 576 weights: 18 sub-blocks
    assert (nib.reshape(8, -1)[:, 18:] == 0).all()


@pytest.mark.parametrize("name", K_QUANTS)
@pytest.mark.parametrize("cols", [1024, 4096])
def test_kquant_kernel_decode_is_one_rounding_of_the_format(name: str, cols: int) -> None:
    """The kernel's K-quant layout + bit steps, replayed, give exactly fp16(fp16(d sc) q - fp16(dmin mn)) (Q3_K, Q6_K:
    fp16(fp16(d sc) (q - 2^(bits-1)))): every code, high bit and integer scale in its place. ggml's float32 products
    differ from that by one fp16 rounding of d sc and dmin mn."""
    fmt = get_format(name)
    w = torch.randn(40, cols, generator=torch.Generator().manual_seed(cols)) * 0.02
    w[:, ::97] *= 8
    qt = fmt.quantize(w)
    got = cuda_gemv.decode_kquant_reference(fmt, qt.data["qs"], cols)
    codes, params = fmt.unpack(qt)
    cols_params = fmt.expand(params, cols)
    s = cols_params["scale"].half().double()
    if "min" in cols_params:
        want = (s * codes.double() - cols_params["min"].half().double()).half()
    else:
        want = (s * (codes.double() - fmt.offset)).half()
    assert torch.equal(got, want)
    ref = fmt.dequantize(qt).double()
    s_abs, m_abs = s.abs(), cols_params.get("min", torch.zeros(1)).double().abs()
    assert ((got.double() - ref).abs() <= 2**-10 * (s_abs * 64 + m_abs + ref.abs())).all()


def test_kquant_layout_shapes_and_rows_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Q5_K at 512 columns: codes 4 bits, one scale pair per 32 weights, one (d, dmin) per superblock, one hi word
    per chunk; built in slices of rows, the layout is the one built at once."""
    fmt = get_format("q5_k")
    qt = fmt.quantize(torch.randn(7, 512, generator=torch.Generator().manual_seed(2)))
    whole = cuda_gemv.kquant_layout(fmt, qt.data["qs"], 512)
    assert [tuple(t.shape) for t in whole] == [(7, 64), (7, 16), (7, 2), (7, 16)]
    monkeypatch.setattr(cuda_gemv, "_LAYOUT_ROWS", 3)
    assert all(torch.equal(a, b) for a, b in zip(whole, cuda_gemv.kquant_layout(fmt, qt.data["qs"], 512),
                                                 strict=True))


@pytest.mark.parametrize(("name", "low", "hi"), [("int3_g128_sym", 32, 16), ("q5_1", 64, 16),
                                                 ("int6_g128_sym", 64, 32)])
def test_affine_layout_planes_and_rows_in_slices(name: str, low: int, hi: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-, 5- or 6-bit grid at 512 columns: the low plane packs 2 or 4 bits a code (as the 2- and 4-bit grids
    pack theirs), the high plane the rest; together they hold every code (the K-quant layout's planes, the same
    function); built in slices of rows, the layout is the one built at once."""
    fmt = get_format(name)
    qt = fmt.quantize(torch.randn(7, 512, generator=torch.Generator().manual_seed(3)))
    whole = cuda_gemv.affine_layout(fmt, qt.data["codes"], 512)
    assert [tuple(t.shape) for t in whole] == [(7, low), (7, hi)]
    codes, _ = fmt.unpack(qt)
    low_bits = 32 * low // 512
    assert torch.equal(whole[0], cuda_gemv.pack_bits(codes & ((1 << low_bits) - 1), low_bits).view(torch.int32))
    high_set = sum(bin(v & 0xFFFFFFFF).count("1") for v in whole[1].flatten().tolist())
    assert high_set == sum(bin(v).count("1") for v in (codes >> low_bits).flatten().tolist())
    monkeypatch.setattr(cuda_gemv, "_LAYOUT_ROWS", 3)
    assert all(torch.equal(a, b) for a, b in zip(whole, cuda_gemv.affine_layout(fmt, qt.data["codes"], 512),
                                                 strict=True))


@pytest.mark.parametrize("name", NOT_SERVED)
def test_planner_refuses_what_it_cannot_decode(name: str) -> None:
    assert cuda_gemv.plan(get_format(name), (256, 4096)) is None


def test_warps_split_k_only_where_each_keeps_two_steps() -> None:
    """16 warps per block when every warp still gets >= 2 steps of 4 chunks, else 8 (measured, docs/kernels.md)."""
    e8p_plan, q4_plan = (cuda_gemv.plan(get_format(n), (64, 4096)) for n in ("e8p_ch", "q4_0"))
    assert cuda_gemv.warps_for(e8p_plan, 4096) == 8  # 64 chunks of 64 weights: 16 steps
    assert cuda_gemv.warps_for(e8p_plan, 8192) == 16
    assert cuda_gemv.warps_for(q4_plan, 4096) == 16  # 128 chunks of 32 weights: 32 steps


@pytest.mark.parametrize(("low_bits", "hi_bits", "shifts"), [(2, 1, 3), (4, 1, 2), (4, 2, 2)])
def test_high_bit_fields_tile_their_word_with_few_shifts(low_bits: int, hi_bits: int, shifts: int) -> None:
    """The high bits of split codes (3-, 5-, 6-bit) fill each half of their hi word exactly once, and each word of
    low codes needs ``shifts`` distinct shifts to move its pairs' fields to their magic positions, none shared with
    another word of the same hi word (what cuda_gemv.hi_positions places them for)."""
    at = cuda_gemv.hi_positions(low_bits, hi_bits)
    half = 16 // low_bits
    scales = cuda_gemv._position_scales(low_bits, True)
    p = [int(scales[i % len(scales)]).bit_length() - 1 + low_bits for i in range(half)]
    per_hi = 16 // hi_bits // half
    for e in range(0, 4, per_hi):
        words = range(e, e + per_hi)
        bits = sorted(b for j in words for q in at[j] for b in range(q, q + hi_bits))
        assert bits == list(range(16))
        used = [{p[i] - at[j][i] for i in range(half)} for j in words]
        assert all(len(u) == shifts for u in used)
        assert len(set().union(*used)) == shifts * per_hi


def test_planner_refuses_unaligned_rows() -> None:
    assert cuda_gemv.plan(get_format("int2_g64_sym"), (64, 4096 + 32)) is None  # 16-byte chunks only
    assert cuda_gemv.plan(get_format("q4_k"), (64, 4096 + 128)) is None  # whole 256-weight superblocks only
    assert cuda_gemv.plan(get_format("int4_g128_sym"), (64, 576)) is not None  # last group short: 576 = 4x128+64
    assert cuda_gemv.plan(get_format("int4_g128_sym"), (64, 576)).group_shift == 7


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
@pytest.mark.parametrize("name", SERVED)
def test_every_kernel_variant_compiles_for_ampere_and_hopper(name: str) -> None:
    """NVRTC compiles each source the GEMV can build for a planned format (batch-1 staging or not, 8 or 16 warps,
    norm and residual stages), for sm_80 and sm_90: a kernel that would not compile on the GPU machine fails here,
    without a GPU."""
    p = cuda_gemv.plan(get_format(name), (64, 4096))
    plain = [(staged, gated, 0, False, full) for staged, gated in ((0, False), (1, False), (1, True), (2, False),
                                                                      (2, True))  # XS: none, one row, several
             for full in (False, True)]  # K a whole number of steps or not
    # a norm in the batch-1 staging (plain or gated), a residual in the epilogue (any staging): one warp count (neither
    # stage depends on it; the plain variants cover both). sm_90 differs from sm_80 only in the programmatic-launch
    # instructions (common.cuh), the same in every variant: one variant and the pinned row compile for sm_90, every
    # other for sm_80 alone. Both keep the test's time in CI down.
    folded = [(1, False, 1, False, True), (1, True, 2, False, True), (0, False, 0, True, True),
              (1, False, 0, True, True), (2, False, 0, True, True)]
    # 16 warps change constants, not code paths: once per staging, plain and whole steps
    jobs = []
    for staged, gated, norm, resid, full in plain + folded:
        stage = bool(norm or resid)
        for warps in (cuda_gemv.WARPS_FEW,) + (() if stage or gated or not full else (cuda_gemv.WARPS_MANY,)):
            blocks = cuda_gemv.min_blocks_for(warps, 1 if staged == 1 else 8)
            source = cuda_gemv._source(p, staged, warps, blocks, gated, full, norm, resid)
            jobs.append((source, "sm_80"))
    jobs.append((cuda_gemv._source(p, 0, cuda_gemv.WARPS_FEW, cuda_gemv.min_blocks_for(cuda_gemv.WARPS_FEW), False,
                                   True), "sm_90"))
    # the staged row's address pinned in a register (cuda_gemv.PIN_XS): batch 1, once
    blocks = cuda_gemv.min_blocks_for(cuda_gemv.WARPS_FEW, 1)
    jobs.append((cuda_gemv._source(p, 1, cuda_gemv.WARPS_FEW, blocks, False, True, pin=True), "sm_90"))
    compile_all(jobs, "gemv_mma.cu")


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
@pytest.mark.parametrize("name", ["iq2_xxs", "int4_g128_sym", "e8p_g256"])
def test_step_scaled_variants_compile(name: str) -> None:
    """The step-scaled kernels compile for sm_90: batch 1 staged (plain, normalized + gated, with a residual), batch
    8 staged or from L1/L2, two row blocks per warp, resident blocks, ragged K."""
    p = cuda_gemv.plan(get_format(name), (64, 8192))
    variants = [(1, False, 0, False, False, 1, True), (1, True, 2, False, False, 1, True),
                (1, False, 0, True, True, 1, True), (2, False, 0, False, False, 2, True),
                (0, False, 0, False, True, 2, True), (0, False, 0, False, False, 1, False)]
    jobs = []
    for staged, gated, norm, resid, resident, tiles, full in variants:
        warps = cuda_gemv.warps_for(p, 8192)
        source = cuda_gemv._source(p, staged, warps, cuda_gemv.min_blocks_for(warps, 1 if staged == 1 else 8, tiles),
                                   gated, full, norm, resid, resident, tiles)
        assert "#define STEP_SCALE 1" in source
        jobs.append((source, "sm_90"))
    compile_all(jobs, "gemv_mma.cu")


@pytest.mark.skipif(not nvrtc_found() or sass_count.nvdisasm_found() is None,
                    reason="needs NVRTC and Triton's nvdisasm")
def test_step_scaled_kernels_compile_without_spills() -> None:
    """The step-scaled kernels compile for sm_90 with no local-memory traffic (STL/LDL in the SASS) at the registers
    their launch bounds allow: batch 1 (8 and 16 warps, staged rows of 4096 and 14336), batch 8 with one and two
    row blocks per warp."""
    names = ["iq2_xxs", "int4_g128_sym", "e8p_g256"]
    jobs = []
    for name in names:
        for cols, m, tiles in ((4096, 1, 1), (14336, 1, 1), (4096, 8, 1), (4096, 8, 2)):
            p = cuda_gemv.plan(get_format(name), (64, cols))
            warps, xs = cuda_gemv.warps_for(p, cols), cuda_gemv.staging(m, cols, p)
            jobs.append(((name, cols, m, tiles), cuda_gemv._source(
                p, xs, warps, cuda_gemv.min_blocks_for(warps, m, tiles), False, True, 0, False,
                warps == cuda_gemv.WARPS_MANY, tiles)))
    _compile_without_local_memory(jobs)


def _compile_without_local_memory(jobs: list[tuple[object, str]]) -> None:
    """Each (case, source) of ``jobs`` compiles for sm_90 to a kernel with MMAs and no local-memory traffic (STL/LDL
    in its SASS)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # NVRTC lets go of the GIL
        listings = list(pool.map(sass_count.source_sass, [source for _, source in jobs]))
    for (case, _), listing in zip(jobs, listings, strict=True):
        assert "HMMA" in listing and sass_count.local_accesses(sass_count.instructions(listing)) == 0, case


@pytest.mark.skipif(not nvrtc_found() or sass_count.nvdisasm_found() is None,
                    reason="needs NVRTC and Triton's nvdisasm")
def test_norm_fused_split_plane_kernels_compile_without_spills() -> None:
    """A decode step's norm-fused GEMVs of the 3-bit split-plane formats at K = 4096 (8 warps; q/k/v plain, gate/up
    gated) compile for sm_90 with no local-memory traffic at the blocks :func:`cuda_gemv.norm_blocks` gives them (at
    4 blocks, 64 registers, Q3_K's spilled 13 accesses a step)."""
    jobs = []
    for name in ("q3_k", "int3_g128_sym", "int3_g64_asym"):
        p = cuda_gemv.plan(get_format(name), (64, 4096))
        warps = cuda_gemv.warps_for(p, 4096)
        assert warps < cuda_gemv.WARPS_MANY
        blocks = cuda_gemv.norm_blocks(p, warps, cuda_gemv.min_blocks_for(warps, 1))
        for gated in (False, True):
            jobs.append(((name, gated), cuda_gemv._source(p, cuda_gemv.staging(1, 4096, p), warps, blocks, gated,
                                                          True, cuda_gemv.norm_groups(p, 4096, warps), not gated)))
    _compile_without_local_memory(jobs)


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
@pytest.mark.parametrize("name", ["q4_0", "nz2_ch", "e8p_ch", "iq2_xxs"])
def test_resident_variants_compile(name: str) -> None:
    """The 16-warp kernels whose blocks loop over row blocks (RESIDENT), plain, normalized + gated and with a
    residual, batch 1 and 8, compile for sm_90."""
    p = cuda_gemv.plan(get_format(name), (64, 8192))
    warps = cuda_gemv.warps_for(p, 8192)
    assert warps == cuda_gemv.WARPS_MANY
    sources = [cuda_gemv._source(p, staged, warps, 2, gated, True, norm, resid, True)
               for staged, gated, norm, resid in ((1, False, 0, False), (1, True, 2, False), (1, False, 0, True),
                                                  (0, False, 0, False))]
    assert all("#define RESIDENT 1" in source for source in sources)
    compile_all([(source, "sm_90") for source in sources], "gemv_mma.cu")


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
@pytest.mark.parametrize("name", ["nz2_ch", "int2_g32_asym", "e8p_ch", "iq2_xxs", "q2_k", "q3_k", "q4_0", "q4_k",
                                  "q6_k"])
def test_two_row_blocks_per_warp_compile(name: str) -> None:
    """TILES 2 (two row blocks per warp, batches): rows of 4096 (staged batch, 8 warps) and 11008 (from L2, 16
    warps, ragged steps), plain, gated, with a residual and looping over row blocks, compile for sm_90, and every
    16-warp one fits one block per SM without spilling more than the K-quants' allowance (NVRTC's register
    count)."""
    jobs = []
    for cols in (4096, 11008):
        p = cuda_gemv.plan(get_format(name), (64, cols))
        if p is None:
            continue
        warps, staged = cuda_gemv.warps_for(p, cols), cuda_gemv.staging(8, cols, p)
        full = cols % (4 * cuda_gemv.half_per_chunk(p)) == 0
        blocks = cuda_gemv.min_blocks_for(warps, 8, 2)
        for gated, resid, loop in ((False, False, False), (True, False, warps == 16), (False, True, warps == 16)):
            source = cuda_gemv._source(p, staged, warps, blocks, gated, full, 0, resid, loop, 2)
            assert "#define TILES 2" in source
            jobs.append((source, "sm_90"))
    compile_all(jobs, "gemv_mma.cu")


def test_warps_per_block_can_be_set_for_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_CUDA_WARPS: any 1..32 warps a block for every call, with as many resident blocks as keep 64 registers
    a thread (one past 16 warps); "auto" keeps warps_for's choice; anything else is refused by name."""
    p = cuda_gemv.plan(get_format("nz2_ch"), (64, 4096))
    assert cuda_gemv.warps_for(p, 4096) == 8 and cuda_gemv.warps_for(p, 14336) == 16
    assert [cuda_gemv.min_blocks_for(w, 1) for w in (4, 8, 12, 16, 24, 32)] == [4, 4, 2, 2, 1, 1]
    assert [cuda_gemv.min_blocks_for(w, 8) for w in (8, 16)] == [3, 2]
    monkeypatch.setattr(cuda_gemv, "WARPS_SET", "24")
    assert cuda_gemv.warps_for(p, 4096) == 24 == cuda_gemv.launch(p, 1, 4096, 64, torch.device("cpu")).warps
    for bad in ("0", "33", "many", "-8"):
        monkeypatch.setattr(cuda_gemv, "WARPS_SET", bad)
        with pytest.raises(ValueError, match="LOWBIT_CUDA_WARPS"):
            cuda_gemv.warps_for(p, 4096)


def test_two_row_blocks_per_warp_only_where_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default (auto) batches take two row blocks per warp on formats of 64 weights per chunk: with rows from
    L1/L2, or staged for the 2-bit grids and E8P above 4 rows, and only where the pairs of row blocks fill half the
    SMs; batch 1 and the 4-bit grids keep one. LOWBIT_CUDA_TILES sets every call. Two per warp fit one 16-warp
    block per SM (or two of 8)."""
    from lowbit.kernels import verified

    nz2, q4, iq2, q2k = (cuda_gemv.plan(get_format(n), (64, 4096)) for n in ("nz2_ch", "q4_0", "iq2_xxs", "q2_k"))
    monkeypatch.setattr(cuda_gemv, "ROW_TILES", "auto")
    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset())
    for p in (nz2, iq2, q2k):  # rows from L1/L2
        assert cuda_gemv.row_tiles(p, 8, 0, 256, 132) == 2 and cuda_gemv.row_tiles(p, 4, 0, 256, 132) == 2
    assert cuda_gemv.row_tiles(nz2, 8, 2, 688, 132) == 2 and cuda_gemv.row_tiles(nz2, 4, 2, 688, 132) == 1
    assert cuda_gemv.row_tiles(iq2, 8, 2, 688, 132) == 1 and cuda_gemv.row_tiles(q2k, 8, 2, 688, 132) == 1
    assert cuda_gemv.row_tiles(nz2, 1, 1, 256, 132) == 1 and cuda_gemv.row_tiles(q4, 8, 0, 256, 132) == 1
    assert cuda_gemv.row_tiles(nz2, 8, 0, 64, 132) == 1  # 1024 rows: 32 pairs on 132 SMs
    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset({"row_tiles"}))
    assert cuda_gemv.row_tiles(nz2, 8, 0, 256, 132) == 1
    monkeypatch.setattr(cuda_gemv, "ROW_TILES", "2")
    assert cuda_gemv.row_tiles(q4, 3, 0, 8, 132) == 2 and cuda_gemv.row_tiles(nz2, 1, 1, 8, 132) == 2
    monkeypatch.setattr(cuda_gemv, "ROW_TILES", "4")
    with pytest.raises(ValueError, match="LOWBIT_CUDA_TILES"):
        cuda_gemv.row_tiles(nz2, 8, 0, 256, 132)
    assert cuda_gemv.min_blocks_for(cuda_gemv.WARPS_MANY, 8, 2) == 1
    assert cuda_gemv.min_blocks_for(cuda_gemv.WARPS_FEW, 8, 2) == 2


def test_resident_grid_waits_for_its_gpu_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default (auto) the resident grid is used only once resident_gemv has left GPU_UNVERIFIED."""
    from lowbit.kernels import verified

    monkeypatch.setattr(cuda_gemv, "RESIDENT_GRID", "auto")
    assert cuda_gemv._resident_grid() == ("resident_gemv" not in verified.GPU_UNVERIFIED)
    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset())
    assert cuda_gemv._resident_grid()
    monkeypatch.setattr(cuda_gemv, "RESIDENT_GRID", "0")
    assert not cuda_gemv._resident_grid()


def test_batches_are_staged_within_their_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 always (up to 32 KB); batches of 2-8 rows within 64 KB and only where a chunk holds 64 weights (the
    4-bit grids measured slower staged, docs/kernels.md)."""
    nz2, q4 = (cuda_gemv.plan(get_format(n), (64, 4096)) for n in ("nz2_ch", "q4_0"))
    for p in (nz2, q4):
        assert cuda_gemv.staging(1, 4096, p) == 1 and cuda_gemv.staging(1, 16384, p) == 1
        assert cuda_gemv.staging(1, 16448, p) == 0
    assert cuda_gemv.staging(8, 4096, nz2) == 2 and cuda_gemv.staging(8, 11008, nz2) == 0
    assert cuda_gemv.staging(2, 11008, nz2) == 2 and cuda_gemv.staging(8, 4096, q4) == 0
    monkeypatch.setattr(cuda_gemv, "STAGED_ROWS", 1)
    assert cuda_gemv.staging(8, 4096, nz2) == 0 and cuda_gemv.staging(1, 4096, nz2) == 1


def test_batch_rows_past_64_kb_are_staged_only_where_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on an H100 (132 SMs, 227 KB a block): batches of more than 4 rows past 64 KB are staged where each block
    stages them once for two row blocks (two per warp, IQ2_XXS's too, or looping blocks), not for plans with high
    bits, not where LOWBIT_CUDA_STAGED_ROWS_BIG=0; the warps' partial sums after the rows where blocks loop, else
    over them. Staged 8-warp batches loop unless LOWBIT_CUDA_RESIDENT=0."""
    monkeypatch.setattr(cuda_gemv, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")  # sized as an H100 (device.shared_memory)

    def at(name: str, shape: tuple[int, int], m: int) -> cuda_gemv.Launch:
        return cuda_gemv.launch(cuda_gemv.plan(get_format(name), shape), m, shape[1], shape[0], cpu)

    big = at("nz2_ch", (4096, 14336), 8)
    assert (big.xs, big.per_warp, big.grid, big.tiles, big.shared) == (2, 2, 128, 128, 8 * 14336 * 2)
    looped = at("q2_k", (4096, 11008), 8)  # one row block per warp, blocks looping
    assert (looped.xs, looped.per_warp, looped.grid) == (2, 1, 132)
    assert looped.shared == 8 * 11008 * 2 + cuda_gemv.part_bytes(16)
    assert at("q2_k", (4096, 14336), 8).xs == 0  # one row block per warp, one tile per block
    wide = at("iq2_xxs", (4096, 14336), 8)  # IQ2_XXS: two row blocks per warp where its rows pass 64 KB
    assert (wide.xs, wide.per_warp) == (2, 2) and at("iq2_xxs", (4096, 4096), 8).per_warp == 1
    assert at("nz2_ch", (4096, 11008), 4).xs == 0  # batch 4: one row block per warp
    assert at("int3_g128_sym", (4096, 11008), 8).xs == 0  # high bits
    small = at("nz2_ch", (22016, 4096), 8)
    assert (small.xs, small.warps, small.grid, small.tiles) == (2, 8, 264, 688)
    assert small.shared == 8 * 4096 * 2 + cuda_gemv.part_bytes(8)
    monkeypatch.setattr(cuda_gemv, "STAGED_ROWS_BIG", False)
    assert at("nz2_ch", (4096, 11008), 8).xs == 0
    monkeypatch.setattr(cuda_gemv, "RESIDENT_GRID", "0")
    small = at("nz2_ch", (22016, 4096), 8)
    assert (small.grid, small.shared) == (688, 8 * 4096 * 2)


@pytest.mark.parametrize("setting, value", [("WARPS_SET", "4"), ("ROW_TILES", "2"), ("STAGED_X", False),
                                            ("STAGED_ROWS", 1), ("STAGED_ROWS_BIG", False), ("RESIDENT_GRID", "0"),
                                            ("GPU_UNVERIFIED", frozenset({"row_tiles", "resident_gemv"})),
                                            ("sm_count", lambda device: 7),
                                            ("shared_memory", lambda device: (99 * 1024, 100 * 1024))])
def test_a_calls_launch_is_worked_out_once_and_follows_the_switches(setting: str, value: object,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv keeps each configuration's launch (cuda_gemv._call) after its first call; a switch changed at run time
    (as tests and sweeps change them) gives the launch it gives without the memo, for calls it changes."""
    from lowbit.kernels import verified

    monkeypatch.setattr(cuda_gemv, "sm_count", lambda device: 132)  # sized as an H100
    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset())
    cpu = torch.device("cpu")
    calls = [(name, (n, k), m) for name in ("nz2_ch", "q4_0", "iq2_xxs") for n, k in ((4096, 14336), (22016, 4096))
             for m in (1, 8)]

    def memo(name: str, shape: tuple[int, int], m: int) -> cuda_gemv.Call:
        return cuda_gemv._call(cuda_gemv.plan(get_format(name), shape), m, shape[1], shape[0], cpu, False, False,
                               False)

    before = [memo(*c) for c in calls]
    assert [memo(*c) for c in calls] == before  # kept: the same objects
    assert all(a is b for a, b in zip(before, [memo(*c) for c in calls], strict=True))
    monkeypatch.setattr(verified if setting == "GPU_UNVERIFIED" else cuda_gemv, setting, value)
    after = [memo(*c) for c in calls]
    fresh = [cuda_gemv.launch(cuda_gemv.plan(get_format(name), shape), m, shape[1], shape[0], cpu)
             for name, shape, m in calls]
    assert [c.at for c in after] == fresh
    assert any(c.at != b.at for c, b in zip(after, before, strict=True))  # the switch changes some launch


def test_norm_groups_keep_a_7b_row_in_one_register_group() -> None:
    """The normalized staging holds each thread's units in registers: one or two groups for rows of 4096 and 8192,
    none (torch normalizes first) past MAX_NORM_QS."""
    # E8P's 8 warps take single units; Q2_K's and Q4_K's rows are staged as the 2- and 4-bit grids' are
    for name, at_4096 in (("nz2_ch", 1), ("q4_0", 1), ("e8p_ch", 2), ("q2_k", 1), ("q4_k", 1)):
        p = cuda_gemv.plan(get_format(name), (64, 4096))
        assert cuda_gemv.norm_groups(p, 4096, cuda_gemv.warps_for(p, 4096)) == at_4096
        assert 1 <= cuda_gemv.norm_groups(p, 8192, cuda_gemv.warps_for(p, 8192)) <= 2
    q4 = cuda_gemv.plan(get_format("q4_0"), (64, 4096))
    assert cuda_gemv.norm_groups(q4, 16384, cuda_gemv.WARPS_FEW) == 0  # 8 groups of 256 threads: too many


def test_shared_memory_sizes() -> None:
    """One staged row has a unit of padding after every 8; several rows are each padded to whole groups of 8 units
    (the swizzle stays inside them); chunk scales where a 16-byte chunk lies inside one scale group."""
    assert cuda_gemv.staged_bytes(1, 4096) == 8192 + 1024 and cuda_gemv.staged_bytes(1, 544) == 16 * (68 + 9)
    assert cuda_gemv.staged_bytes(8, 4096) == 8 * 8192 and cuda_gemv.staged_bytes(2, 544) == 2 * 1152
    q4, nz2 = (cuda_gemv.plan(get_format(n), (64, 4096)) for n in ("q4_0", "nz2_ch"))
    assert q4.chunk_scale() and not nz2.chunk_scale()


def test_early_launch_is_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder's early_launch block sets its own thread only: another thread keeps the process default."""
    monkeypatch.setattr(cuda_gemv, "EARLY_LAUNCH", False)
    inside, seen = threading.Event(), []
    release = threading.Event()

    def decoder() -> None:
        with cuda_gemv.early_launch(True):
            seen.append(cuda_gemv.launches_early())
            inside.set()
            release.wait(10)

    t = threading.Thread(target=decoder)
    t.start()
    inside.wait(10)
    seen.append(cuda_gemv.launches_early())
    release.set()
    t.join(10)
    with cuda_gemv.early_launch(True):
        with cuda_gemv.early_launch(False):
            seen.append(cuda_gemv.launches_early())
        seen.append(cuda_gemv.launches_early())
    seen.append(cuda_gemv.launches_early())
    assert seen == [True, False, False, True, False]


def test_launch_structs_have_the_driver_layout() -> None:
    from lowbit.kernels import cuda_jit

    assert ctypes.sizeof(cuda_jit._LaunchAttribute) == 72  # id, 4 bytes of padding, a 64-byte union
    assert cuda_jit._LaunchConfig.stream.offset == 32 and ctypes.sizeof(cuda_jit._LaunchConfig) == 56


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

@pytest.fixture(params=[8, 1], ids=["staged-rows", "rows-from-l2"])
def gemv_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Batches of 2-8 rows staged in shared memory (the default where it pays) or read from L1/L2 at every step."""
    monkeypatch.setattr(cuda_gemv, "STAGED_ROWS", request.param)
    return request.param


def _blocks_loop(monkeypatch: pytest.MonkeyPatch, sms: int) -> None:
    """Launches that loop over row blocks, on a GPU seen as ``sms`` SMs: few resident blocks, many row blocks each."""
    monkeypatch.setattr(cuda_gemv, "RESIDENT_GRID", "1")
    monkeypatch.setattr(cuda_gemv, "sm_count", lambda device: sms)


@cache  # the staging modes share each weight: quantizing it once keeps the GPU run short
def _packed(name: str, shape: tuple[int, int], seed: int):  # noqa: ANN202
    from lowbit.formats import QuantizedTensor

    if name in K_QUANTS and shape[1] % 256:
        pytest.skip(f"{name} needs rows of whole 256-weight superblocks")
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[:, ::97] *= 8  # a few large columns, as real weights have
    qt = fmt.quantize(w)
    return fmt, QuantizedTensor(qt.format, qt.shape, {k: v.cuda() for k, v in qt.data.items()})


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("shape", [(256, 1024), (200, 576), (48, 1536), (40, 8192)])  # 8192: 16 warps
@pytest.mark.parametrize("m", [1, 3, 8])
def test_cuda_gemv_matches_reference_on_gpu(name: str, shape: tuple[int, int], m: int, gemv_mode) -> None:
    from lowbit.kernels.reference import dequant_matmul_reference

    fmt, qt = _packed(name, shape, seed=zlib.crc32(f"{name}{shape}{m}".encode()) % 1000)
    p = cuda_gemv.plan(fmt, shape)
    if p is None:
        pytest.skip(f"{name} at {shape} is not served")
    x = torch.randn(m, shape[1], device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(m))
    y = cuda_gemv.gemv(x, fmt, qt, p)
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 2e-3, err


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["iq2_xxs", "int4_g128_sym", "e8p_g256"])
@pytest.mark.parametrize("shape", [(256, 1024), (200, 576), (40, 8192)])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("layout", ["auto", "two-per-warp", "looping"])
def test_step_scaled_gemv_matches_reference_on_gpu(name: str, shape: tuple[int, int], m: int, layout: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-scaled kernels (plain, with a residual, gated; one or two row blocks per warp; blocks looping over
    row blocks) against the float64 product of the format's weights."""
    from lowbit.kernels.reference import dequant_matmul_reference

    if layout != "auto":
        monkeypatch.setattr(cuda_gemv, "ROW_TILES", "2")
    if layout == "looping":
        _blocks_loop(monkeypatch, sms=2)  # 16-warp kernels: 2 blocks loop over all
    fmt, qt = _packed(name, shape, seed=5)
    p = cuda_gemv.plan(fmt, shape)
    if p is None:
        pytest.skip(f"{name} at {shape} is not served")
    gen = torch.Generator("cuda").manual_seed(m)
    x = torch.randn(m, shape[1], device="cuda", dtype=torch.float16, generator=gen)
    res = torch.randn(m, shape[0], device="cuda", dtype=torch.float16, generator=gen)
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    out = cuda_gemv.gemv(x, fmt, qt, p)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-3
    gate, up = ref.chunk(2, dim=-1)
    for got, want in ((cuda_gemv.gemv(x, fmt, qt, p, residual=res).double() - res.double(), ref),
                      (cuda_gemv.gemv(x, fmt, qt, p, gated=True).double(), torch.nn.functional.silu(gate) * up)):
        assert float((got - want).norm() / want.norm()) < 3e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("m", [12, 16])
def test_batches_of_9_to_16_rows_run_on_the_cuda_gemv(name: str, m: int, gemv_mode) -> None:
    """Batches past the MMA's 8 columns run the kernel once per 8 rows (plain and gated), through dispatch too:
    E8P and IQ2_XXS would otherwise dequantize whole matrices."""
    from lowbit.kernels import dispatch
    from lowbit.kernels.reference import dequant_matmul_reference

    fmt, qt = _packed(name, (2 * 200, 1024), seed=m)
    if cuda_gemv.plan(fmt, qt.shape) is None:
        pytest.skip(f"{name} at 1024 columns is not served")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(m))
    assert dispatch.route(x, fmt, qt.shape) == "cuda"
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    y = dispatch.dequant_matmul(x, fmt, qt)
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3
    gate, up = ref.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = cuda_gemv.gemv(x, fmt, qt, cuda_gemv.plan(fmt, qt.shape), gated=True)
    assert float((got.double() - want).norm() / want.norm()) < 2e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize(("rows", "cols"), [(2 * 200, 576), (2 * 1024, 4096)])  # [gate; up]: 200 or 1024 each
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gated_gemv_is_silu_gate_times_up_on_gpu(name: str, rows: int, cols: int, m: int, gemv_mode) -> None:
    """The epilogue of a fused gate/up GEMV: silu(x gate^T) * (x up^T) from the fp32 sums, against float64."""
    from lowbit.kernels.reference import dequant_matmul_reference

    fmt, qt = _packed(name, (rows, cols), seed=rows + m)
    p = cuda_gemv.plan(fmt, qt.shape)
    if p is None:
        pytest.skip(f"{name} at {cols} columns is not served")
    x = torch.randn(m, cols, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(m))
    y = cuda_gemv.gemv(x, fmt, qt, p, gated=True)
    gate, up = dequant_matmul_reference(x.double(), fmt, qt).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert y.shape == (m, rows // 2)
    assert float((y.double() - ref).norm() / ref.norm()) < 3e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_prologue_and_residual_epilogue_on_gpu(name: str, m: int, gated: bool, gemv_mode) -> None:
    """y = residual + RMSNorm(x) W^T, and the gated product of the normalized x: at batch 1 the norm is computed in
    the kernel's staging, otherwise in torch first; x has channels in the thousands, as a residual stream does."""
    from lowbit.kernels import cuda_jit
    from lowbit.kernels.reference import dequant_matmul_reference, rms_norm_reference

    fmt, qt = _packed(name, (2 * 256, 1024), seed=7 + m)
    p = cuda_gemv.plan(fmt, qt.shape)
    if p is None:
        pytest.skip(f"{name} at 1024 columns is not served")
    gen = torch.Generator("cuda").manual_seed(m)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.float16, generator=gen)
    x[:, [5, 77, 300]] = torch.tensor([3000.0, -2500.0, 1800.0], device="cuda", dtype=torch.float16)
    w = (1 + 0.3 * torch.randn(1024, device="cuda", generator=gen)).half()
    ref = dequant_matmul_reference(rms_norm_reference(x, w, 1e-5).double(), fmt, qt)
    if gated:
        y = cuda_gemv.gemv(x, fmt, qt, p, gated=True, norm=(w, 1e-5))
        gate, up = ref.chunk(2, dim=-1)
        want, base = torch.nn.functional.silu(gate) * up, 0
    else:
        res = torch.randn(m, 2 * 256, device="cuda", dtype=torch.float16, generator=gen)
        y = cuda_gemv.gemv(x, fmt, qt, p, norm=(w, 1e-5), residual=res)
        want, base = ref, res.double()
    assert torch.isfinite(y).all()
    assert float((y.double() - base - want).norm() / want.norm()) < 3e-3
    if m == 1:  # the kernel normalized the row: its NORM variant was built and launched
        xs, warps = cuda_gemv.staging(1, 1024, p), cuda_gemv.warps_for(p, 1024)
        blocks = cuda_gemv.norm_blocks(p, warps, cuda_gemv.min_blocks_for(warps, 1))
        source = cuda_gemv._source(p, xs, warps, blocks, gated, True, cuda_gemv.norm_groups(p, 1024, warps),
                                   not gated)
        assert (source, "gemv_mma", "cuda:0") in cuda_jit._KERNELS


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int2_g64_sym", "q4_0", "e8p_ch", "iq2_xxs", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_cuda_gemv_outlier_activations_do_not_overflow(name: str, gemv_mode) -> None:
    """Massive activations (a few channels in the thousands, as SmolLM's): fp32 accumulation keeps y finite."""
    from lowbit.kernels.reference import dequant_matmul_reference

    fmt, qt = _packed(name, (512, 1024), seed=3)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    x[0, [5, 77, 300]] = torch.tensor([3000.0, -2500.0, 1800.0], device="cuda", dtype=torch.float16)
    y = cuda_gemv.gemv(x, fmt, qt, cuda_gemv.plan(fmt, qt.shape))
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    assert torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3


@gpu
@pytest.mark.gpu
def test_planned_formats_route_to_the_cuda_gemv_up_to_sixteen_rows() -> None:
    from lowbit.kernels.dispatch import route
    from lowbit.kernels.verified import GPU_UNVERIFIED

    x = torch.zeros(cuda_gemv.MAX_ROWS + 1, 4096, device="cuda", dtype=torch.float16)
    for name in ("q4_0", "int4_g128_sym", "int2_g64_sym", "nz2_ch", "e8p_ch", "iq2_xxs", "int3_g128_sym", "q5_0",
                 *K_QUANTS):
        if f"cuda_{name}" in GPU_UNVERIFIED:
            continue
        assert route(x[:1], get_format(name), (4096, 4096)) == "cuda"
        assert route(x[:cuda_gemv.MAX_ROWS], get_format(name), (4096, 4096)) == "cuda"  # two launches
        assert route(x, get_format(name), (4096, 4096)) != "cuda"
    assert route(x[:1], get_format("int7_g128_sym"), (4096, 4096)) == "triton"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("cols", [4096, 14336])
@pytest.mark.parametrize("m", [1, 8])
def test_cuda_gemv_kernels_fit_their_blocks_without_spills(name: str, cols: int, m: int) -> None:
    """Every planned kernel keeps its registers inside __launch_bounds__, spilling at most a few bytes (the 16-warp
    batch-8 2-bit kernel spills 8 at 64 registers and was still measured faster than with more registers). K-quant
    kernels, whose scale and high-bit words take registers of their own, spill more at 2 blocks of 16 warps per SM
    (H200: Q5_K / Q6_K up to 56 bytes, Q2_K 56 and Q3_K 96 at batch 8 and 14336 columns; Q3_K 120 since its high
    bits are placed for shared shifts, which measured no slower at batch 8 on an H100: gemv-ab-h100-hi-at2-b8.json,
    4096x14336 21.04 against 21.19 us), and measured no slower
    there than at one block per SM, which has the registers to spare (batch-1 means of copy bandwidth q6_k 55% vs
    47%, q5_k 49% vs 45%: benchmarks/results/kernels-h200-kquants-cuda.json vs -cuda-1block.json; batch 8 q2_k 20%
    vs 19%, q3_k 22% vs 22%, q5_k 42% vs 37%, q6_k 46% vs 43%: kernels-h200-kq-batch8-2blocks.json vs -1block.json)."""
    from lowbit.kernels import cuda_jit

    p = cuda_gemv.plan(get_format(name), (64, cols))
    if p is None:
        pytest.skip(f"{name} at {cols} columns is not served")
    warps = cuda_gemv.warps_for(p, cols)
    staged = cuda_gemv.staging(m, cols, p)
    full = cols % (4 * cuda_gemv.half_per_chunk(p)) == 0
    # plain, and as a decode step's folded layers run it: a norm in the batch-1 staging, a residual in the epilogue
    norm_qs = cuda_gemv.norm_groups(p, cols, warps)
    # and, for 16-warp kernels, with the blocks looping over row blocks (RESIDENT)
    resident = (False, True) if warps == cuda_gemv.WARPS_MANY else (False,)
    # and batches with two row blocks per warp (TILES 2) where row_tiles may choose them
    per_warp = (1, 2) if m > 1 and cuda_gemv.half_per_chunk(p) == 64 else (1,)
    for norm, resid in ((0, False),) + (((norm_qs, False), (0, True)) if staged == 1 else ()):
        for loop, tiles in ((loop, tiles) for loop in resident for tiles in per_warp):
            blocks = cuda_gemv.min_blocks_for(warps, m, tiles)
            blocks = cuda_gemv.norm_blocks(p, warps, blocks) if norm else blocks
            kern = cuda_jit.kernel(cuda_gemv._source(p, staged, warps, blocks, False, full, norm, resid, loop, tiles),
                                   "gemv_mma", torch.device("cuda"))
            assert kern.attribute(3) <= (120 if p.kind == 3 or p.hi_bits else 16)  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
            assert kern.attribute(4) * warps * 32 * blocks <= 65536  # NUM_REGS


def _plain_residual_and_gated_match_reference(fmt: Format, qt: QuantizedTensor, p: cuda_gemv.Plan, m: int) -> None:
    """The GEMV of ``m`` random rows on the GPU against the float64 reference: plain, with a residual added in the
    epilogue, and gated (``qt``'s rows read as [gate; up])."""
    from lowbit.kernels.reference import dequant_matmul_reference

    rows, cols = qt.shape
    gen = torch.Generator("cuda").manual_seed(m)
    x = torch.randn(m, cols, device="cuda", dtype=torch.float16, generator=gen)
    res = torch.randn(m, rows, device="cuda", dtype=torch.float16, generator=gen)
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    gate, up = ref.chunk(2, dim=-1)
    for got, want in ((cuda_gemv.gemv(x, fmt, qt, p).double(), ref),
                      (cuda_gemv.gemv(x, fmt, qt, p, residual=res).double() - res.double(), ref),
                      (cuda_gemv.gemv(x, fmt, qt, p, gated=True).double(), torch.nn.functional.silu(gate) * up)):
        assert float((got - want).norm() / want.norm()) < 3e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nz2_ch", "int2_g32_asym", "e8p_ch", "iq2_xxs", "q2_k", "q3_k", "q4_k"])
@pytest.mark.parametrize("cols", [1024, 11008])  # 11008: 16 warps, K not a whole number of steps
@pytest.mark.parametrize("m", [2, 8])
@pytest.mark.parametrize("loop", [False, True])
def test_two_row_blocks_per_warp_on_gpu(name: str, cols: int, m: int, loop: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """TILES 2 against the float64 reference: 200 rows (the last group of 32 half empty; gated: 100 gate rows),
    staged and unstaged batches, plain, with a residual and gated, and (``loop``) two resident blocks looping over
    the groups."""
    monkeypatch.setattr(cuda_gemv, "ROW_TILES", "2")
    if loop:
        _blocks_loop(monkeypatch, sms=2)  # 2 blocks of 16 warps, 1 per SM
    fmt, qt = _packed(name, (200, cols), seed=cols + m + 1)
    p = cuda_gemv.plan(fmt, qt.shape)
    if p is None:
        pytest.skip(f"{name} at {cols} columns is not served")
    _plain_residual_and_gated_match_reference(fmt, qt, p, m)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nz2_ch", "int2_g64_sym", "int3_g128_sym", "e8p_ch", "iq2_xxs", "q2_k"])
@pytest.mark.parametrize(("cols", "m", "loop"), [(14336, 8, False), (11008, 8, True), (11008, 4, False),
                                                 (4096, 8, True), (4096, 3, True)])
def test_batch_rows_staged_past_64_kb_on_gpu(name: str, cols: int, m: int, loop: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch rows staged in the shared memory a block may opt in to (8 rows of 14336 and 11008, 4 of 11008), the
    warps' partial sums over them or (``loop``: two resident blocks of 16 warps, or of 8 at 4096 columns, looping
    over 200 rows) after them, against the float64 reference: plain, with a residual and gated."""
    if loop:
        _blocks_loop(monkeypatch, sms=1)
    fmt, qt = _packed(name, (200, cols), seed=cols + m)
    p = cuda_gemv.plan(fmt, qt.shape)
    assert cuda_gemv.staging(m, cols, p, cuda_gemv.rows_room(torch.device("cuda"))) == 2
    _plain_residual_and_gated_match_reference(fmt, qt, p, m)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nz2_ch", "q4_0", "int2_g64_sym", "int4_g128_sym", "int3_g128_sym", "e8p_ch",
                                  "iq2_xxs", "q5_k"])
@pytest.mark.parametrize("cols", [4096, 11008])
@pytest.mark.parametrize("mode", ["1", "auto"])
def test_pinned_row_address_on_gpu(name: str, cols: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_CUDA_PIN_XS=1 and auto: batch-1 kernels that keep the staged row's shared address in a register (auto:
    the affine grids, where the driver reports no more local memory than without), plain, with a residual and gated,
    against the float64 reference, and bit for bit against the kernel without it."""
    monkeypatch.setattr(cuda_gemv, "PIN_XS", mode)
    fmt, qt = _packed(name, (200, cols), seed=cols + 7)
    p = cuda_gemv.plan(fmt, qt.shape)
    if p is None:
        pytest.skip(f"{name} at {cols} columns is not served")
    cuda = torch.device("cuda")
    call = cuda_gemv._call(p, 1, cols, 200, cuda, False, False, False)
    pin = "#define PIN_XS 1" in call.source
    if mode == "auto":
        plain = call.source.replace("#define PIN_XS 1", "#define PIN_XS 0")
        pinned = plain.replace("#define PIN_XS 0", "#define PIN_XS 1")
        spills_no_more = cuda_gemv._spill_bytes(pinned, cuda) <= cuda_gemv._spill_bytes(plain, cuda)
        assert pin == (p.kind == 0 and spills_no_more)
    else:
        assert pin
    _plain_residual_and_gated_match_reference(fmt, qt, p, 1)
    # only the row's address is computed differently: the pinned kernel's outputs are the plain kernel's bits
    x = torch.randn(1, cols, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(3))
    got = cuda_gemv.gemv(x, fmt, qt, p, gated=True)
    monkeypatch.setattr(cuda_gemv, "PIN_XS", "0")
    assert torch.equal(got, cuda_gemv.gemv(x, fmt, qt, p, gated=True))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "m", "warps"), [("nz2_ch", 1, 24), ("e8p_ch", 8, 12), ("q4_0", 3, 4),
                                                  ("iq2_xxs", 8, 32), ("q3_k", 1, 20)])
def test_any_number_of_warps_on_gpu(name: str, m: int, warps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_CUDA_WARPS (sweeps): blocks of any 1..32 warps, plain, residual and gated, against the reference."""
    monkeypatch.setattr(cuda_gemv, "WARPS_SET", str(warps))
    fmt, qt = _packed(name, (200, 4608), seed=warps)
    p = cuda_gemv.plan(fmt, qt.shape)
    assert cuda_gemv.launch(p, m, 4608, 200, torch.device("cuda")).warps == warps
    _plain_residual_and_gated_match_reference(fmt, qt, p, m)


@gpu
@pytest.mark.gpu
def test_a_kernel_loaded_from_the_disk_cache_runs_as_compiled(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine code cuda_jit keeps in $LOWBIT_HOME/cuda, loaded by a new kernel object without NVRTC, gives the
    freshly compiled kernel's bits."""
    from lowbit.kernels import cuda_jit

    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    monkeypatch.setattr(cuda_jit, "DISK_CACHE", True)
    fmt, qt = _packed("e8p_ch", (256, 4096), seed=1)
    p = cuda_gemv.plan(fmt, qt.shape)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(0))
    monkeypatch.setattr(cuda_jit, "_KERNELS", {})
    compiled = cuda_gemv.gemv(x, fmt, qt, p)
    assert any((tmp_path / "cuda").glob("*.cubin"))

    def refuse(*args: object) -> bytes:
        raise AssertionError("compiled again")

    monkeypatch.setattr(cuda_jit, "_KERNELS", {})
    monkeypatch.setattr(cuda_jit, "compile_cubin", refuse)
    assert torch.equal(cuda_gemv.gemv(x, fmt, qt, p), compiled)


@gpu
@pytest.mark.gpu
def test_early_launch_gives_identical_results_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of GEMVs, each reading the one before's output: launched early (programmatic dependent launch, Hopper)
    inside a CUDA graph, they give the very bits of plain launches."""
    layers = [_packed(name, (1024, 1024), seed=i) for i, name in enumerate(["nz2_ch", "q4_0", "e8p_ch", "iq2_xxs"])]
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(0))

    def run() -> torch.Tensor:
        h = x
        for fmt, qt in layers:
            h = cuda_gemv.gemv(h, fmt, qt, cuda_gemv.plan(fmt, qt.shape))
        return h

    monkeypatch.setattr(cuda_gemv, "EARLY_LAUNCH", False)
    plain = run()
    monkeypatch.setattr(cuda_gemv, "EARLY_LAUNCH", True)
    assert torch.equal(run(), plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "cols"), [("q4_0", 4096), ("q4_0", 4128), ("int4_g128_asym", 4096),
                                            ("nz2_ch", 8192), ("e8p_ch", 8192), ("iq2_xxs", 8192), ("q2_k", 8192),
                                            ("q3_k", 8192), ("q4_k", 4096), ("q5_k", 4096), ("q6_k", 4096)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_resident_blocks_loop_over_row_blocks_on_gpu(name: str, cols: int, m: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """16-warp kernels on a grid of resident blocks (cuda_gemv.RESIDENT_GRID), made as small as two blocks so that
    each loops over many row blocks, ragged ones included: plain, with norm and residual, and gated, against the
    float64 reference. 4128 columns: K not a whole number of steps."""
    from lowbit.kernels.reference import dequant_matmul_reference, rms_norm_reference

    _blocks_loop(monkeypatch, sms=1)  # 2 resident blocks of 16 warps
    fmt, qt = _packed(name, (2 * 104, cols), seed=cols + m)  # 13 row blocks; gated: 104 = 13 x 8 rows
    p = cuda_gemv.plan(fmt, qt.shape)
    assert cuda_gemv.warps_for(p, cols) == cuda_gemv.WARPS_MANY
    gen = torch.Generator("cuda").manual_seed(m)
    x = torch.randn(m, cols, device="cuda", dtype=torch.float16, generator=gen)
    w = (1 + 0.3 * torch.randn(cols, device="cuda", generator=gen)).half()
    res = torch.randn(m, 2 * 104, device="cuda", dtype=torch.float16, generator=gen)
    plain = dequant_matmul_reference(x.double(), fmt, qt)
    normed = dequant_matmul_reference(rms_norm_reference(x, w, 1e-5).double(), fmt, qt)
    gate, up = normed.chunk(2, dim=-1)
    for got, want in ((cuda_gemv.gemv(x, fmt, qt, p).double(), plain),
                      (cuda_gemv.gemv(x, fmt, qt, p, norm=(w, 1e-5), residual=res).double() - res.double(), normed),
                      (cuda_gemv.gemv(x, fmt, qt, p, gated=True, norm=(w, 1e-5)).double(),
                       torch.nn.functional.silu(gate) * up)):
        assert float((got - want).norm() / want.norm()) < 3e-3
