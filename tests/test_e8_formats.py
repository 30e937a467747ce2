"""E8-lattice 2-bit vector codebooks: llama.cpp IQ2_XXS (bit-exact against gguf) and QuIP#'s E8P."""

import hashlib
import itertools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file, save_file

from lowbit.algorithms.gptq import gptq_quantize, proxy_loss
from lowbit.errors import LowbitError, UnknownFormatError
from lowbit.formats import E8PFormat, IQ2XXSFormat, e8p, get_format, iq2xxs
from lowbit.models.quant_linear import QuantLinear


def rand(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def rel_rmse(fmt, w, importance=None):
    return ((fmt.dequantize(fmt.quantize(w, importance)) - w).norm() / w.norm()).item()


def weighted_err(fmt, w, imp, fit_imp):
    return ((fmt.dequantize(fmt.quantize(w, fit_imp)) - w).square() * imp).sum().item()


# ----- IQ2_XXS --------------------------------------------------------------------------------------

def test_iq2xxs_registry_and_tables():
    fmt = get_format("iq2_xxs")
    assert isinstance(fmt, IQ2XXSFormat) and fmt.vector_dim == 8 and fmt.group_cols(1536) == 256
    grid, ksigns = iq2xxs.tables()
    assert grid.shape == (256, 8) and set(grid.unique().tolist()) == {8.0, 25.0, 43.0}
    assert len({tuple(r) for r in grid.tolist()}) == 256
    for i, s in enumerate(ksigns.tolist()):  # 7 stored sign bits + an implied 8th giving even parity
        assert s & 127 == i and bin(s).count("1") % 2 == 0


@pytest.mark.parametrize("cols", [256, 512])
def test_iq2xxs_bit_exact_against_gguf(cols):
    fmt = get_format("iq2_xxs")
    w = rand(12, cols, seed=cols)
    qt = fmt.quantize(w)
    ref = gguf_dequantize(qt.data["qs"].numpy().reshape(-1), GGMLQuantizationType.IQ2_XXS).reshape(12, cols)
    ours = fmt.dequantize(qt).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ref, ours)


def test_iq2xxs_short_last_superblock_is_a_truncated_ggml_block():
    """576 = 2 x 256 + 64: the tail is d + two sub-blocks; padded with zero sub-blocks it is a valid block."""
    fmt = get_format("iq2_xxs")
    w = rand(6, 576, seed=5)
    qt = fmt.quantize(w)
    qs = qt.data["qs"].numpy()
    assert qs.shape == (6, 2 * 66 + 2 + 2 * 8)
    ours = fmt.dequantize(qt).numpy()
    head = gguf_dequantize(qs[:, :132].reshape(-1), GGMLQuantizationType.IQ2_XXS).reshape(6, 512)
    tail = np.concatenate([qs[:, 132:], np.zeros((6, 66 - 18), np.uint8)], axis=1)
    tail = gguf_dequantize(tail.reshape(-1), GGMLQuantizationType.IQ2_XXS).reshape(6, 256)[:, :64]
    assert np.array_equal(ours, np.concatenate([head, tail], axis=1))


@pytest.mark.parametrize("cols", [256, 576, 1536])
def test_iq2xxs_round_trip_storage_and_bpw(cols):
    fmt = get_format("iq2_xxs")
    w = rand(8, cols, seed=1)
    qt = fmt.quantize(w)
    codes, params = fmt.unpack(qt)
    assert torch.equal(fmt.pack(codes, params, qt.shape).data["qs"], qt.data["qs"])
    assert {k: (tuple(v.shape), v.dtype) for k, v in qt.data.items()} == {
        k: (tuple(s), d) for k, (s, d) in fmt.storage_spec(qt.shape).items()}
    full, rest = divmod(cols, 256)
    expected = 8 * (66 * full + (2 + rest // 4 if rest else 0)) / cols  # 2.0625 for multiples of 256
    assert qt.bits_per_weight == pytest.approx(expected) == fmt.bits_per_weight(qt.shape)
    if not rest:
        assert qt.bits_per_weight == 2.0625


def test_iq2xxs_rejects_rows_not_multiple_of_32():
    fmt = get_format("iq2_xxs")
    with pytest.raises(LowbitError, match="multiple of 32"):
        fmt.storage_spec((4, 40))
    with pytest.raises(LowbitError, match="multiple of 32"):
        fmt.quantize(rand(4, 40, seed=0))


def test_iq2xxs_decoded_vectors_are_signed_grid_points_with_even_parity():
    fmt = get_format("iq2_xxs")
    w = rand(16, 576, seed=2)
    qt = fmt.quantize(w)
    codes, params = fmt.unpack(qt)
    scale = fmt.expand(params, 576)["scale"]
    deq = fmt.dequantize(qt)
    assert (scale > 0).all()
    ratio = (deq.abs() / scale).reshape(-1, 8)
    grid, _ = iq2xxs.tables()
    dist = (ratio[:, None, :] - grid[None]).abs().amax(-1).amin(1)
    assert dist.max() < 1e-4  # every |vector| / scale is one of the 256 grid rows
    assert ((deq.reshape(-1, 8) < 0).sum(1) % 2 == 0).all()


def brute_force_err(x, s, imp, cands):
    """Least weighted error sum imp (x - s c)^2 over all candidate vectors c, per row of x ([N, 8] each)."""
    return ((imp * x.square()).sum(1, keepdim=True) - 2 * (imp * x * s) @ cands.t()
            + (imp * s.square()) @ cands.square().t()).amin(1)


def iq2_signed_grid():
    grid, _ = iq2xxs.tables()
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=8)))
    signs = signs[(signs < 0).sum(1) % 2 == 0]
    return (grid[:, None, :] * signs[None]).reshape(-1, 8)  # all 256 x 128 codewords


def test_iq2xxs_encode_is_exact_nearest():
    fmt = get_format("iq2_xxs")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 256, generator=g)
    imp = torch.rand(4, 256, generator=g) ** 3
    params = fmt.fit(x, imp)
    scale = fmt.expand(params, 256)
    deq = fmt.decode(fmt.encode(x, scale, imp), scale)
    ours = ((deq - x).square() * imp).reshape(-1, 8).sum(1)
    ref = brute_force_err(x.reshape(-1, 8), scale["scale"].reshape(-1, 8), imp.reshape(-1, 8), iq2_signed_grid())
    torch.testing.assert_close(ours, ref.clamp_min(0), rtol=1e-4, atol=1e-5)


def test_iq2xxs_importance_lowers_weighted_error():
    fmt = get_format("iq2_xxs")
    w = rand(32, 512, seed=4)
    imp = torch.exp(3 * torch.randn(512, generator=torch.Generator().manual_seed(5)))  # ~e^+-6 spread
    plain, weighted = weighted_err(fmt, w, imp, None), weighted_err(fmt, w, imp, imp)
    assert weighted < 0.5 * plain  # measured 0.19


def test_iq2xxs_error_on_gaussian_weights():
    w = rand(64, 1024, seed=6)
    err = rel_rmse(get_format("iq2_xxs"), w)
    assert 0.30 < err < 0.345  # measured 0.325
    assert err < 0.9 * rel_rmse(get_format("int2_g64_sym"), w)  # measured 0.395 (at 2.25 bpw)


# ----- E8P ------------------------------------------------------------------------------------------

QUIP_GRID_SHA256 = "69038254fded6881558c6369a333e7e5a9160a1425321c215a1cef0278cbea7a"
"""sha256 of QuIP#'s ``_E8P_GRID`` as little-endian float32 [65536, 8], from running quip-sharp's
``get_full_grid(get_packed_abs_grid())`` (lib/codebook/latticee8_padded12.py, commit 79b752f) once."""


def test_e8p_codebook_is_quip_sharps():
    cb = e8p.codebook()
    assert cb.shape == (65536, 8) and cb.dtype == torch.float32
    assert hashlib.sha256(cb.numpy().astype("<f4").tobytes()).hexdigest() == QUIP_GRID_SHA256


def test_e8p_codebook_structure():
    cb = e8p.codebook()
    assert torch.unique(cb, dim=0).shape[0] == 65536
    y = cb - 0.25  # every codeword is in E8 + 1/4: y in Z^8 or (Z + 1/2)^8, with an even sum
    frac = y - y.floor()
    assert ((frac == 0).all(1) | (frac == 0.5).all(1)).all()
    assert (y.sum(1).remainder(2) == 0).all()
    pats = e8p.abs_patterns()
    norms = pats.square().sum(1)
    assert pats.shape == (256, 8) and (norms[:227] <= 10).all() and (norms[227:] == 12).all()
    # shift +1/4 for an even sign byte, -1/4 for odd (QuIP#'s parity rule)
    par = torch.tensor([bin(c & 255).count("1") % 2 for c in range(0, 65536, 97)])
    shifted = cb[::97] - torch.where(par.bool(), -0.25, 0.25)[:, None]
    assert torch.equal(shifted.abs(), pats[torch.arange(0, 65536, 97) >> 8])


def test_e8p_encode_is_exact_nearest():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(1000, 8, generator=g) * 1.3
    w = torch.rand(1000, 8, generator=g)
    codes, err = e8p.nearest(y, w)
    cb = e8p.codebook()
    ours = ((cb[codes] - y).square() * w).sum(1)
    torch.testing.assert_close(ours, err, rtol=1e-5, atol=1e-6)
    brute = brute_force_err(y, torch.ones_like(y), w, cb)
    torch.testing.assert_close(ours, brute.clamp_min(0), rtol=1e-4, atol=1e-5)


def test_e8p_format_encode_matches_brute_force_with_scales():
    fmt = get_format("e8p_ch")
    w = rand(6, 64, seed=8)
    imp = torch.rand(64, generator=torch.Generator().manual_seed(9))
    params = fmt.fit(w, imp)
    deq = fmt.decode(fmt.encode(w, params, imp), params)
    x, scale, wt = w.reshape(-1, 8), params["scale"].repeat_interleave(8, 0).expand(-1, 8), imp.repeat(6, 1)
    brute = brute_force_err(x, scale, wt.reshape(-1, 8), e8p.codebook())
    torch.testing.assert_close(((deq - w).square() * imp).reshape(-1, 8).sum(1), brute.clamp_min(0),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,cols,bpw", [("e8p_ch", 576, 2 + 16 / 576), ("e8p_ch", 1536, 2 + 16 / 1536),
                                           ("e8p_g64", 576, 2.25)])
def test_e8p_round_trip_storage_and_bpw(name, cols, bpw):
    fmt = get_format(name)
    assert isinstance(fmt, E8PFormat) and fmt.name == name
    qt = fmt.quantize(rand(8, cols, seed=10))
    assert qt.data["codes"].dtype == torch.int16 and qt.data["scale"].dtype == torch.float16
    codes, params = fmt.unpack(qt)
    assert codes.min() >= 0 and codes.max() < 65536 and (codes >= 32768).any()  # all 16 bits are used
    again = fmt.pack(codes, params, qt.shape)
    assert all(torch.equal(again.data[k], qt.data[k]) for k in qt.data)
    assert qt.bits_per_weight == pytest.approx(bpw) == fmt.bits_per_weight(qt.shape)


@pytest.mark.parametrize("n", [8, 72, 13, 3])  # whole chunks of 8 codes, and codes past the last one
def test_e8p_stored_order_round_trips(n):
    codes = torch.randint(0, 1 << 16, (5, n), generator=torch.Generator().manual_seed(n))
    stored = e8p.to_stored(codes)
    assert stored.dtype == torch.int16 and stored.shape == codes.shape
    assert torch.equal(e8p.from_stored(stored), codes)
    whole = n - n % 8
    assert torch.equal(stored[:, whole:].long() & 0xFFFF, codes[:, whole:])  # the tail as it is


def test_e8p_stored_order_fields():
    """A chunk's words: pattern bytes of codes 0-3 and 4-7, then sign words with code r's prefix XORs of its
    negation flags at bits 4 j + r and its shift bit at 28 + r; every code's slot indexes codes_of_slots."""
    codes = torch.arange(1 << 16).reshape(-1, 8)[torch.randperm(8192, generator=torch.Generator().manual_seed(0))]
    words = e8p.to_stored(codes).view(torch.int32).long() & 0xFFFFFFFF  # [chunks, 4]
    r = torch.arange(4)
    patterns = (words[:, :2, None] >> (8 * r)) & 255
    assert torch.equal(patterns.reshape(-1, 8), codes >> 8)
    slots = sum((((words[:, 2:, None] >> (4 * j + r)) & 1) << j) for j in range(8))
    assert torch.equal(e8p.codes_of_slots((patterns << 8) | slots).reshape(-1, 8), codes)
    assert torch.equal(e8p.codes_of_slots(torch.arange(1 << 16)).sort().values, torch.arange(1 << 16))
    sb = codes & 255
    parity = sum((sb >> i) & 1 for i in range(8)) & 1
    assert torch.equal(slots.reshape(-1, 8) >> 7, parity)  # the shift bit: 1 where the shift is -1/4


def test_e8p_error_on_gaussian_weights():
    w = rand(64, 1024, seed=11)
    err = rel_rmse(get_format("e8p_ch"), w)
    # measured 0.302 (MSE / variance 0.091; QuIP# reports 0.0927 for E8P on unit Gaussians)
    assert 0.29 < err < 0.315
    assert err < 0.95 * rel_rmse(get_format("iq2_xxs"), w)  # measured 0.302 vs 0.327


def test_e8p_importance_lowers_weighted_error():
    fmt = get_format("e8p_ch")
    w = rand(32, 512, seed=12)
    imp = torch.exp(3 * torch.randn(512, generator=torch.Generator().manual_seed(13)))
    assert weighted_err(fmt, w, imp, imp) < 0.6 * weighted_err(fmt, w, imp, None)  # measured 0.27


def test_registry_names():
    assert get_format("E8P_CH").name == "e8p_ch" and get_format("e8p_g128").group_size == 128
    with pytest.raises(UnknownFormatError, match="multiple of 8"):
        get_format("e8p_g12")
    with pytest.raises(UnknownFormatError, match=r"iq2_xxs.*e8p_ch"):
        get_format("iq2_xs")


# ----- both: modules, checkpoints, GPTQ ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["iq2_xxs", "e8p_ch"])
def test_quant_linear_and_safetensors_round_trip(name, tmp_path):
    fmt = get_format(name)
    w = rand(16, 576, seed=14)
    qt = fmt.quantize(w)
    lin = QuantLinear.from_quantized(qt)
    x = rand(3, 576, seed=15)
    torch.testing.assert_close(lin(x), x @ fmt.dequantize(qt).t())
    save_file(lin.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = QuantLinear(576, 16, name).to(torch.float16)  # packed buffers keep their dtypes
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.equal(fresh.dequantize(), fmt.dequantize(qt))


@pytest.mark.parametrize("name", ["iq2_xxs", "e8p_ch"])
def test_gptq_block_ldlq_beats_rtn(name):
    g = torch.Generator().manual_seed(16)
    cols = 256
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(1024, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    H = 2.0 / 1024 * X.t() @ X
    W = torch.randn(16, cols, generator=g)
    fmt = get_format(name)
    rtn = proxy_loss(W, fmt.dequantize(fmt.quantize(W)), H)
    res = gptq_quantize(W, H, fmt)
    assert res.proxy_loss < 0.92 * rtn  # measured 0.83 (iq2_xxs), 0.75 (e8p_ch)
    assert res.proxy_loss == pytest.approx(proxy_loss(W, fmt.dequantize(res.qt), H), rel=1e-6)
