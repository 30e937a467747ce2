import copy

import pytest
import torch

from conftest import make_model
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.errors import LowbitError
from lowbit.eval.simulate import SimConfig, fake_quant_kv, fake_quant_per_token, simulate
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears
from lowbit.recipe import Variant, split_sim


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_fake_quant_grid_and_error(bits):
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(bits)) * torch.rand(3, 7, 1) * 5
    q = fake_quant_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the per-token grid
    assert levels.abs().max() <= qmax + 1e-4
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()
    assert torch.allclose(fake_quant_per_token(q, bits), q, atol=1e-5)  # idempotent


def test_kv_rotation_quantizes_in_hadamard_basis():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 5, 64, generator=g)
    k[..., 3] += 20  # an outlier channel: the rotation spreads it
    q = torch.randn(2, 3, 5, 64, generator=g)
    err_plain = (fake_quant_kv(k, 4, rotate=False) - k).pow(2).mean()
    err_rot = (fake_quant_kv(k, 4, rotate=True) - k).pow(2).mean()
    assert err_rot < 0.5 * err_plain
    # 8 bits: scores barely move either way
    scores = q @ k.transpose(-1, -2)
    assert torch.allclose(q @ fake_quant_kv(k, 8, rotate=True).transpose(-1, -2), scores, atol=0.05 * scores.std())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "opt"])
def test_simulation_runs_and_scales_with_bits(arch):
    model = make_model(arch)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    base = model(ids).logits
    diffs = {}
    for bits in (8, 3):
        m = simulate(copy.deepcopy(model), SimConfig(act_bits=bits, kv_bits=bits))
        diffs[bits] = (m(ids).logits - base).abs().mean().item()
    assert 0 < diffs[8] < diffs[3]


def test_kv_sim_sees_keys_after_rope(monkeypatch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import lowbit.eval.simulate as sim

    model = make_model("llama")
    seen = []
    monkeypatch.setattr(sim, "fake_quant_kv", lambda x, bits, rotate: seen.append(x) or x)
    simulate(model, SimConfig(kv_bits=4))
    layer0 = model.model.layers[0]
    inputs = {}
    layer0.self_attn.register_forward_pre_hook(lambda m, a, kw: inputs.update(kw), with_kwargs=True)
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(2))
    model(ids)
    h = inputs["hidden_states"]
    attn = layer0.self_attn
    k = attn.k_proj(h).view(1, 10, -1, attn.head_dim).transpose(1, 2)
    cos, sin = inputs["position_embeddings"]
    _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(seen[0], k_rot, atol=1e-5)  # the first call is layer 0's keys, rotated by RoPE
    assert not torch.allclose(seen[0], k, atol=1e-3)


def test_activation_rounding_follows_the_online_rotation():
    model = make_model("llama")
    quantize_rtn(model, uniform_plan(model, "int4_g32_sym"), progress=False, rotate=True)
    simulate(model, SimConfig(act_bits=4))
    q: QuantLinear = next(iter(decoder_linears(model).values()))
    x = torch.randn(2, 5, q.in_features, generator=torch.Generator().manual_seed(3))
    w = q.fmt.dequantize(q.quantized())
    assert q._u is None  # lowbit rotates input sides only
    expected = torch.nn.functional.linear(fake_quant_per_token(q._v.apply(x), 4), w)
    assert torch.allclose(q(x), expected, atol=1e-5)


def test_variant_suffixes():
    assert split_sim("gptq+rht:nz2_ch+a4+kv4") == ("gptq+rht:nz2_ch", SimConfig(act_bits=4, kv_bits=4))
    assert split_sim("int3_g128_sym+a4") == ("int3_g128_sym", SimConfig(act_bits=4))
    assert split_sim("fp16+kv4")[1].label() == "kv4"
    v = Variant.parse("rtn+rht:nz2_ch/int4_g128_sym@4L+a4")
    assert (str(v.recipe), v.sim) == ("rtn+rht:nz2_ch/int4_g128_sym@4L", SimConfig(act_bits=4))
    with pytest.raises(LowbitError):
        SimConfig(act_bits=1)
