import math

import pytest
import torch

from lowbit.errors import UnknownFormatError
from lowbit.formats import get_format
from lowbit.formats.base import cat_params

FORMATS = [f"int{b}_{g}_{k}" for b in (2, 3, 4, 8) for g in ("g32", "g64", "g128", "ch") for k in ("sym", "asym")]


def rand(rows=16, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FORMATS)
def test_pack_unpack_round_trip_and_bpw(name):
    fmt = get_format(name)
    w = rand()
    qt = fmt.quantize(w)
    codes, params = fmt.unpack(qt)
    again = fmt.pack(codes, params, qt.shape)
    assert all(torch.equal(again.data[k], qt.data[k]) for k in qt.data)
    # bits per weight measured from stored bytes == the format's formula == the textbook count
    g = 256 if "_ch_" in name else int(name.split("_g")[1].split("_")[0])
    expected = fmt.bits + (16 if "_sym" in name else 32) / g
    assert qt.bits_per_weight == pytest.approx(expected)
    assert fmt.bits_per_weight(qt.shape) == pytest.approx(expected)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qt.data.items()} == {
        k: (tuple(s), d) for k, (s, d) in fmt.storage_spec(qt.shape).items()}


@pytest.mark.parametrize("name", FORMATS)
def test_error_bound(name):
    """Every weight lies within half a step of its level, except where a range was clipped (sym's top level)."""
    fmt = get_format(name)
    w = rand(seed=1)
    deq = fmt.dequantize(fmt.quantize(w))
    g = fmt.group_cols(w.shape[1])
    wg = w.view(w.shape[0], -1, g)
    step = (wg.amax(-1) - wg.amin(-1)) / ((1 << fmt.bits) - 1) if not fmt.symmetric else \
        wg.abs().amax(-1) / (1 << (fmt.bits - 1))
    err = (deq - w).abs().view_as(wg)
    # sym: the positive side lacks one level, so weights near +amax may be one full step away
    bound = step * (1.0 if fmt.symmetric else 0.5) * 1.002 + 1e-3 * step  # fp16 scale rounding slack
    assert (err <= bound.unsqueeze(-1)).all()


def test_more_bits_less_error():
    w = rand(64, 512, seed=2)
    errs = [(get_format(f"int{b}_g64_asym").dequantize(get_format(f"int{b}_g64_asym").quantize(w)) - w).norm()
            for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] / w.norm() < 0.01


def test_mse_fit_not_worse_than_minmax():
    w = rand(64, 512, seed=3)
    for base in ("int2_g64_asym", "int3_g128_sym", "int2_ch_sym"):
        e0 = (get_format(base).dequantize(get_format(base).quantize(w)) - w).norm()
        e1 = (get_format(base + "_mse").dequantize(get_format(base + "_mse").quantize(w)) - w).norm()
        assert e1 <= e0 + 1e-6
    # at 2 bits clipping helps a lot on Gaussian weights
    assert e1 < 0.9 * e0


@pytest.mark.parametrize("name,coarse_bits", [("int5_g32_asym_mse", 4), ("int4_g32_asym_mse", 3)])
def test_mse_fit_stores_a_coarser_grid_exactly(name, coarse_bits):
    """Weights on a Q4_1-style grid (each group: fp16 min + codes x fp16 step, codes spanning 0..2^b - 1) stored at
    one bit more: the searched fit finds half the step and reproduces them exactly; the min/max rule does not."""
    torch.manual_seed(5)
    rows, groups, top = 64, 8, (1 << coarse_bits) - 1
    codes = torch.randint(0, top + 1, (rows, groups, 32))
    codes[:, :, 0], codes[:, :, 1] = 0, top
    step = (torch.rand(rows, groups, 1) * 0.01 + 1e-3).half().float()
    low = (torch.randn(rows, groups, 1) * 0.02).half().float()
    w = (low + codes * step).reshape(rows, groups * 32)
    fmt = get_format(name)
    assert torch.equal(fmt.dequantize(fmt.quantize(w)), w)
    minmax = get_format(name.removesuffix("_mse"))
    assert not torch.equal(minmax.dequantize(minmax.quantize(w)), w)


def test_ggml_q4_0_semantics():
    """Q4_0: d = max/-8 where max is the signed value of largest magnitude; q = round(x/d) + 8 in 0..15."""
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 8])
    fmt = get_format("q4_0")
    qt = fmt.quantize(w)
    assert qt.bits_per_weight == pytest.approx(4.5)  # 18 bytes per 32 weights, as ggml's block_q4_0
    d = qt.data["scale"].float().item()
    assert d == pytest.approx(1.0 / 8)
    deq = fmt.dequantize(qt)
    assert torch.allclose(deq, w)  # all values lie on the grid (-1 -> code 0)
    codes, _ = fmt.unpack(qt)
    assert codes[0, 1].item() == 0


def test_ggml_q4_1_semantics():
    w = torch.linspace(-0.3, 1.2, 32).view(1, 32)
    fmt = get_format("q4_1")
    qt = fmt.quantize(w)
    assert qt.bits_per_weight == pytest.approx(5.0)
    assert qt.data["min"].float().item() == pytest.approx(-0.3, abs=1e-3)
    assert qt.data["scale"].float().item() == pytest.approx(1.5 / 15, rel=1e-3)


@pytest.mark.parametrize("alias,grid", [("q5_0", "int5_g32_sym"), ("q5_1", "int5_g32_asym")])
def test_ggml_q5_names_are_the_5_bit_grids(alias, grid):
    """q5_0 / q5_1 (the names llama.cpp users type) store exactly what the 5-bit g32 grids store, at 5.5 / 6.0 bpw."""
    w = rand(4, 96, seed=11)
    a, g = get_format(alias).quantize(w), get_format(grid).quantize(w)
    bpw = {"q5_0": 5.5, "q5_1": 6.0}[alias]
    assert get_format(alias).name == alias and a.bits_per_weight == g.bits_per_weight == bpw
    assert all(torch.equal(a.data[k], g.data[k]) for k in g.data)


def test_constant_and_zero_groups_are_exact():
    for name in ("int4_g32_sym", "int4_g32_asym", "int2_g32_asym_mse"):
        fmt = get_format(name)
        z = torch.zeros(3, 64)
        assert torch.equal(fmt.dequantize(fmt.quantize(z)), z)
    c = torch.full((2, 32), 0.75)
    fmt = get_format("int3_g32_asym")
    assert torch.allclose(fmt.dequantize(fmt.quantize(c)), c)


def test_scales_are_fp16_and_decode_matches_storage():
    fmt = get_format("int3_g64_asym")
    w = rand(8, 128, seed=5) * 1e-3
    qt = fmt.quantize(w)
    assert qt.data["scale"].dtype == torch.float16
    codes, params = fmt.unpack(qt)
    ref = codes.float() * params["scale"].float().repeat_interleave(64, 1) + \
        params["min"].float().repeat_interleave(64, 1)
    assert torch.equal(fmt.dequantize(qt), ref)


def test_unknown_and_bad_names():
    for bad in ("int9_g128_sym", "int4_g12_sym", "int4_g128", "foo", "nf4"):
        with pytest.raises(UnknownFormatError) as e:
            get_format(bad)
        assert "int4_g128_sym" in str(e.value) or "multiple of 8" in str(e.value)


def test_ragged_last_group():
    """576 columns in groups of 128: four full groups and one of 64, each fitted on its own columns."""
    fmt = get_format("int4_g128_asym")
    w = rand(4, 576, seed=4)
    w[:, 512:] *= 10  # the short tail group has its own, larger range
    qt = fmt.quantize(w)
    assert qt.data["scale"].shape == (4, 5)
    assert qt.bits_per_weight == pytest.approx(4 + 32 * 5 / 576)
    assert fmt.bits_per_weight((4, 576)) == pytest.approx(qt.bits_per_weight)
    tail = get_format("int4_g64_asym").quantize(w[:, 512:])
    assert torch.equal(fmt.dequantize(qt)[:, 512:], get_format("int4_g64_asym").dequantize(tail))
    small = get_format("int4_g128_sym").quantize(rand(4, 96))  # fewer columns than one group
    assert small.data["scale"].shape == (4, 1)


def test_quantize_is_deterministic():
    w = rand(seed=9)
    a = get_format("int2_g64_asym_mse").quantize(w)
    b = get_format("int2_g64_asym_mse").quantize(w.clone())
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    assert math.isfinite(a.bits_per_weight)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "int3_g64_asym", "int2_g64_sym", "q8_0", "nz2_ch", "iq4_nl", "q4_k",
                                  "e8p_ch"])
def test_column_rounding_is_encode_and_decode(name: str) -> None:
    """GPTQ's per-column rounding (a format's own fast path or the generic one) gives encode's codes and decode's
    values exactly, zero scales included."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 256, generator=g) * 0.05
    gs = fmt.group_cols(256)
    params = fmt.expand(cat_params([fmt.fit(w[:, j : j + gs]) for j in range(0, 256, gs)]), 256)
    params["scale"][:3] = 0.0  # rows with a zero scale
    round_at = fmt.column_rounding(params)
    vd = fmt.vector_dim
    for j in range(0, 256, 37 * vd):
        p = {k: v[:, j : j + vd] for k, v in params.items()}
        codes, values = round_at(w[:, j : j + vd], j)
        want = fmt.encode(w[:, j : j + vd], p)
        assert torch.equal(codes.to(torch.int64), want)
        assert torch.equal(values, fmt.decode(want, p))


def _make_qx_quants(x: list[float], nmax: int, qw: list[float] | None) -> float:
    """ggml-quants.c make_qx_quants(n, nmax, x, L, rmse_type=1, qw), transcribed line by line (its scale)."""
    amax = mx = 0.0
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < 1e-15:
        return 0.0

    def sums(iscale: float) -> tuple[float, float]:
        sumlx = suml2 = 0.0
        for i, v in enumerate(x):
            lv = max(-nmax, min(nmax - 1, round(iscale * v)))  # nearest_int: round half to even, as round()
            w = qw[i] if qw is not None else v * v
            sumlx, suml2 = sumlx + w * v * lv, suml2 + w * lv * lv
        return sumlx, suml2

    sumlx, suml2 = sums(-nmax / mx)
    scale = sumlx / suml2 if suml2 else 0.0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = sums(-(nmax + 0.1 * step) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bits", [4, 5])
def test_ls_fit_is_ggmls_make_qx_quants(bits: int, weighted: bool) -> None:
    """fit="ls" (Q4_0 / Q5_0 as llama.cpp quantizes them with an importance matrix) picks the scale that ggml's
    make_qx_quants returns, on fresh heavy-tailed groups (float64, so both sum in the same precision)."""
    from lowbit.formats.uniform import least_squares_search

    g = torch.Generator().manual_seed(bits + 2 * weighted)
    w = (torch.randn(40, 32, generator=g, dtype=torch.float64) ** 3) * 0.05
    w[3] = 0.0  # a group of zeros gets 0
    imp = torch.rand(40, 32, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    got = least_squares_search(w, imp, 1 << (bits - 1))
    want = [_make_qx_quants(w[r].tolist(), 1 << (bits - 1), None if imp is None else imp[r].tolist())
            for r in range(w.shape[0])]
    assert torch.allclose(got[:, 0], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_ls_fit_stores_its_scale_and_nearest_codes() -> None:
    """An _ls format stores the searched scale in fp16 and the nearest codes at it; only symmetric grids have it."""
    from lowbit.formats.uniform import least_squares_search

    fmt = get_format("int4_g32_sym_ls")
    w, imp = rand(8, 64, seed=2), torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5
    qt = fmt.quantize(w, importance=imp)
    want = torch.cat([least_squares_search(w[:, j : j + 32], imp[j : j + 32], 8) for j in (0, 32)], dim=1)
    assert torch.equal(qt.data["scale"], want.half())
    codes, params = fmt.unpack(qt)
    d = params["scale"].float().repeat_interleave(32, 1)
    assert torch.equal(codes, (torch.round(w / d) + 8).clamp(0, 15).to(torch.int64))
    with pytest.raises(UnknownFormatError, match="symmetric"):
        get_format("int4_g32_asym_ls")
