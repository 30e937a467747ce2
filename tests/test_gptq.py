import copy
import zlib

import pytest
import torch

from conftest import make_model
from lowbit.algorithms.gptq import gptq_quantize, inverse_cholesky, proxy_loss
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig, quantize_sequential
from lowbit.formats import get_format
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears


def correlated_problem(rows=32, cols=128, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven scales
    H = 2.0 / n * X.t() @ X
    W = torch.randn(rows, cols, generator=g)
    return W, H


def rtn_loss(W, H, fmt):
    return proxy_loss(W, fmt.dequantize(fmt.quantize(W)), H)


@pytest.mark.parametrize("name", ["int4_g32_asym", "int3_g64_sym", "int2_g32_asym", "int3_ch_sym",
                                  "int2_g64_asym_mse", "int4_g128_sym"])
@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (False, True)])
def test_gptq_beats_rtn_on_proxy_loss(name, act_order, static_groups):
    W, H = correlated_problem(seed=zlib.crc32(name.encode()) % 1000)
    fmt = get_format(name)
    res = gptq_quantize(W, H, fmt, blocksize=32, act_order=act_order, static_groups=static_groups)
    assert res.proxy_loss < 0.9 * rtn_loss(W, H, fmt)
    # the stored tensor is what the loss was measured on
    assert res.proxy_loss == pytest.approx(proxy_loss(W, fmt.dequantize(res.qt), H), rel=1e-6)
    assert res.qt.bits_per_weight == pytest.approx(fmt.bits_per_weight(tuple(W.shape)))


def reference_gptq_per_channel(W, H, fmt, percdamp=0.01):
    """Textbook GPTQ without lazy blocks: quantize column j, push its error to all later columns."""
    W = W.clone()
    U, _, _ = inverse_cholesky(H, percdamp)
    params = fmt.fit(W)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = fmt.decode(fmt.encode(W[:, j : j + 1], params), params)
        Q[:, j : j + 1] = q
        err = (W[:, j : j + 1] - q) / U[j, j]
        W[:, j:] -= err * U[j : j + 1, j:]
    return Q


def test_lazy_blocks_match_textbook_gptq():
    W, H = correlated_problem(rows=16, cols=96, seed=3)
    fmt = get_format("int3_ch_asym")
    ref = reference_gptq_per_channel(W, H, fmt)
    for bs in (7, 32, 96, 128):
        got = fmt.dequantize(gptq_quantize(W, H, fmt, blocksize=bs).qt)
        assert (got != ref).float().mean() < 0.01  # float reassociation may flip a rare tie
        assert proxy_loss(W, got, H) == pytest.approx(proxy_loss(W, ref, H), rel=1e-3)


def test_singular_hessian_falls_back_to_more_damping():
    W, _ = correlated_problem(rows=8, cols=64)
    X = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))  # rank 16 < 64
    H = X.t() @ X
    res = gptq_quantize(W, H, get_format("int4_g32_sym"), percdamp=0.0)
    assert res.retries >= 1 and res.damp > 0
    assert torch.isfinite(get_format("int4_g32_sym").dequantize(res.qt)).all()


def test_dead_inputs_are_zeroed():
    W, H = correlated_problem(rows=8, cols=64)
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq_quantize(W, H, get_format("int4_g32_asym"))
    deq = get_format("int4_g32_asym").dequantize(res.qt)
    assert deq[:, 5].abs().max() <= res.qt.data["scale"].float().abs().max()  # ~0: within one step


def test_shape_mismatch_is_a_clear_error():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="Hessian shape"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16), get_format("int4_g32_sym"))


def run_gptq(model, tok, text_file, fmt="int3_g32_asym", **kw):
    calib = CalibConfig(nsamples=8, seqlen=32, text_path=text_file)
    return quantize_sequential(model, tok, uniform_plan(model, fmt), calib=calib, device="cpu",
                               progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sequential_gptq_beats_rtn_per_layer(arch, tiny_tokenizer, text_file):
    model = make_model(arch, vocab=len(tiny_tokenizer))
    report = run_gptq(model, tiny_tokenizer, text_file)
    names = list(decoder_linears(model))
    assert set(report.linears) == set(names)
    assert all(isinstance(m, QuantLinear) for m in decoder_linears(model).values())
    for layer in range(2):
        mine = [s for n, s in report.linears.items() if f".{layer}." in n]
        assert sum(s.proxy_loss for s in mine) < sum(s.rtn_proxy_loss for s in mine)


def test_act_order_on_model(tiny_tokenizer, text_file):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    report = run_gptq(model, tiny_tokenizer, text_file, rounding="gptq_act")
    assert sum(s.proxy_loss for s in report.linears.values()) < sum(s.rtn_proxy_loss for s in report.linears.values())


def test_deterministic(tiny_tokenizer, text_file):
    a = make_model("llama", vocab=len(tiny_tokenizer))
    b = copy.deepcopy(a)
    run_gptq(a, tiny_tokenizer, text_file)
    run_gptq(b, tiny_tokenizer, text_file)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_rotated_gptq_resume_and_loss(tiny_tokenizer, text_file, tmp_path):
    """GPTQ in the rotated basis (W' = U W V^T, H' = V H V^T) still beats RTN there, and resumes exactly."""
    base = make_model("llama", vocab=len(tiny_tokenizer))
    cfg = {"rotation_seed": 0}
    clean = copy.deepcopy(base)
    report = run_gptq(clean, tiny_tokenizer, text_file, fmt="nz2_ch", **cfg)
    assert sum(s.proxy_loss for s in report.linears.values()) < sum(s.rtn_proxy_loss for s in report.linears.values())

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_gptq(copy.deepcopy(base), tiny_tokenizer, text_file, fmt="nz2_ch", **cfg, checkpoint_dir=ckpt,
                 on_layer_done=crash)
    resumed = copy.deepcopy(base)
    run_gptq(resumed, tiny_tokenizer, text_file, fmt="nz2_ch", **cfg, checkpoint_dir=ckpt)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(clean(ids).logits, resumed(ids).logits)


@pytest.mark.parametrize("fmt", ["nz2_g32", "iq2_xxs"])
def test_imatrix_rounding_uses_calibration_importance(fmt, tiny_tokenizer, text_file):
    from lowbit.api import quantize
    from lowbit.recipe import Recipe

    calib = CalibConfig(nsamples=8, seqlen=32, text_path=text_file)
    model = make_model("llama", vocab=len(tiny_tokenizer))
    stats = quantize(model, Recipe(fmt, "imatrix", calib=calib), tiny_tokenizer, progress=False).linears
    assert all(isinstance(m, QuantLinear) for m in decoder_linears(model).values())
    imat, rtn = sum(s.proxy_loss for s in stats.values()), sum(s.rtn_proxy_loss for s in stats.values())
    if fmt == "iq2_xxs":  # the weights steer the vector search and the scales: the Hessian-weighted error drops
        assert imat < rtn
    else:  # a scalar grid only moves its scale: diag(H) ignores input correlations, so no better than ~RTN
        assert imat < 1.05 * rtn


def test_act_order_in_a_mixed_plan_skips_vector_codebooks(tiny_tokenizer, text_file):
    """llama.cpp-like plans mix a vector codebook with scalar fallbacks: act-order applies where it can."""
    from lowbit.api import quantize
    from lowbit.errors import LowbitError
    from lowbit.recipe import Recipe

    model = make_model("llama", vocab=len(tiny_tokenizer))
    plan = {n: "e8p_ch" if n.endswith("down_proj") else "int4_g32_sym" for n in decoder_linears(model)}
    calib = CalibConfig(nsamples=8, seqlen=32, text_path=text_file)
    stats = quantize(model, Recipe(plan, "gptq_act", calib=calib), tiny_tokenizer, device="cpu", progress=False).linears
    assert set(stats) == set(plan)
    assert {m.format_name for m in decoder_linears(model).values()} == {"e8p_ch", "int4_g32_sym"}
    with pytest.raises(LowbitError, match="act-order needs a scalar format"):
        Recipe("e8p_ch", "gptq_act", calib=calib)
