import copy
import zlib

import pytest
import torch

from conftest import make_model
from lowbit.algorithms.gptq import factor_hessian, gptq_quantize, gptq_quantize_shared, inverse_cholesky, proxy_loss
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig, GPTQConfig, quantize_sequential
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
    kw.setdefault("gptq", GPTQConfig(rtn_baseline=True))
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
    recipe = Recipe(fmt, "imatrix", calib=calib, gptq=GPTQConfig(rtn_baseline=True))
    stats = quantize(model, recipe, tiny_tokenizer, progress=False).linears
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


# ----------------------------------------------------------------------- shared Hessians, stacked rows (issue 18)


@pytest.mark.parametrize(("name", "act_order"), [("int4_g32_sym", False), ("int3_g64_asym", True),
                                                 ("int2_g64_asym_mse", False), ("e8p_ch", False)])
def test_stacked_rows_are_the_separate_calls(name, act_order):
    """GPTQ's rows are independent given H: q/k/v rounded in one stacked call are, bit for bit, three calls."""
    from lowbit.algorithms.gptq import factor_hessian, gptq_quantize_shared

    W, H = correlated_problem(rows=96, cols=128, seed=5)
    fmt = get_format(name)
    parts = [W[:64], W[64:80], W[80:]]
    shared = gptq_quantize_shared(parts, factor_hessian(H, 0.01, act_order), fmt, blocksize=32)
    for w, got in zip(parts, shared, strict=True):
        want = gptq_quantize(w, H, fmt, blocksize=32, act_order=act_order)
        assert got.qt.shape == tuple(w.shape)
        assert all(torch.equal(got.qt.data[k], want.qt.data[k]) for k in want.qt.data)
        assert got.proxy_loss == want.proxy_loss


def test_shared_hessians_follow_the_input_tensor_not_names():
    from lowbit.calibration.capture import HessianAccumulator, SharedHessians

    model = make_model("llama")
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None]
    kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None, "position_ids": pos}
    shared = SharedHessians(linears, "cpu")
    own = {n: HessianAccumulator(m, m.in_features, "cpu") for n, m in linears.items()}
    with torch.no_grad():
        for j in range(3):
            layer(x[j : j + 1], **kw)
    groups = shared.remove()
    hessians = {n: a.remove() for n, a in own.items()}
    assert sorted(g for g, _ in groups) == sorted([("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                  ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                                  ("mlp.down_proj",)])
    for group, H in groups:
        assert all(torch.equal(H, hessians[n]) for n in group)  # the same operations on the same rows


def test_shared_hessians_refuse_inputs_shared_only_sometimes():
    from lowbit.calibration.capture import SharedHessians

    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    shared = SharedHessians({"a": a, "b": b}, "cpu")
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    a(x), b(x)  # shared in the first forward...
    a(x), b(y)  # ...not in the second
    assert shared.remove() is None
    shared = SharedHessians({"a": a, "b": b}, "cpu")
    a(x)
    x.add_(1)  # changed in place between the two reads: not the same input
    b(x)
    assert [g for g, _ in shared.remove()] == [("a",), ("b",)]


def _per_linear_layer(layer, names, plan, prefix, index, inps, kwargs, cfg, rounding, rotation_seed):
    """The path before issue 18: one H per linear, one GPTQ call (and one factorization) per linear."""
    from lowbit.algorithms import sequential
    from lowbit.calibration.capture import HessianAccumulator
    from lowbit.models.fused_linears import layer_rotation
    from lowbit.models.walker import linear_weight, set_module

    local = {n: n[len(f"{prefix}.{index}.") :] for n in names}
    accs = {n: HessianAccumulator(layer.get_submodule(s), linear_weight(layer.get_submodule(s)).shape[1], "cpu")
            for n, s in local.items()}
    sequential._run_layer(layer, inps, kwargs)
    hessians = {n: a.remove() for n, a in accs.items()}
    stats = {}
    for name, sub in local.items():
        module = layer.get_submodule(sub)
        fmt, w, H = get_format(plan[name]), linear_weight(module).float(), hessians[name]
        rotation = None if rotation_seed is None else layer_rotation(name, rotation_seed)
        if rotation:
            w, H = rotation.rotate_weight(w), rotation.rotate_hessian(H)
        act = rounding == "gptq_act" and fmt.vector_dim == 1
        if rounding == "imatrix":
            qt = fmt.quantize(w, importance=H.diagonal().clamp_min(0))
            res = sequential.GPTQResult(qt, proxy_loss(w, fmt.dequantize(qt), H), 0.0, 0)
        else:
            res = gptq_quantize(w, H, fmt, cfg.blocksize, cfg.percdamp, act, cfg.static_groups)
        bias = None if module.bias is None else module.bias.data
        set_module(layer, sub, QuantLinear.from_quantized(res.qt, bias, rotation))
        stats[name] = sequential.LinearStats(res.proxy_loss, None, res.damp, res.retries, 0.0)
    return stats


def _mixed_plan(model):
    """One layer, several formats: q/v one grid (stacked), k another (same H, own call), the MLP a vector codebook
    beside a scalar grid (act-order applies to one of them only)."""
    fmts = {"q_proj": "int4_g32_sym", "k_proj": "int3_g32_asym", "v_proj": "int4_g32_sym", "o_proj": "q4_0",
            "gate_proj": "e8p_ch", "up_proj": "int3_g32_asym", "down_proj": "int4_g32_sym"}
    return {n: fmts[n.rsplit(".", 1)[1]] for n in decoder_linears(model)}


@pytest.mark.parametrize(("arch", "rounding", "plan", "seed"), [
    ("llama", "gptq", "int3_g32_asym", None), ("llama", "gptq_act", "int4_g32_sym", None),
    ("opt", "gptq", "int3_g32_asym", None), ("llama", "gptq_act", "mixed", None),
    ("llama", "gptq", "nz2_ch", 0), ("llama", "imatrix", "nz2_g32", None)])
def test_shared_path_matches_per_linear_path(arch, rounding, plan, seed, tiny_tokenizer, text_file, monkeypatch):
    """Sharing Hessians and stacking rows changes no number: bit-identical models, equal proxy losses."""
    from lowbit.algorithms import sequential

    calib = CalibConfig(nsamples=4, seqlen=32, text_path=text_file)
    base = make_model(arch, vocab=len(tiny_tokenizer))
    reports = []
    for layer_fn in (sequential._quantize_layer, _per_linear_layer):
        model = copy.deepcopy(base)
        monkeypatch.setattr(sequential, "_quantize_layer", layer_fn)
        p = _mixed_plan(model) if plan == "mixed" else uniform_plan(model, plan)
        reports.append((model, quantize_sequential(model, tiny_tokenizer, p, calib=calib, device="cpu",
                                                   progress=False, rounding=rounding, rotation_seed=seed)))
    (new, rep_new), (old, rep_old) = reports
    assert [k for k, v in new.state_dict().items() if not torch.equal(v, old.state_dict()[k])] == []
    if seed is not None:  # +rht siblings share one input-side rotation (one rotated H, one factorization)
        attn = new.model.layers[0].self_attn
        assert attn.q_proj.rotation.seed_in == attn.k_proj.rotation.seed_in == attn.v_proj.rotation.seed_in
    for name, s in rep_old.linears.items():
        assert rep_new.linears[name].proxy_loss == pytest.approx(s.proxy_loss, rel=1e-6, abs=0)
        assert (rep_new.linears[name].damp, rep_new.linears[name].retries) == (s.damp, s.retries)


def test_quantized_pass_dequantizes_once_with_the_same_numbers():
    from lowbit.algorithms.sequential import _run_layer

    model = make_model("llama")
    layer = model.model.layers[0]
    for name, m in list(layer.named_modules()):
        if isinstance(m, torch.nn.Linear):
            qt = get_format("int4_g32_sym").quantize(m.weight.data)
            layer.set_submodule(name, QuantLinear.from_quantized(qt))
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None]
    kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None, "position_ids": pos}
    with torch.no_grad():
        want = torch.stack([layer(x[j : j + 1], **kw)[0] for j in range(2)])
    calls = []
    fmt = get_format("int4_g32_sym")
    orig = type(fmt).dequantize
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(fmt), "dequantize", lambda self, qt: calls.append(1) or orig(self, qt))
        got = _run_layer(layer, x, kw)
    assert torch.equal(got, want)
    assert len(calls) == 7  # once per linear for the pass, not once per sample
    assert not any(m.weight_cached for m in layer.modules() if isinstance(m, QuantLinear))


def test_resume_fingerprint_follows_the_gptq_implementation(monkeypatch):
    """Rounding that changes bit-wise bumps gptq.IMPLEMENTATION: an older run's checkpoint is refused, not mixed."""
    from lowbit.algorithms import sequential

    model = make_model("llama")
    args = (model, uniform_plan(model, "int4_g32_sym"), CalibConfig(), GPTQConfig(), "gptq", None)
    before = sequential._fingerprint(*args)
    monkeypatch.setattr(sequential, "GPTQ_IMPLEMENTATION", sequential.GPTQ_IMPLEMENTATION + 1)
    assert sequential._fingerprint(*args) != before


def test_resume_fingerprint_follows_the_rotation_sides(monkeypatch):
    """A run rotated with other sides (checkpoints from before rotations lost their output sides) is not resumed."""
    from functools import partial

    from lowbit.algorithms import sequential

    model = make_model("llama")
    args = (model, uniform_plan(model, "int4_g32_sym"), CalibConfig(), GPTQConfig(), "gptq", 0)
    before = sequential._fingerprint(*args)
    assert sequential._fingerprint(*args) == before
    monkeypatch.setattr(sequential, "layer_rotation", partial(sequential.layer_rotation, output_side=True))
    assert sequential._fingerprint(*args) != before


def test_hessian_shrinkage_keeps_the_diagonal_and_trades_calibration_fit():
    """shrink s: H' = (1 - s) H + s diag(H). s = 1 leaves a diagonal H (no error is fed forward: importance-weighted
    rounding); in between, the fit to the calibration inputs' own H loosens step by step."""
    from lowbit.algorithms.gptq import factor_hessian, gptq_quantize_shared
    from lowbit.errors import LowbitError

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    H = 2 * X.T @ X / X.shape[0]
    f = {s: factor_hessian(H, shrink=s) for s in (0.0, 0.5, 1.0)}
    assert torch.count_nonzero(torch.triu(f[1.0].U, 1)) == 0 and torch.count_nonzero(torch.triu(f[0.5].U, 1)) > 0
    assert all(torch.equal(f[s].importance, f[0.0].importance) and torch.equal(f[s].H, H.float()) for s in f)
    w = torch.randn(32, 64, generator=g)
    loss = [gptq_quantize_shared([w], f[s], get_format("int3_g32_sym"))[0].proxy_loss for s in (0.0, 0.5, 1.0)]
    assert loss[0] < loss[1] < loss[2], loss
    with pytest.raises(LowbitError, match="shrink"):
        GPTQConfig(shrink=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt_name,act_order,static", [("q4_0", True, False), ("int4_g128_asym", False, True),
                                                       ("int2_g64_sym", True, False), ("q4_k", True, False),
                                                       ("nz2_ch", False, False), ("e8p_ch", False, False)])
def test_cuda_graph_blocks_match_eager_bit_for_bit(fmt_name, act_order, static, monkeypatch):
    """Static blocks replayed from CUDA graphs give exactly the eager column loop's codes and scales; the scalar
    grids are captured (not silently eager); vector codebooks run eagerly."""
    from lowbit.algorithms import gptq

    torch.manual_seed(7)
    cols = 768
    X = torch.randn(2048, cols, device="cuda") * torch.rand(cols, device="cuda") * 3
    H, w = X.T @ X / 2048, torch.randn(320, cols, device="cuda")
    captured = []
    real_capture = gptq._BlockGraphs._capture

    def spy(self, *a):
        out = real_capture(self, *a)
        captured.append(fmt_name)
        return out

    monkeypatch.setattr(gptq._BlockGraphs, "_capture", spy)
    fmt = get_format(fmt_name)
    graphed = gptq_quantize(w, H, fmt, act_order=act_order, static_groups=static)
    with monkeypatch.context() as mp:
        mp.setattr(gptq, "_BlockGraphs", gptq._EagerBlocks)
        eager = gptq_quantize(w, H, fmt, act_order=act_order, static_groups=static)
    for k in eager.qt.data:
        assert torch.equal(graphed.qt.data[k], eager.qt.data[k]), k
    assert bool(captured) == (fmt.vector_dim == 1), captured


@pytest.mark.parametrize("name", ["int4_g32_sym_mse", "int4_g32_sym_ls", "int2_g64_asym_mse", "q2_k", "iq4_nl"])
def test_act_order_fits_uniform_grids_with_llama_cpp_weighted_importance(name):
    """With no input correlations (diagonal H) GPTQ feeds no error forward, so act-order GPTQ is round-to-nearest
    with each group's scale fitted on diag(H) x sqrt(sigma^2 + w^2) (llama.cpp's per-weight importance) for
    uniform grids, and on diag(H) for the others (K-quants, level sets: measured worse weighted)."""
    from lowbit.algorithms.gptq import weighted_importance
    from lowbit.formats import UniformFormat

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=g).pow(3) * 0.02  # heavy tails: a few large weights per group
    diag = torch.rand(256, generator=g) + 0.5
    fmt = get_format(name)
    res = gptq_quantize(w, torch.diag(diag), fmt, act_order=True, percdamp=0.0)
    imp = weighted_importance(w, diag)
    assert torch.allclose(imp, diag * torch.sqrt(w.pow(2).mean(dim=1, keepdim=True) + w.pow(2)))
    weighted, plain = fmt.quantize(w, importance=imp), fmt.quantize(w, importance=diag)
    assert not all(torch.equal(plain.data[k], weighted.data[k]) for k in plain.data)  # the weighting matters here
    want = weighted if isinstance(fmt, UniformFormat) else plain
    assert all(torch.equal(res.qt.data[k], want.data[k]) for k in want.data)


@pytest.mark.parametrize("name", ["iq2_xxs", "e8p_ch"])
def test_block_ldlq_rounds_vectors_by_importance(name):
    """With a diagonal Hessian nothing is fed forward, so block LDLQ must be the format's own importance-weighted
    rounding: each 8-vector's nearest codeword weighed by diag(H), as its group fit is (not the plain distance)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 512, generator=g)
    diag = torch.exp(2 * torch.randn(512, generator=g))  # inputs of very uneven importance
    fmt = get_format(name)
    ldlq = gptq_quantize(W, torch.diag(diag), fmt).qt
    weighted = fmt.quantize(W, importance=diag)
    assert torch.equal(fmt.dequantize(ldlq), fmt.dequantize(weighted))
    assert not torch.equal(fmt.dequantize(ldlq), fmt.dequantize(fmt.quantize(W)))
    # a rotated (incoherent) Hessian's search stays plain: the fits are still weighted, the codewords are not
    plain = gptq_quantize_shared([W], factor_hessian(torch.diag(diag)), fmt, weighted_search=False)[0].qt
    codes, params = fmt.unpack(plain)
    assert torch.equal(codes, fmt.encode(W, fmt.expand(params, W.shape[1])))
