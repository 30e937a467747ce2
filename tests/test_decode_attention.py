"""One-token decode attention (lowbit.kernels.triton_decode_attention) against its float64 reference, and the
"lowbit_decode" attention implementation (lowbit.models.decode_attention) against transformers' SDPA: under
Triton's interpreter on CPU (two subprocesses) and on CUDA when there is a GPU."""

import pytest
import torch

from conftest import run_scripts_in_interpreter
from lowbit.kernels.triton_decode_attention import decode_attention_reference, supported
from lowbit.models.decode_attention import NAME, use_decode_attention

# (batch, heads, kv heads, cache length, head dim, visible positions): GQA, MQA, a tail block, one visible key
CASES = [(1, 4, 2, 100, 64, 37), (2, 8, 8, 130, 128, 130), (1, 4, 1, 64, 16, 1), (2, 6, 2, 200, 32, 70)]
# the step's programs with keys to read: 1 of 3 (37, 1 visible: one block), 2 of 3 (70), 3 of 3 (190)
STEP_CASES = [c for c in CASES if c[4] < 128] + [(1, 4, 2, 200, 32, 190)]  # head size 128: the GPU tests

_SCRIPT = r"""
import json, sys
import torch
from lowbit.kernels import triton_decode_attention as kernel
from lowbit.kernels.triton_decode_attention import decode_attention, decode_attention_reference
g = torch.Generator().manual_seed(1)
out = {}
for b, h, hkv, s, d, used in json.loads(sys.argv[1]):
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, 1), (hkv, s), (hkv, s)))
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    mask[..., :used] = True
    if b > 1:
        mask[1, ..., :3] = False  # a hole at the start of the second row (left padding)
    for m in (mask, None):
        r = decode_attention_reference(q, k, v, m, d ** -0.5)
        for splits in (1, 3, 4):
            y = decode_attention(q, k, v, m, d ** -0.5, splits=splits)
            same = True
            if splits == 3:  # again: the counters were left at zero
                same = torch.equal(y, decode_attention(q, k, v, m, d ** -0.5, splits=splits))
            err = ((y.double() - r.double()).norm() / r.double().norm()).item()
            out[f"{b},{h},{hkv},{s},{d},{used},{m is None},{splits}"] = err if same else 1.0
print(json.dumps(out))
"""
# the rest in a second process beside the first (the interpreter runs on one core)
_MODEL_SCRIPT = r"""
import json, sys
import torch
from lowbit.kernels import triton_decode_attention as kernel
g = torch.Generator().manual_seed(1)
out = {}
# the attention implementation inside a Llama, dynamic cache, against SDPA
from transformers import LlamaConfig, LlamaForCausalLM
from lowbit.models.decode_attention import use_decode_attention
from lowbit.serve.generate import cache_arg
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 100, (1, 9), generator=g)
runs = []
for switch in (False, True):
    if switch:
        use_decode_attention(model)
    with torch.no_grad():
        o = model(ids, use_cache=True)
        past, t, logits = getattr(o, cache_arg(model)), ids[:, -1:], []
        for _ in range(5):
            o = model(t, **{cache_arg(model): past}, use_cache=True)
            past, t = getattr(o, cache_arg(model)), o.logits[:, -1:].argmax(-1)
            logits.append(o.logits)
    runs.append(torch.cat(logits))
out["model"] = (runs[0] - runs[1]).abs().max().item()
# one step of rotary embedding + cache write + attention, against its reference: output, caches and length
for b, h, hkv, s, d, used in json.loads(sys.argv[1]):
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g)
    turn = torch.rand(b, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([turn.cos()] * 2, -1), torch.cat([turn.sin()] * 2, -1)
    caches = torch.randn(2, b, hkv, s, d, generator=g)
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    mask[..., :used] = True  # the step's own position is used - 1
    for m in (mask, None):
        want = caches.clone()
        length = torch.tensor(used - 1)
        r = kernel.rope_cache_attention_reference(qkv, cos, sin, *want, length, m, d ** -0.5, h)
        for splits in (1, 3):
            got, lengths = caches.clone(), torch.tensor(used - 1)
            y = kernel.rope_cache_attention(qkv, cos, sin, *got, lengths, m, d ** -0.5, h, splits=splits)
            err = ((y.double() - r.double()).norm() / r.double().norm()).item()
            same = torch.equal(got, want) and int(lengths) == used - 1
            if splits == 3 and m is not None:  # again: the counters were left at zero
                got, lengths = caches.clone(), torch.tensor(used - 1)
                y2 = kernel.rope_cache_attention(qkv, cos, sin, *got, lengths, m, d ** -0.5, h, splits=splits)
                same = same and torch.equal(y, y2)
            out[f"step,{b},{h},{hkv},{s},{d},{used},{m is None},{splits}"] = err if same else 1.0
# inside a quantized Llama whose norms are folded: decode steps through the one kernel, against the unfolded model
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.algorithms.plans import uniform_plan
from lowbit.kernels import dispatch
from lowbit.models import decode_attention as attention, fused_norms
from lowbit.serve.fast_decode import StaticDecoder
dispatch._mode = "auto"  # the matmuls on the reference path (fast); the attention kernels still interpreted
attention.triton_runs = lambda x, kernel="": True
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval()
quantize_rtn(model, uniform_plan(model, "int4_g32_asym"), progress=False)
use_decode_attention(model)
calls = []
one_kernel = kernel.rope_cache_attention
kernel.rope_cache_attention = lambda *a, **k: calls.append(a[6] is None) or one_kernel(*a, **k)  # unmasked?
steps = []
for together in (True, False):
    dec = StaticDecoder(model, max_cache_len=16)
    fused_norms.fold_norms(model, attention=together)  # a CPU decoder leaves the attention step to transformers
    dec.prefill(ids[0].tolist())
    steps.append(torch.stack([dec.step().clone() for _ in range(4)]))
    if together:
        out["model_step_calls"] = len(calls)
        out["model_step_lengths"] = sorted({int(l.cumulative_length) for l in dec.cache.layers})
        # called outside the decoder (nothing defers the lengths): each layer's step advances its own
        from lowbit.serve.generate import cache_arg
        with torch.no_grad():
            model(input_ids=ids[:, :1], position_ids=torch.tensor([[ids.shape[1] + 4]]),
                  **{cache_arg(model): dec.cache}, use_cache=True)
        out["direct_step"] = [len(calls) - 8, sorted({int(l.cumulative_length) for l in dec.cache.layers})]
        out["unmasked"] = [calls[:8], calls[8:]]
out["model_step"] = (steps[0] - steps[1]).abs().max().item()
# fresh data at the same rows each call: a partial of an earlier launch is never combined; the counters end at zero
errs = []
for _ in range(3):
    qkv = torch.randn(1, 1, 12 * 32, generator=g)
    caches = torch.randn(2, 1, 4, 200, 32, generator=g)
    cs = torch.randn(2, 1, 1, 32, generator=g)
    r = kernel.rope_cache_attention_reference(qkv, *cs, *caches.clone(), torch.tensor(150), None, 0.2, 4)
    y = kernel.rope_cache_attention(qkv, *cs, *caches, torch.tensor(150), None, 0.2, 4, splits=3)
    errs.append(((y.double() - r.double()).norm() / r.double().norm()).item())
out["fresh"] = max(errs)
out["counters"] = kernel._counters(torch.device("cpu"), 4).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_scripts_in_interpreter([(_SCRIPT, (CASES,)), (_MODEL_SCRIPT, (STEP_CASES,))])


@pytest.mark.parametrize("case", CASES, ids=[",".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_kernel_in_interpreter_matches_reference(interpreter_results, case, masked, splits):
    """Each head split over 1, 3 or 4 programs (interleaved key blocks, combined by the last to finish): the same
    attention, and (3 splits) the same bits when called again."""
    assert interpreter_results[",".join(map(str, case)) + f",{not masked},{splits}"] < 1e-5


@pytest.mark.parametrize("case", STEP_CASES, ids=[",".join(map(str, c)) for c in STEP_CASES])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_rope_cache_step_in_interpreter_matches_reference(interpreter_results, case, masked, splits):
    """Rotary embedding, cache write and attention in one launch: the reference's output, the same caches, the
    length left to the caller, and the same bits when called again."""
    assert interpreter_results["step," + ",".join(map(str, case)) + f",{not masked},{splits}"] < 1e-5


def test_folded_llama_steps_through_the_one_kernel(interpreter_results):
    """A quantized Llama with fused q/k/v and folded norms: every decode step's attention is one rope_cache_attention
    launch per layer (2 layers x 4 steps), each layer's cache length moves on, and the logits are those of the same
    folded model with transformers' rotary embedding and cache update around lowbit's decode attention."""
    assert interpreter_results["model_step_calls"] == 8
    assert interpreter_results["model_step_lengths"] == [13]
    assert interpreter_results["model_step"] < 1e-4  # the new key is summed last
    # the decoder advances the lengths once after each step (defer_lengths); a model called on its own per layer
    assert interpreter_results["direct_step"] == [2, [14]]
    # the decoder's steps have no padding, so the kernel reads no mask (unmasked_steps); a model called on its own
    # passes its mask
    assert interpreter_results["unmasked"] == [[True] * 8, [False] * 2]


def test_rope_cache_reference_is_transformers_step():
    """The reference is transformers' apply_rotary_pos_emb, StaticLayer.update and SDPA, in float32."""
    from transformers.cache_utils import StaticLayer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lowbit.kernels.triton_decode_attention import rope_cache_attention_reference

    g = torch.Generator().manual_seed(3)
    b, h, hkv, d, s, pos = 2, 4, 2, 16, 10, 6
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g)
    turn = torch.rand(b, 1, d // 2, generator=g) * 6
    cos, sin = torch.cat([turn.cos()] * 2, -1), torch.cat([turn.sin()] * 2, -1)
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    mask[..., :pos + 1] = True
    layer = StaticLayer(max_cache_len=s)
    k0, v0 = torch.randn(b, hkv, pos, d, generator=g), torch.randn(b, hkv, pos, d, generator=g)
    layer.update(k0, v0)
    keys, values, length = layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()
    q, k, v = qkv.view(b, 1, h + 2 * hkv, d).transpose(1, 2).split([h, hkv, hkv], dim=1)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    kc, vc = layer.update(k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
    got = rope_cache_attention_reference(qkv, cos, sin, keys, values, length, mask, d ** -0.5, h)
    assert torch.allclose(got, want.transpose(1, 2).reshape(b, 1, h * d), atol=1e-5)
    assert torch.allclose(keys, kc) and torch.equal(values, vc) and int(length) + 1 == int(layer.cumulative_length)


def test_rope_cache_step_reads_only_the_written_positions():
    """Positions past the cache's length hold nothing of this sequence: the step attends to 0..length whatever
    the mask says about the rest (a causal mask hides them anyway)."""
    from lowbit.kernels.triton_decode_attention import rope_cache_attention_reference

    g = torch.Generator().manual_seed(5)
    b, h, hkv, s, d, pos = 1, 4, 2, 40, 16, 9
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g)
    cos, sin = torch.ones(b, 1, d), torch.zeros(b, 1, d)
    clean = torch.randn(2, b, hkv, s, d, generator=g)
    clean[..., pos + 1:, :] = 0.0
    stale = clean.clone()
    stale[..., pos + 1:, :] = float("nan")
    everything = torch.ones(b, 1, 1, s, dtype=torch.bool)
    causal = torch.arange(s).view(1, 1, 1, s) <= pos
    want = rope_cache_attention_reference(qkv, cos, sin, *clean, torch.tensor(pos), causal, d ** -0.5, h)
    for mask in (everything, None):
        got = rope_cache_attention_reference(qkv, cos, sin, *stale.clone(), torch.tensor(pos), mask, d ** -0.5, h)
        assert torch.allclose(got, want)


def test_rope_cache_step_refuses_qkv_rows_that_do_not_match_the_cache():
    from lowbit.kernels.triton_decode_attention import rope_cache_attention

    caches = torch.zeros(2, 1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"qkv \[B, 1, 128\]"):  # 4 heads + 2 x 2 kv heads of 16
        rope_cache_attention(torch.zeros(1, 1, 96), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), *caches,
                             torch.tensor(3), None, 0.25, heads=4)
    assert caches.eq(0).all()


def test_combined_partials_are_this_launchs(interpreter_results):
    """Three launches on fresh data at the same rows: each gives its own attention, and leaves the counters at
    zero for the next."""
    assert interpreter_results["fresh"] < 1e-5
    assert interpreter_results["counters"] == [0] * 4


def test_splits_fill_the_gpu_without_idle_programs():
    from lowbit.kernels.triton_decode_attention import BLOCK, MAX_SPLITS, default_splits

    assert default_splits(1, 32, 144, sms=132) == 3  # one program per block of keys: 3 blocks of 64
    assert default_splits(1, 32, 4096, sms=132) == 9  # 32 x 9 = 288 programs, about two per SM
    assert default_splits(1, 32, 1 << 20, sms=4096) == MAX_SPLITS
    assert default_splits(64, 32, 4096, sms=132) == 1  # a large batch fills the GPU by itself
    assert default_splits(1, 8, BLOCK, sms=132) == 1
    assert default_splits(1, 32, 144, sms=132, block=32) == 5  # blocks of 32 keys: 5 of them


def test_llama_decode_with_lowbit_attention_matches_sdpa(interpreter_results):
    assert interpreter_results["model"] < 1e-5


def test_reference_is_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 32, generator=g), torch.randn(2, 2, 50, 32, generator=g), torch.randn(2, 2, 50, 32,
                                                                                                      generator=g)
    mask = torch.rand(2, 1, 1, 50, generator=g) > 0.3
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            enable_gqa=True)
    assert torch.allclose(decode_attention_reference(q, k, v, mask, 32 ** -0.5).double(), want, atol=1e-6)
    none = torch.zeros_like(mask)
    assert torch.equal(decode_attention_reference(q, k, v, none, 1.0), torch.zeros_like(q))


def test_supported_shapes():
    q, k = torch.zeros(1, 8, 1, 128), torch.zeros(1, 2, 40, 128)
    assert supported(q, k, None) == _triton()
    assert not supported(torch.zeros(1, 8, 2, 128), k, None)  # prefill
    assert not supported(torch.zeros(1, 8, 1, 96), torch.zeros(1, 2, 40, 96), None)  # head size not a power of 2
    assert not supported(q, k, torch.zeros(1, 1, 1, 40))  # additive float mask


def _triton() -> bool:
    from lowbit.kernels.dispatch import triton_available

    return triton_available()


def test_only_sdpa_models_are_switched():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama() -> LlamaForCausalLM:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2)
        return LlamaForCausalLM(cfg).eval()

    eager = llama()
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"
    model, sdpa = llama(), llama()
    assert sdpa.config._attn_implementation == "sdpa"
    assert use_decode_attention(model) and model.config._attn_implementation == NAME
    assert use_decode_attention(model)  # again: nothing to do
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():  # on CPU every call goes to SDPA: the same logits
        assert torch.equal(model(ids).logits, sdpa(ids).logits)


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not _triton(), reason="needs CUDA and triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[",".join(map(str, c)) for c in CASES])
def test_kernel_on_gpu_matches_reference(case):
    from lowbit.kernels.triton_decode_attention import decode_attention

    b, h, hkv, s, d, used = case
    g = torch.Generator("cuda").manual_seed(2)
    q, k, v = (torch.randn(b, n, t, d, generator=g, device="cuda", dtype=torch.float16)
               for n, t in ((h, 1), (hkv, s), (hkv, s)))
    k[:, :, used:] = float("nan")  # positions never written: the kernel must not read them
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device="cuda")
    mask[..., :used] = True
    r = decode_attention_reference(q, k.nan_to_num(0.0), v, mask, d ** -0.5)
    for splits in (None, 1, 3):
        y = decode_attention(q, k, v, mask, d ** -0.5, splits=splits)
        assert torch.isfinite(y).all()
        assert float((y.double() - r.double()).norm() / r.double().norm()) < 2e-3
        assert torch.equal(decode_attention(q, k, v, mask, d ** -0.5, splits=splits), y)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[",".join(map(str, c)) for c in CASES])
def test_rope_cache_step_on_gpu_matches_reference(case):
    """fp16 on the GPU, with NaN in every cache position from the step's own on: the kernel writes that one and
    reads none of them."""
    from lowbit.kernels.triton_decode_attention import rope_cache_attention, rope_cache_attention_reference

    b, h, hkv, s, d, used = case
    g = torch.Generator("cuda").manual_seed(4)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g, device="cuda", dtype=torch.float16)
    turn = torch.rand(b, 1, d // 2, generator=g, device="cuda") * 6
    cos, sin = (torch.cat([f(turn)] * 2, -1).half() for f in (torch.cos, torch.sin))
    caches = torch.randn(2, b, hkv, s, d, generator=g, device="cuda", dtype=torch.float16)
    caches[..., used - 1:, :] = float("nan")
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device="cuda")
    mask[..., :used] = True
    want = caches.nan_to_num(0.0)
    length = torch.tensor(used - 1, device="cuda")
    r = rope_cache_attention_reference(qkv, cos, sin, *want, length, mask, d ** -0.5, h)
    for splits in (None, 1, 3):
        got, length = caches.clone(), torch.tensor(used - 1, device="cuda")
        y = rope_cache_attention(qkv, cos, sin, *got, length, mask, d ** -0.5, h, splits=splits)
        assert torch.isfinite(y).all() and int(length) == used - 1
        assert float((y.double() - r.double()).norm() / r.double().norm()) < 2e-3
        written = got[..., used - 1, :]
        assert torch.allclose(written.float(), want[..., used - 1, :].float(), atol=2e-3)  # rotated in fp32 both
        assert torch.equal(got[..., :used - 1, :], caches[..., :used - 1, :])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_fused_attention_step_gives_the_unfused_tokens(compile):
    """A quantized fp16 Llama decoded with the one-kernel attention step and without: the same greedy tokens and
    nearly the same logits, compiled and captured as a CUDA graph or not."""
    from lowbit.serve.fast_decode import StaticDecoder
    from test_fast_decode import PROMPT
    from test_fused_linears import quantized

    model = quantized("q4_0").cuda().half()
    runs = []
    for fuse in (True, False):
        dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 24, compile=compile, fuse_attention=fuse)
        assert dec.fuse_attention == fuse and dec.folded_layers == 2
        dec.prefill(PROMPT)
        logits = [dec.step().clone() for _ in range(20)]
        runs.append((torch.stack(logits), dec.tokens()))
    torch._dynamo.reset()
    assert torch.equal(runs[0][1], runs[1][1])
    scale = runs[1][0].abs().max()
    assert float((runs[0][0] - runs[1][0]).abs().max()) < 0.02 * float(scale)


@gpu
@pytest.mark.gpu
def test_combined_partials_on_gpu_are_this_launchs():
    """Launch after launch at the same rows, fresh queries and lengths that give 2-4 programs with keys: every
    output is its own launch's attention (the combining program reads this launch's partials, never an earlier
    launch's), and the counters are at zero afterwards."""
    from lowbit.kernels import triton_decode_attention as kernel

    g = torch.Generator("cuda").manual_seed(5)
    caches = torch.randn(2, 1, 32, 256, 128, generator=g, device="cuda", dtype=torch.float16)
    cos, sin = torch.randn(2, 1, 1, 128, generator=g, device="cuda", dtype=torch.float16)
    worst = 0.0
    for i in range(200):
        qkv = torch.randn(1, 1, 96 * 128, generator=g, device="cuda", dtype=torch.float16)
        length = torch.tensor(64 + (i * 37) % 192, device="cuda")
        want = kernel.rope_cache_attention_reference(qkv, cos, sin, *caches.clone(), length, None, 0.1, 32)
        y = kernel.rope_cache_attention(qkv, cos, sin, *caches, length, None, 0.1, 32, splits=4)
        worst = max(worst, float((y.double() - want.double()).norm() / want.double().norm()))
    assert worst < 2e-3
    assert int(kernel._counters(torch.device("cuda", torch.cuda.current_device()), 32).abs().max()) == 0
