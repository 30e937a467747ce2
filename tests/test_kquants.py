"""llama.cpp's k-quants Q3_K, Q4_K, Q5_K, Q6_K (``formats/kquants.py``): stored bytes are ggml's block_q*_K,
decoding matches gguf's dequantizer bit for bit, the fit is no worse than llama.cpp's reference quantizer, and GPTQ,
``+ft`` and GGUF export work on them. (Q2_K, the same family, has tests/test_q2k.py.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from conftest import exported_logits, make_model, sharpen_llama
from llama_cpp_runner import require_llama_cpp
from lowbit.algorithms.gptq import gptq_quantize, proxy_loss
from lowbit.errors import LowbitError
from lowbit.formats import KQuantFormat, QuantizedTensor, get_format, row_format
from lowbit.io.gguf_blocks import gguf_type, to_ggml_blocks, unsupported_reason
from lowbit.io.gguf_types import LOWBIT_FORMAT

QT = gguf.GGMLQuantizationType
TYPES = ["q3_k", "q4_k", "q5_k", "q6_k"]
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
BLOCK_BYTES = {"q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def _w(rows: int, cols: int, seed: int = 0, kind: str = "outliers") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if kind == "outliers":  # a few large weights, so sub-blocks differ in scale
        idx = torch.randint(0, w.numel(), (w.numel() // 100,), generator=g)
        w.view(-1)[idx] *= 8
    return w


def _ggml(qt: QuantizedTensor) -> np.ndarray:
    return dequantize(qt.data["qs"].numpy(), QT[qt.format.upper()])


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) * (torch.rand(n, generator=g) * 2 + 0.1)
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("name", TYPES)
def test_registry_and_bits(name):
    fmt = get_format(name)
    assert isinstance(fmt, KQuantFormat) and get_format(name.upper()).name == name
    assert BLOCK_BYTES[name] == gguf.GGML_QUANT_SIZES[QT[name.upper()]][1]  # ggml's sizeof(block_q*_K)
    for shape in ((1, 256), (8, 512), (3, 1536)):
        assert fmt.bits_per_weight(shape) == BPW[name]
        assert fmt.storage_spec(shape) == {"qs": ((shape[0], BLOCK_BYTES[name] * shape[1] // 256), torch.uint8)}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("cols", [256, 768])
@pytest.mark.parametrize("with_importance", [False, True])
def test_decode_matches_gguf_bit_for_bit(name, cols, with_importance):
    fmt = get_format(name)
    w = _w(6, cols, seed=cols)
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.01 if with_importance else None
    qt = fmt.quantize(w, imp)
    assert qt.data["qs"].dtype == torch.uint8 and qt.bits_per_weight == BPW[name]
    ours = fmt.dequantize(qt).numpy()
    assert np.array_equal(ours, _ggml(qt))
    codes, params = fmt.unpack(qt)
    assert codes.min() >= 0 and codes.max() < 1 << fmt.bits
    for k, (lo, hi) in fmt.ints.items():
        assert params[k].min() >= lo and params[k].max() <= hi
    # the round trip fit -> pack -> unpack -> decode is what the algorithms computed
    again = fmt.pack(codes, params, qt.shape)
    assert torch.equal(again.data["qs"], qt.data["qs"])
    assert np.array_equal(fmt.decode(codes, fmt.expand(params, cols)).numpy(), ours)


@pytest.mark.parametrize("name", TYPES)
def test_every_byte_pattern_round_trips_and_decodes_as_ggml(name):
    """Random block bytes (finite fp16 super-scales): unpack -> pack gives the same bytes, and lowbit's decode of
    them is ggml's: every bit of the layout is checked, not only the patterns the fit produces."""
    fmt = get_format(name)
    rows, cols = 5, 768
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (rows, cols // 256 * fmt.block_bytes), generator=g).to(torch.uint8)
    codes, params = fmt.unpack(QuantizedTensor(name, (rows, cols), {"qs": raw}))
    for k in fmt.halves:
        params[k] = (torch.randn(params[k].shape, generator=g) * 0.01).half().float()
    qt = fmt.pack(codes, params, (rows, cols))
    got_codes, got = fmt.unpack(qt)
    assert torch.equal(got_codes, codes) and all(torch.equal(got[k], v) for k, v in params.items())
    assert torch.equal(fmt.pack(got_codes, got, (rows, cols)).data["qs"], qt.data["qs"])
    assert np.array_equal(fmt.dequantize(qt).numpy(), _ggml(qt))
    with pytest.raises(LowbitError, match="out of range"):
        fmt.pack(codes + (1 << fmt.bits), params, (rows, cols))


@pytest.mark.parametrize("name", ["q2_k", *TYPES])
def test_edge_values_decode_exactly(name):
    """Zero rows, constant rows, all-positive and all-negative rows, huge and tiny magnitudes (every k-quant)."""
    fmt = get_format(name)
    w = _w(6, 512, seed=3)
    w[0] = 0
    w[1] = 0.5
    w[2] = w[2].abs()
    w[3] = -w[3].abs()
    w[4] *= 1e4
    w[5] *= 1e-6
    qt = fmt.quantize(w)
    deq = fmt.dequantize(qt)
    assert np.array_equal(deq.numpy(), _ggml(qt))
    assert torch.isfinite(deq).all() and (deq[0] == 0).all()
    assert torch.allclose(deq[1], w[1], rtol=0.02)  # a constant row is (nearly) exact


@pytest.mark.parametrize("name", ["q2_k", *TYPES])
def test_rows_must_be_multiples_of_256_and_fall_back_like_llama_cpp(name):
    fmt = get_format(name)
    with pytest.raises(LowbitError, match="multiple of 256"):
        fmt.quantize(torch.randn(4, 320))
    with pytest.raises(LowbitError, match="multiple of 256"):
        fmt.bits_per_weight((4, 64))
    assert "multiples of 256" in unsupported_reason(fmt, (4, 576))
    assert unsupported_reason(fmt, (4, 512)) is None
    # llama-quant.cpp tensor_type_fallback: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when the
    # fallback's 32-weight blocks do not fit either
    want = {"q2_k": QT.Q4_0, "q3_k": QT.Q4_0, "q4_k": QT.Q5_0, "q5_k": QT.Q5_1, "q6_k": QT.Q8_0}[name]
    assert gguf_type(get_format(row_format(name, 576))) == want
    assert row_format(name, 512) == name and row_format(name, 100) is None
    assert row_format("q2_k", 576) == "q4_0" and row_format("q4_0", 100) == "q4_0"


# ----- llama.cpp's reference quantizer (ggml-quants.c quantize_row_q*_K_ref), ported to numpy ----------------------
F32 = np.float32


def _rint(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int64)  # nearest_int: round half to even


def _signed_max(x: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]


def _safe(v: np.ndarray) -> np.ndarray:
    return np.where(v != 0, v, F32(1))


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for a batch of sub-blocks x, w [B, n] -> (scale, the_min >= 0); the running min moves."""
    mn, mx = np.minimum(x.min(-1), F32(0)), x.max(-1)
    flat = mx == mn
    sum_w, sum_x = w.sum(-1, dtype=F32), (w * x).sum(-1, dtype=F32)
    iscale = F32(nmax) / _safe(mx - mn)
    scale = F32(1) / iscale
    q = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(-1, dtype=F32)
    for i in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(i) + F32(nmax)) / _safe(mx - mn)
        la = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        sl, sl2, sxl = (w * la).sum(-1, dtype=F32), (w * la * la).sum(-1, dtype=F32), (w * la * x).sum(-1, dtype=F32)
        det = sum_w * sl2 - sl * sl
        ts, tm = (sum_w * sxl - sum_x * sl) / _safe(det), (sl2 * sum_x - sl * sxl) / _safe(det)
        ts, tm = np.where(tm > 0, sxl / _safe(sl2), ts), np.minimum(tm, F32(0))
        cur = (w * (ts[:, None] * la + tm[:, None] - x) ** 2).sum(-1, dtype=F32)
        better = (det > 0) & (cur < best) & ~flat
        best, scale, mn = np.where(better, cur, best), np.where(better, ts, scale), np.where(better, tm, mn)
    return np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32)


def _make_qx(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) -> (the sub-blocks' scales, their levels in -nmax..nmax-1);
    ``w`` is qw (x^2 when None)."""
    mx, w = _signed_max(x), x * x if w is None else w

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)

    def moments(lv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lv = lv.astype(F32)
        return (w * x * lv).sum(-1, dtype=F32), (w * lv * lv).sum(-1, dtype=F32)

    lv = levels(F32(-nmax) / _safe(mx))
    sumlx, suml2 = moments(lv)
    scale = np.where(suml2 != 0, sumlx / _safe(suml2), F32(0)).astype(F32)
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        cand = levels(-(F32(nmax) + F32(0.1) * F32(i)) / _safe(mx))
        slx, sl2 = moments(cand)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = np.where(better, slx / _safe(sl2), scale).astype(F32)
        best = np.where(better, scale * slx, best)
        lv = np.where(better[:, None], cand, lv)
    zero = np.abs(mx) < 1e-15
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, lv)


def _make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights) for x >= 0 -> (scale, integers 0..nmax)."""
    mx = x.max(-1)

    def mse(isc: np.ndarray) -> np.ndarray:
        q = np.minimum(nmax, _rint(isc[:, None] * x))  # (unclamped for the first candidate: it never exceeds nmax)
        return (w * (x - (F32(1) / isc)[:, None] * q) ** 2).sum(-1, dtype=F32)

    iscale = F32(nmax) / _safe(mx)
    best = mse(iscale)
    for i in (*range(-4, 0), *range(1, 5)):
        isc = (F32(0.1) * F32(i) + F32(nmax)) / _safe(mx)
        err = mse(isc)
        iscale, best = np.where(err < best, isc, iscale), np.minimum(err, best)
    lv = np.minimum(nmax, _rint(iscale[:, None] * x))
    sumlx, suml2 = (w * x * lv).sum(-1, dtype=F32), (w * lv * lv).sum(-1, dtype=F32)
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], lv[:, i].astype(F32)
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, _rint(xi * sl2 / np.where(ok, slx, F32(1))))
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != lv[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[:, i] = np.where(take, new, lv[:, i])
            sumlx, suml2 = np.where(take, slx2, sumlx).astype(F32), np.where(take, sl22, suml2).astype(F32)
    return np.where((mx < 1e-15) | (suml2 <= 0), F32(0), sumlx / _safe(suml2)).astype(F32), lv


def _make_q3(x: np.ndarray, nmax: int = 4) -> np.ndarray:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) -> the sub-blocks' scales (coordinate descent on the levels)."""
    mx, w = _signed_max(x), x * x
    lv = np.clip(_rint((F32(-nmax) / _safe(mx))[:, None] * x), -nmax, nmax - 1)
    sumlx, suml2 = (w * x * lv).sum(-1, dtype=F32), (w * lv * lv).sum(-1, dtype=F32)
    for _ in range(5):  # an iteration that changes nothing leaves the next one nothing to change: no early exit
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], lv[:, i].astype(F32)
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            new = np.clip(_rint(xi * sl2 / np.where(slx > 0, slx, F32(1))), -nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != lv[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[:, i] = np.where(take, new, lv[:, i])
            sumlx, suml2 = np.where(take, slx2, sumlx).astype(F32), np.where(take, sl22, suml2).astype(F32)
    return np.where((np.abs(mx) < 1e-15) | (suml2 <= 0), F32(0), sumlx / _safe(suml2)).astype(F32)


def _fp16(v: np.ndarray) -> np.ndarray:
    return v.astype(F32).astype(np.float16).astype(F32)


def _ref_scale_min(x: np.ndarray, bits: int) -> np.ndarray:
    """quantize_row_q4_K_ref / q5_K_ref, dequantized: superblocks x [N, 256] -> [N, 256]."""
    nmax = (1 << bits) - 1
    xs = x.reshape(-1, 32)
    av = np.sqrt((xs * xs).sum(-1, dtype=F32) / F32(32))
    args = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
    scales, mins = (v.reshape(-1, 8) for v in _make_qkx2(xs, av[:, None] + np.abs(xs), nmax, *args))
    ms, mm = scales.max(-1), mins.max(-1)
    ls = np.minimum(63, _rint(np.where(ms > 0, F32(63) / _safe(ms), F32(0))[:, None] * scales))
    lm = np.minimum(63, _rint(np.where(mm > 0, F32(63) / _safe(mm), F32(0))[:, None] * mins))
    dl = (_fp16(ms / F32(63))[:, None] * ls.astype(F32))[..., None]
    ml = (_fp16(mm / F32(63))[:, None] * lm.astype(F32))[..., None]
    q = np.clip(_rint((x.reshape(-1, 8, 32) + ml) / _safe(dl)), 0, nmax).astype(F32)
    return (dl * q - ml).reshape(x.shape)  # (where d * sc is 0, ggml keeps other codes: the value is -ml all the same)


def _ref_scale_only(x: np.ndarray, scales: np.ndarray, top: int, levels: int) -> np.ndarray:
    """Q3_K / Q6_K ref after the sub-block scales: the largest |scale| onto -top, integers and codes rounded."""
    ms = _signed_max(scales)
    iscale = np.where(np.abs(ms) < 1e-15, F32(0), F32(-top) / _safe(ms))
    sc = np.clip(_rint(iscale[:, None] * scales), -top, top - 1).astype(F32)
    dl = (np.where(iscale != 0, _fp16(F32(1) / _safe(iscale)), F32(0))[:, None] * sc)[..., None]
    q = np.clip(_rint(x.reshape(*scales.shape, -1) / _safe(dl)), -levels, levels - 1).astype(F32)
    return (dl * q).reshape(x.shape)


def _llama_cpp_ref(name: str, x: np.ndarray) -> np.ndarray:
    if name == "q3_k":
        return _ref_scale_only(x, _make_q3(x.reshape(-1, 16)).reshape(-1, 16), 32, 4)
    if name == "q6_k":
        return _ref_scale_only(x, _make_qx(x.reshape(-1, 16), 32)[0].reshape(-1, 16), 128, 32)
    return _ref_scale_min(x, {"q4_k": 4, "q5_k": 5}[name])


def _llama_cpp_imatrix(name: str, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_q*_K_impl with an importance matrix ``qw`` (per weight, like x [N, 256]), dequantized."""
    sigma2 = F32(2) * (x * x).sum(-1, dtype=F32, keepdims=True) / F32(256)
    if name == "q6_k":  # the importance itself weights make_qx_quants
        return _ref_scale_only(x, _make_qx(x.reshape(-1, 16), 32, qw.reshape(-1, 16))[0].reshape(-1, 16), 128, 32)
    wts = qw * np.sqrt(sigma2 + x * x)
    if name == "q3_k":
        scales = _make_qx(x.reshape(-1, 16), 4, wts.reshape(-1, 16))[0].reshape(-1, 16)
        d, ls = _make_qx(scales, 32, wts.reshape(-1, 16, 16).sum(-1, dtype=F32))
        dl = (_fp16(d)[:, None] * ls.astype(F32))[..., None]
        q = np.clip(_rint(x.reshape(-1, 16, 16) / _safe(dl)), -4, 3).astype(F32)
        return (dl * q).reshape(x.shape)
    nmax = {"q4_k": 15, "q5_k": 31}[name]
    scales, mins = (v.reshape(-1, 8) for v in _make_qkx2(x.reshape(-1, 32), wts.reshape(-1, 32), nmax, -0.9, 0.05,
                                                          36))  # make_qkx3_quants: the same search, these weights
    sw = wts.reshape(-1, 8, 32).sum(-1, dtype=F32)
    (d, ls), (dmin, lm) = _make_qp(scales, 63, sw), _make_qp(mins, 63, sw)
    dl, ml = ((_fp16(v)[:, None] * lv.astype(F32))[..., None] for v, lv in ((d, ls), (dmin, lm)))
    q = np.clip(_rint((x.reshape(-1, 8, 32) + ml) / _safe(dl)), 0, nmax).astype(F32)
    return (dl * q - ml).reshape(x.shape)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_fit_is_no_worse_than_llama_cpp(name, kind):
    """Weight MSE of lowbit's fit vs llama.cpp's reference quantizer (no imatrix) on the same rows. Measured here
    (lowbit / llama.cpp): gaussian 0.90 q3_k, 0.96 q4_k, 0.91 q5_k, 0.90 q6_k; outliers 0.94, 0.95, 0.92, 0.93."""
    w = _w(64, 1024, seed=11, kind=kind)
    fmt = get_format(name)
    ours = float((w - fmt.dequantize(fmt.quantize(w))).pow(2).mean())
    ref = float(((w.numpy() - _llama_cpp_ref(name, w.numpy().reshape(-1, 256)).reshape(w.shape)) ** 2).mean())
    assert ours <= 0.99 * ref, (ours, ref)
    assert ref < 1.25 * ours  # the port is llama.cpp's quantizer, not a strawman: within a few % of lowbit


@pytest.mark.parametrize("name", TYPES)
def test_importance_weighted_fit_is_no_worse_than_llama_cpp_imatrix(name):
    """Importance-weighted error sum imp (w - w')^2 of lowbit's fit given the importance vs llama.cpp's imatrix
    quantizer given the same importance. Measured here (lowbit / llama.cpp): q3_k 0.92, q4_k 0.89, q5_k 0.81,
    q6_k 0.91; lowbit's fit without the importance: 1.22, 1.30, 1.16, 1.12 (so the port does use it)."""
    w = _w(64, 1024, seed=12)
    imp = torch.exp(1.5 * torch.randn(1024, generator=torch.Generator().manual_seed(5)))  # imatrix-like spread
    fmt = get_format(name)

    def weighted(deq: np.ndarray) -> float:
        return float(((w.numpy() - deq.reshape(w.shape)) ** 2 * imp.numpy()).sum())

    ours = weighted(fmt.dequantize(fmt.quantize(w, imp)).numpy())
    blind = weighted(fmt.dequantize(fmt.quantize(w)).numpy())
    x = w.numpy().reshape(-1, 256)
    ref = weighted(_llama_cpp_imatrix(name, x, np.broadcast_to(imp.numpy(), w.shape).reshape(-1, 256)))
    assert ours <= 0.99 * ref < 0.99 * blind, (ours / ref, blind / ref)


@pytest.mark.parametrize("name", ["q2_k", *TYPES])
def test_importance_steers_the_fit(name):
    fmt = get_format(name)
    w = _w(16, 512, seed=2)
    imp = torch.ones(512)
    imp[::4] = 100.0
    err_plain = ((w - fmt.dequantize(fmt.quantize(w))).pow(2) * imp).sum()
    err_imp = ((w - fmt.dequantize(fmt.quantize(w, imp))).pow(2) * imp).sum()
    assert err_imp < err_plain


@pytest.mark.parametrize("name", ["q2_k", *TYPES])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_not_worse_than_rtn(name, act_order):
    fmt = get_format(name)
    w = _w(32, 512, seed=4)
    H = _spd(512)
    res = gptq_quantize(w, H, fmt, act_order=act_order)
    rtn = proxy_loss(w, fmt.dequantize(fmt.quantize(w)), H)
    assert np.isfinite(res.proxy_loss) and res.proxy_loss <= rtn
    assert res.qt.format == name and res.qt.bits_per_weight == BPW[name]
    assert np.array_equal(fmt.dequantize(res.qt).numpy(), _ggml(res.qt))


@pytest.mark.parametrize("name", ["q2_k", *TYPES])
def test_gguf_block_conversion_is_verbatim(name):
    fmt = get_format(name)
    qt = fmt.quantize(_w(4, 512))
    assert gguf_type(fmt) == QT[name.upper()]
    qtype, blocks = to_ggml_blocks(qt)
    assert qtype == QT[name.upper()] and np.array_equal(blocks, qt.data["qs"].numpy())
    assert LOWBIT_FORMAT[name.upper()] == name


# ----- models: GPTQ act-order + ft end to end, GGUF export, llama.cpp's fallback on narrow rows ----------------------
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _llama_256(vocab: int):
    """A one-layer Llama whose linears are all 256-multiples wide (k-quant superblocks fit every row)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.models.walker import round_to_storage

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return round_to_storage(LlamaForCausalLM(cfg).eval())


def _check_gguf(model, path, want: dict[str, QT]) -> None:  # noqa: ANN001 - a transformers Llama
    """Every quantized linear of ``model`` is the ``want``ed type in the GGUF ``path`` and dequantizes (gguf's numpy
    dequantizer) to exactly lowbit's weight."""
    from lowbit.io.gguf_export import qk_permutation
    from lowbit.models.quant_linear import QuantLinear

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    cfg = model.config
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layer, short = name.split(".")[2], name.split(".", 3)[3]
            t = tensors[f"blk.{layer}.{_GGUF_NAMES[short]}.weight"]
            assert t.tensor_type == want[short], (name, t.tensor_type)
            w = m.dequantize()
            if short.endswith(("q_proj", "k_proj")):
                heads = cfg.num_attention_heads if short.endswith("q_proj") else cfg.num_key_value_heads
                w = w[qk_permutation(heads, w.shape[0])]
            assert np.array_equal(dequantize(t.data, t.tensor_type), w.numpy()), name
            n += 1
    assert n == 7 * cfg.num_hidden_layers


@pytest.mark.parametrize("name", TYPES)
def test_gptq_act_ft_quantize_and_gguf_round_trip(name, tmp_path, tiny_tokenizer, text_file):
    """lowbit.quantize with GPTQ act-order + ft into a k-quant, exported: the file holds the k-quant for every
    linear, its bytes dequantize to lowbit's weights exactly, and --like maps each type back to itself."""
    import lowbit
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_types import plan_like

    model = _llama_256(len(tiny_tokenizer))
    recipe = lowbit.Recipe(name, method="gptq_act", finetune=lowbit.FinetuneConfig(epochs=1, lr=1e-2),
                           calib=lowbit.CalibConfig(nsamples=8, seqlen=32, text_path=text_file))
    result = lowbit.quantize(model, recipe, tiny_tokenizer, device="cpu", progress=False)
    assert result.finetune is not None and result.finetune.tuned_values > 0
    assert result.size.linear_bpw == BPW[name]
    report = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    assert report.type_counts()[name.upper()] == 7 and not report.fallbacks
    _check_gguf(model, tmp_path / "m.gguf", dict.fromkeys(_GGUF_NAMES, QT[name.upper()]))
    like = plan_like(model, tmp_path / "m.gguf")
    assert set(like.plan.values()) == {name} and len(like.plan) == 7


@pytest.mark.parametrize("name", TYPES)
def test_llama_cpp_runs_kquant_file_like_lowbit(name, tmp_path, tiny_tokenizer):
    """Stock llama.cpp loads a file of each k-quant lowbit wrote and computes lowbit's logits, within llama.cpp's
    8-bit activation rounding (the bound of test_q2k.py's Q2_K agreement test, on the same sharpened model)."""
    from lowbit.algorithms.plans import uniform_plan
    from lowbit.algorithms.rtn import quantize_rtn

    require_llama_cpp()
    model = sharpen_llama(_llama_256(len(tiny_tokenizer)))
    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. Low-bit quantization")
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits[0].numpy()
    quantize_rtn(model, uniform_plan(model, name), progress=False)
    want, got = exported_logits(model, tiny_tokenizer, tmp_path / "m.gguf")
    diff, top = np.abs(got - want), np.abs(want).max()
    print(f"{name}: max |logit diff| llama.cpp vs lowbit = {diff.max():.3f}, mean {diff.mean():.4f} (max |logit| "
          f"{top:.2f}); mean vs the float model {np.abs(got - before).mean():.3f}")
    # Measured here (max / mean; mean vs float): q3_k 0.53 / 0.057; 0.98, q4_k 0.68 / 0.056; 0.49,
    # q5_k 0.46 / 0.054; 0.25, q6_k 0.54 / 0.056; 0.15
    assert top > 1 and diff.max() < 0.1 * top and diff.mean() < 0.01 * top
    assert diff.mean() < 0.5 * np.abs(got - before).mean()  # llama.cpp runs the quantized weights, not the floats


def test_narrow_rows_fall_back_like_llama_cpp(tmp_path, tiny_tokenizer):
    """The 64-wide tiny Llama cannot hold 256-weight superblocks: a q4_k recipe gives Q5_0 (and q6_k Q8_0) to every
    linear, as llama-quantize does, and the file is written without a --fallback."""
    import lowbit
    from lowbit.io.gguf_export import export_gguf

    for name, qtype in (("q4_k", QT.Q5_0), ("q6_k", QT.Q8_0)):
        model = make_model("llama", vocab=len(tiny_tokenizer))
        lowbit.quantize(model, name, progress=False)
        export_gguf(model, tiny_tokenizer, tmp_path / f"{name}.gguf")
        _check_gguf(model, tmp_path / f"{name}.gguf", dict.fromkeys(_GGUF_NAMES, qtype))
