"""One-token decode attention (lowbit.kernels.triton_decode_attention) against its float64 reference, and the
"lowbit_decode" attention implementation (lowbit.models.decode_attention) against transformers' SDPA: under
Triton's interpreter on CPU (one subprocess) and on CUDA when there is a GPU."""

import pytest
import torch

from conftest import run_in_interpreter
from lowbit.kernels.triton_decode_attention import decode_attention_reference, supported
from lowbit.models.decode_attention import NAME, use_decode_attention

# (batch, heads, kv heads, cache length, head dim, visible positions): GQA, MQA, a tail block, one visible key
CASES = [(1, 4, 2, 100, 64, 37), (2, 8, 8, 130, 128, 130), (1, 4, 1, 64, 16, 1), (2, 6, 2, 200, 32, 70)]

_SCRIPT = r"""
import json, sys
import torch
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
            again = decode_attention(q, k, v, m, d ** -0.5, splits=splits)  # the counters were left at zero
            err = ((y.double() - r.double()).norm() / r.double().norm()).item()
            out[f"{b},{h},{hkv},{s},{d},{used},{m is None},{splits}"] = err if torch.equal(y, again) else 1.0
# the attention implementation inside a Llama, dynamic cache, against SDPA
from transformers import LlamaConfig, LlamaForCausalLM
from lowbit.models.decode_attention import use_decode_attention
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
        past, t, logits = o.past_key_values, ids[:, -1:], []
        for _ in range(5):
            o = model(t, past_key_values=past, use_cache=True)
            past, t = o.past_key_values, o.logits[:, -1:].argmax(-1)
            logits.append(o.logits)
    runs.append(torch.cat(logits))
out["model"] = (runs[0] - runs[1]).abs().max().item()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES)


@pytest.mark.parametrize("case", CASES, ids=[",".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_kernel_in_interpreter_matches_reference(interpreter_results, case, masked, splits):
    """Each head split over 1, 3 or 4 programs (interleaved key blocks, combined by the last to finish): the same
    attention, and the same bits when called again."""
    assert interpreter_results[",".join(map(str, case)) + f",{not masked},{splits}"] < 1e-5


def test_splits_fill_the_gpu_without_idle_programs():
    from lowbit.kernels.triton_decode_attention import BLOCK, MAX_SPLITS, default_splits

    assert default_splits(1, 32, 144, sms=132) == 3  # one program per block of keys: 3 blocks of 64
    assert default_splits(1, 32, 4096, sms=132) == 9  # 32 x 9 = 288 programs, about two per SM
    assert default_splits(1, 32, 1 << 20, sms=4096) == MAX_SPLITS
    assert default_splits(64, 32, 4096, sms=132) == 1  # a large batch fills the GPU by itself
    assert default_splits(1, 8, BLOCK, sms=132) == 1


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
