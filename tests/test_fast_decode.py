"""Static-cache / CUDA-graph decoding (lowbit.serve.fast_decode) against the plain dynamic-cache loop.

On CPU the decode step runs eagerly (the graph path's exact step body, minus capture); a meta-device run checks
the step is capture-safe (no host syncs, no host-to-device copies). CUDA tests skip without a GPU.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.formats import get_format
from lowbit.models.fused_linears import layer_rotation
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, empty_quant_linear, set_module
from lowbit.serve.fast_decode import StaticDecoder, place_rotations
from lowbit.serve.generate import SamplingParams, TextStream, cache_arg

PROMPT = [5, 17, 42, 99, 3, 7]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_llama(seed: int = 0, vocab: int = 320, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def reference_greedy(model, prompt, n: int) -> list[list[int]]:  # noqa: ANN001
    """The dynamic-cache loop of lowbit.serve.generate (batched rows decoded together)."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor(prompt, device=dev)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    past, out = None, []
    with torch.inference_mode():
        for _ in range(n):
            o = model(input_ids=ids, **{cache_arg(model): past}, use_cache=True, logits_to_keep=1)
            past = getattr(o, cache_arg(model))
            ids = torch.argmax(o.logits[:, -1].float(), dim=-1, keepdim=True)
            out.append(ids)
    return torch.cat(out, dim=1).tolist()


def rtn_rotated(model, fmt: str, rotate: bool | str = False, seed: int = 0) -> dict[str, float]:  # noqa: ANN001
    """RTN of every decoder linear in ``fmt`` (returns quantize_rtn's errors); ``rotate``: True rotates as lowbit
    quantizes (input sides only), "both": input and output sides, as checkpoints written before carry them."""
    import lowbit.algorithms.rtn as rtn

    with pytest.MonkeyPatch.context() as mp:
        if rotate == "both":
            mp.setattr(rtn, "layer_rotation", partial(rtn.layer_rotation, output_side=True))
        return quantize_rtn(model, uniform_plan(model, fmt), progress=False, rotate=bool(rotate), seed=seed)


def quantized_llama(fmt: str = "int4_g32_sym", rotate: bool | str = False, rtn: bool = True,  # noqa: ANN201
                    hidden: int = 64):
    """Every decoder linear a QuantLinear: RTN of the random weights, or (``rtn=False``, for formats whose RTN
    searches scales and is slow on CPU) random packed codes with scales of a plausible size. ``rotate``: as
    :func:`rtn_rotated`."""
    model = tiny_llama(hidden=hidden)
    if rtn:
        rtn_rotated(model, fmt, rotate)
        return model
    g = torch.Generator().manual_seed(1)
    for name, lin in decoder_linears(model).items():
        rotation = layer_rotation(name, 0, output_side=rotate == "both") if rotate else None
        q = empty_quant_linear(lin, fmt, rotation)
        q.codes.copy_(torch.randint(0, 256, q.codes.shape, generator=g, dtype=torch.uint8))
        q.scale.copy_(torch.rand(q.scale.shape, generator=g) * 0.02 + 0.01)
        set_module(model, name, q)
    return model


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_llama()


def test_greedy_matches_dynamic_cache_loop_fp32(fp32_model):
    ref = reference_greedy(fp32_model, PROMPT, 24)
    dec = StaticDecoder(fp32_model, max_cache_len=len(PROMPT) + 24)
    assert not dec.use_graph  # CPU: the same step, run eagerly
    out = dec.generate_greedy(PROMPT, 24)
    assert out.tolist() == ref
    assert dec.length == len(PROMPT) + 23 == dec.max_cache_len - 1
    # the decoder is reusable: same tokens again after an internal reset, for another prompt too
    assert dec.generate_greedy(PROMPT, 24).tolist() == ref
    other = [1, 2, 3]
    assert dec.generate_greedy(other, 10).tolist() == reference_greedy(fp32_model, other, 10)


def test_step_api_matches_and_accepts_external_tokens(fp32_model):
    ref = reference_greedy(fp32_model, PROMPT, 12)[0]
    dec = StaticDecoder(fp32_model, max_cache_len=32)
    dec.reset()
    logits = dec.prefill(PROMPT)
    got = []
    for i in range(12):
        t = int(torch.argmax(logits[0]))
        got.append(t)
        if i < 11:
            logits = dec.step(t)
    assert got == ref
    # a forced (non-greedy) token continues exactly like the reference fed the same token
    dec.reset()
    dec.prefill(PROMPT)
    logits = dec.step(11)
    with torch.inference_mode():
        full = fp32_model(input_ids=torch.tensor([PROMPT + [11]])).logits[0, -1]
    torch.testing.assert_close(logits[0], full, rtol=1e-4, atol=1e-4)


def test_batch_of_two(fp32_model):
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4]]
    dec = StaticDecoder(fp32_model, max_cache_len=20, batch_size=2)
    assert dec.generate_greedy(prompts, 10).tolist() == reference_greedy(fp32_model, prompts, 10)


@pytest.mark.parametrize(("fmt", "rotate", "rtn"),
                         [("int4_g32_sym", False, True), ("int3_g32_asym", True, True),
                          ("int3_g32_asym", "both", True), ("nz2_ch", False, False)])
def test_greedy_matches_with_quant_linear(fmt, rotate, rtn):
    model = quantized_llama(fmt, rotate, rtn)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ref = reference_greedy(model, PROMPT, 16)
    dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 16)
    assert dec.generate_greedy(PROMPT, 16).tolist() == ref
    assert reference_greedy(model, PROMPT, 16) == ref  # placing the rotations on the device changed nothing


@pytest.mark.parametrize("weight_cache", [False, True])
def test_compiled_step_matches_eager_with_quant_linear(weight_cache: bool):
    """torch.compile of the step decodes the same tokens without a graph break: QuantLinears enter it as the
    lowbit::qmatmul custom op, or with the weight cache on (a CPU's fast decode) as a matmul of the cached weight the
    prefill built."""
    from torch._dynamo.utils import counters

    model = quantized_llama("int4_g32_sym")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weight(weight_cache)
    ref = reference_greedy(model, PROMPT, 12)
    torch._dynamo.reset()
    counters.clear()
    dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 12, compile=True)
    assert dec.generate_greedy(PROMPT, 12).tolist() == ref
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_pdl_applies_only_to_compiled_steps_on_hopper(fp32_model):
    assert not StaticDecoder(fp32_model, max_cache_len=8).pdl  # "auto" on a CPU: plain launches
    assert not StaticDecoder(fp32_model, max_cache_len=8, compile=True).pdl
    with pytest.raises(ValueError, match="compute capability"):
        StaticDecoder(fp32_model, max_cache_len=8, compile=True, pdl=True)
    with pytest.raises(ValueError, match="pdl must be"):
        StaticDecoder(fp32_model, max_cache_len=8, pdl="on")


def test_eos_stops_early_and_limits(fp32_model):
    ref = reference_greedy(fp32_model, PROMPT, 40)[0]
    dec = StaticDecoder(fp32_model, max_cache_len=64)
    eos = ref[3]
    out = dec.generate_greedy(PROMPT, 40, eos_token_ids=[eos], check_every=4)[0].tolist()
    assert out == ref[:len(out)] and eos in out and len(out) < 40
    with pytest.raises(ValueError, match="max_cache_len"):
        dec.generate_greedy(PROMPT, 64)
    small = StaticDecoder(fp32_model, max_cache_len=8)
    small.reset()
    small.prefill(PROMPT)
    small.step()
    small.step()
    with pytest.raises(ValueError, match="full"):
        small.step()
    with pytest.raises(ValueError):
        StaticDecoder(fp32_model, max_cache_len=8, cuda_graph=True)  # CUDA graphs on a CPU model


def test_text_stream_with_decoder(tiny_tokenizer):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    prompt = tiny_tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=10, temperature=0)
    plain = TextStream(model, tiny_tokenizer, prompt, params)
    text = plain.text()
    dec = StaticDecoder(model, max_cache_len=len(prompt) + 10)
    fast = TextStream(model, tiny_tokenizer, prompt, params, decoder=dec)
    assert fast.text() == text and fast.token_ids == plain.token_ids and fast.finish_reason == plain.finish_reason
    # sampling with a seed is reproducible through the decoder too
    sp = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    a = TextStream(model, tiny_tokenizer, prompt, sp)
    a.text()
    b = TextStream(model, tiny_tokenizer, prompt, sp, decoder=dec)
    b.text()
    assert a.token_ids == b.token_ids
    # a cache too small for max_new_tokens caps the completion ("length")
    short = TextStream(model, tiny_tokenizer, prompt, params, decoder=StaticDecoder(model, len(prompt) + 3))
    short.text()
    assert short.token_ids == plain.token_ids[:4] and short.finish_reason == "length"


class _HostSyncSpy(TorchDispatchMode):
    """Records ops a CUDA graph cannot capture: reading a device value on the host, using a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.bad.append(str(func))
        elif any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
                 for t in tree_leaves((args, kwargs))):
            self.bad.append(f"{func} on a CPU tensor")
        return func(*args, **kwargs)


@pytest.mark.parametrize("fmt", [None, "int4_g32_sym"])
def test_decode_step_is_capture_safe(fmt):
    """On the meta device every tensor op is shape-only: a host sync (.item(), if tensor) or a CPU tensor
    copied in would show up here, and would break CUDA graph capture on a GPU."""
    model = quantized_llama(fmt, rotate=True) if fmt else tiny_llama()
    model = model.to("meta")
    dec = StaticDecoder(model, max_cache_len=16)
    dec.prefill(PROMPT)
    with torch.inference_mode(), _HostSyncSpy() as spy:
        dec._body()
        dec._body()
    assert spy.bad == []


def test_place_rotations_keeps_shared_transforms():
    model = quantized_llama("int4_g32_sym", rotate=True)
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    before = q._v
    assert place_rotations(model, torch.device("meta")) == 14  # 14 linears' input sides (no output sides)
    assert q._v is not before and q._v.signs.is_meta and not before.signs.is_meta


def _decode_benchmark():  # noqa: ANN202 - the benchmarks/decode.py module
    """benchmarks/decode.py as a module (benchmarks/ is not a package)."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import decode
    finally:
        sys.path.remove(str(root / "benchmarks"))
    return decode


def test_benchmark_cpu_smoke(tmp_path):
    bench = _decode_benchmark()
    out = tmp_path / "decode.json"
    rc = bench.main(["--device", "cpu", "--layers", "1", "--hidden", "128", "--intermediate", "256",
                     "--heads", "4", "--vocab", "256", "--prompt", "4", "--gen", "4", "--repeats", "1",
                     "--check-tokens", "4", "--formats", "fp16,int4_g128_sym,nz2_ch,e8p_ch+rht,e8p_ch+rht2",
                     "--out", str(out)])
    assert rc == 0
    import json

    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["rows"]] == ["fp16", "int4_g128_sym", "nz2_ch", "e8p_ch+rht", "e8p_ch+rht2"]
    for r in res["rows"]:
        assert r["tok_s"] > 0 and r["roofline_tok_s"] > 0 and r["eager_tokens_match"]
        assert r["reference_agree"] == "4/4"
    assert res["rows"][1]["bpw"] == pytest.approx(4.125)
    assert res["rows"][0]["bytes"]["linears"] > 7 * res["rows"][1]["bytes"]["linears"]


def test_benchmark_reports_how_near_a_tie_the_first_difference_was():
    """decode.py's token check: the agreeing prefix, and at the first difference the reference's top-two logit gap
    and whether the fast path took the reference's runner-up."""
    bench = _decode_benchmark()
    runners = [(7, 0.5), (9, 0.01), (4, 2.0)]
    assert bench.first_difference([1, 2, 3], runners, [1, 2, 3]) == {"reference_agree": "3/3"}
    assert bench.first_difference([1, 2, 3], runners, [1, 9, 5]) == {
        "reference_agree": "1/3", "first_difference_gap": 0.01, "first_difference_runner_up": True}
    assert bench.first_difference([1, 2, 3], runners, [8])["first_difference_runner_up"] is False


def test_benchmark_random_weights_average_zero():
    """decode.py's random codes on a grid whose levels do not average zero (int3 sym: -4..3) and no min get random
    signs on their scales: else every weight of a row shares an offset whose rank-one gain compounds over the
    layers (a 7B-shaped int3 model overflowed fp16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _decode_benchmark()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    bench.quantize_model(model, "int3_g64_sym", "random")
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        w = model.get_submodule(name).dequantize()
        assert w.mean().abs() < 0.05 * w.std(), name  # the grid's own offset: 0.22 std


def test_benchmark_rotates_only_the_linears_named():
    """``--rht-only``: a +rht variant rotates the named linears and leaves the others unrotated (to time each
    transform's share of a step)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _decode_benchmark()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    bench.quantize_model(model, "nz2_ch+rht", "random", rht_only=("self_attn.q_proj", "mlp.down_proj"))
    rotated = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, m in model.named_modules()
               if isinstance(m, QuantLinear) and m.rotation is not None}
    assert rotated == {"self_attn.q_proj", "mlp.down_proj"}
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_benchmark_builds_valid_kquant_weights(tmp_path):
    """K-quant variants get valid random superblocks (random bytes would hold NaN d's) of std ~0.02 that average
    zero (an offset shared by every weight compounds over a deep model's layers: the fp16 reference loop of a
    7B-shaped Q4_K model reached NaN), and decode; a preset variant takes llama.cpp's per-tensor types."""
    bench = _decode_benchmark()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 64, bias=False)
    for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"):
        fmt = get_format(name)
        w = fmt.dequantize(bench._random_kquant(lin, fmt)).double()
        assert torch.isfinite(w).all() and 0.018 < float(w.std()) < 0.022, name
        assert abs(float(w.mean())) < 0.02 * float(w.std()), name
    out = tmp_path / "decode.json"
    rc = bench.main(["--device", "cpu", "--layers", "1", "--hidden", "256", "--intermediate", "512",
                     "--heads", "4", "--vocab", "256", "--prompt", "4", "--gen", "2", "--repeats", "1",
                     "--eager-repeats", "0", "--check-tokens", "2", "--formats", "q4_k,Q4_K_M", "--out", str(out)])
    assert rc == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["bpw"] == pytest.approx(4.5)
    assert rows[1]["bpw"] > 4.5  # llama.cpp's Q4_K_M: Q6_K for attn_v and some ffn_down


# ----- GPU --------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "rotate", "rtn"),
                         [(None, False, True), ("int4_g128_sym", False, True), ("nz2_ch", True, False),
                          ("nz2_ch", "both", False)])
def test_cuda_graph_matches_eager(fmt, rotate, rtn):
    """Graph replay runs the eager step's kernels on the same inputs: identical tokens. In fp32 the plain
    dynamic-cache loop agrees as well; in fp16 its different attention layout may flip near ties, so not checked."""
    if fmt is None:
        model = tiny_llama(hidden=256).cuda()
    else:  # QuantLinear's packed kernel (Triton) in fp16, with online rotations for nz2_ch
        model = quantized_llama(fmt, rotate, rtn, hidden=256).cuda().half()
    eager = StaticDecoder(model, max_cache_len=40, cuda_graph=False).generate_greedy(PROMPT, 32)
    dec = StaticDecoder(model, max_cache_len=40, cuda_graph=True)
    fast = dec.generate_greedy(PROMPT, 32)
    assert dec.graph_captured and dec.graph_error is None
    assert fast.tolist() == eager.tolist()
    assert dec.generate_greedy(PROMPT, 32).tolist() == eager.tolist()  # replay after reset
    if fmt is None:
        assert reference_greedy(model, PROMPT, 32) == eager.tolist()


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs compute capability 9.0")


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,rotate", [("q4_0", False), ("nz2_ch", False), ("nz2_ch", True), ("nz2_ch", "both")])
def test_pdl_step_gives_the_plain_steps_tokens_and_logits(fmt, rotate):
    """Programmatic dependent launch changes when kernels start, not what they compute: a kernel that read its
    inputs before the one writing them had finished would read the previous step's values (the graph replays into
    the same buffers) and move the logits by their own size. Inductor compiles its kernels anew with PDL and may
    tune their reductions differently, so the logits are compared to fp16 rounding, not bit for bit. Rotated
    (``+rht``) linears put the Hadamard transforms between the GEMVs, launched the same way."""
    model = quantized_llama(fmt, rotate=rotate, rtn=False, hidden=512).cuda().half()
    runs = {}
    for pdl in (False, True):
        torch._dynamo.reset()
        dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 33, compile=True, pdl=pdl)
        assert dec.pdl is pdl
        dec.reset()
        logits = [dec.prefill(PROMPT).clone()]
        logits += [dec.step().clone() for _ in range(32)]
        assert dec.graph_captured
        runs[pdl] = (torch.stack(logits), dec.tokens().tolist())
    assert runs[True][1] == runs[False][1]
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=2e-2 * float(runs[False][0].abs().max()), rtol=0)


@hopper
@pytest.mark.gpu
def test_pdl_auto_applies_to_rotated_models_too():
    model = quantized_llama("nz2_ch", rotate=True, rtn=False, hidden=256).cuda().half()
    assert StaticDecoder(model, max_cache_len=16, compile=True).pdl
    assert not StaticDecoder(model, max_cache_len=16, compile=True, pdl=False).pdl
    assert not StaticDecoder(model, max_cache_len=16, compile=False).pdl


@cuda
@pytest.mark.gpu
def test_cuda_graph_step_api_and_text_stream(tiny_tokenizer):
    model = tiny_llama(vocab=len(tiny_tokenizer)).cuda()
    prompt = tiny_tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=12, temperature=0)
    plain = TextStream(model, tiny_tokenizer, prompt, params)
    plain.text()
    dec = StaticDecoder(model, max_cache_len=64, cuda_graph=True)
    fast = TextStream(model, tiny_tokenizer, prompt, params, decoder=dec)
    fast.text()
    assert dec.graph_captured
    assert fast.token_ids == plain.token_ids
