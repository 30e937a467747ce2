"""q/k/v and gate/up as one packed matmul (lowbit.models.fused_linears): same outputs, same state, one op each."""

from __future__ import annotations

import pytest
import torch

from lowbit.models.fused_linears import SIBLINGS, fuse_siblings, unfuse_siblings
from lowbit.models.walker import decoder_layers
from lowbit.serve.fast_decode import StaticDecoder
from test_fast_decode import PROMPT, reference_greedy, rtn_rotated, tiny_llama


def quantized(fmt: str = "int4_g32_asym", bias: bool = False, seed: int = 0, rotate: bool | str = False):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # nn.Linear biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)
    rtn_rotated(model, fmt, rotate)  # rotate: True, or "both" sides as older checkpoints
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([PROMPT + [11, 250, 8]])


@pytest.mark.parametrize(("fmt", "bias"), [("int4_g32_asym", False), ("q4_0", True), ("int2_g16_sym", False)])
def test_fused_outputs_and_state_equal_unfused(fmt, bias):
    model = quantized(fmt, bias)
    ref = logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_siblings(model) == 2 * len(SIBLINGS)
    assert torch.equal(logits(model, IDS), ref)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    attn = decoder_layers(model)[0].self_attn
    group, _ = attn.q_proj._fused
    assert attn.v_proj._fused[0] is group
    assert attn.k_proj.codes.untyped_storage().data_ptr() == group.linear.codes.untyped_storage().data_ptr()
    assert fuse_siblings(model) == 0  # already fused
    assert unfuse_siblings(model) == 2 * len(SIBLINGS)
    assert attn.k_proj._fused is None
    assert attn.k_proj.codes.untyped_storage().data_ptr() != group.linear.codes.untyped_storage().data_ptr()
    assert torch.equal(logits(model, IDS), ref)


def test_gate_and_up_run_as_one_gated_matmul():
    """A Llama MLP with gate/up fused runs silu(gate) * up through the group (one GEMV with the product in its
    epilogue on CUDA; the reference path here): the same outputs, and the class's forward back once unfused."""
    model = quantized("int4_g32_asym")
    ref = logits(model, IDS)
    fuse_siblings(model)
    mlp = decoder_layers(model)[0].mlp
    assert "forward" in vars(mlp)
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), want)
    assert torch.equal(logits(model, IDS), ref)
    with torch.no_grad():
        mlp.up_proj.scale = mlp.up_proj.scale * 2  # reassigned: the MLP falls back to its class's forward
        assert torch.equal(mlp(x), mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
        mlp.up_proj.scale = mlp.up_proj.scale / 2
    unfuse_siblings(model)
    assert "forward" not in vars(mlp)
    assert torch.equal(logits(model, IDS), ref)


def test_gated_mlp_with_its_linears_replaced_runs_the_class_forward():
    """Swapping the quantized gate/up back for float linears (as benchmarks do between variants) leaves the MLP's
    gated forward in place: it must run the class's forward then, not look for a fused group on nn.Linear."""
    model = quantized("int4_g32_asym")
    fuse_siblings(model)
    mlp = decoder_layers(model)[0].mlp
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, torch.nn.Linear(64, 128, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(mlp(x), type(mlp).forward(mlp, x))


@pytest.mark.parametrize(("bias", "rotate"), [(True, False), (True, True), (False, "both")])
def test_mlps_with_biases_or_output_sides_keep_their_forward(bias, rotate):
    model = quantized("int4_g32_asym", bias=bias, rotate=rotate)
    ref = logits(model, IDS)
    assert fuse_siblings(model) == 2 * len(SIBLINGS)
    assert "forward" not in vars(decoder_layers(model)[0].mlp)
    assert torch.allclose(logits(model, IDS), ref, atol=1e-5, rtol=1e-5)


def test_mlps_rotated_on_input_sides_run_gated():
    """Gate and up rotated on their (shared) input side only: one gated matmul after the input side."""
    model = quantized("int4_g32_asym", rotate=True)
    ref = logits(model, IDS)
    fuse_siblings(model)
    assert "forward" in vars(decoder_layers(model)[0].mlp)
    assert torch.allclose(logits(model, IDS), ref, atol=1e-5, rtol=1e-5)


def test_members_without_a_bias_fuse_with_members_that_have_one():
    model = quantized("int4_g32_asym", bias=True)
    attn = decoder_layers(model)[0].self_attn
    attn.q_proj.bias = None  # the first member has none: the fused bias takes zeros there
    ref = logits(model, IDS)
    assert fuse_siblings(model) == 2 * len(SIBLINGS)
    assert torch.equal(logits(model, IDS), ref)


def test_members_write_through_and_fall_back_when_detached():
    model = quantized()
    fuse_siblings(model)
    attn = decoder_layers(model)[1].self_attn
    x = torch.randn(3, 64)
    with torch.no_grad():
        attn.k_proj.codes.bitwise_xor_(0x11)  # in place: the fused weight sees it
        fused_k = attn.k_proj(x)
        attn.q_proj(x)
        assert torch.equal(attn.k_proj(x), fused_k)  # read from the group
        attn.v_proj.scale = attn.v_proj.scale * 2  # reassigned: v computes on its own
        assert not attn.v_proj._fused[0].intact(2)
        own_v = attn.v_proj(x)
        unfuse_siblings(model)
        assert torch.equal(attn.k_proj(x), fused_k)
        assert torch.equal(attn.v_proj(x), own_v)


def test_siblings_called_out_of_order_are_still_right():
    model = quantized()
    mlp = decoder_layers(model)[0].mlp
    x = torch.randn(2, 5, 64)
    x2 = x + 1
    with torch.no_grad():
        up, gate, up2 = mlp.up_proj(x), mlp.gate_proj(x), mlp.up_proj(x2)
        fuse_siblings(model)
        assert torch.equal(mlp.up_proj(x), up)  # before gate: computes the group
        assert torch.equal(mlp.gate_proj(x), gate)
        assert torch.equal(mlp.up_proj(x2), up2)  # a new input is never served from the last one


@pytest.mark.parametrize("rotate", [True, "both"])
@pytest.mark.parametrize("bias", [False, True])
def test_rotated_siblings_share_their_input_rotation_and_fuse(bias, rotate):
    """+rht siblings (q/k/v, gate/up) share the input-side seed; lowbit gives them no output side, checkpoints from
    before carry one each. Fused, the input is rotated once and each member adds its bias on its slice (and undoes
    its own output side: gate and up, of one size, in one call)."""
    model = quantized("int4_g32_asym", bias, rotate=rotate)
    attn = decoder_layers(model)[0].self_attn
    seeds = [(m.rotation.seed_in, m.rotation.seed_out) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert len({s_in for s_in, _ in seeds}) == 1
    outs = [s_out for _, s_out in seeds]
    if rotate is True:
        assert outs == [None] * 3
    else:
        assert len(set(outs)) == 3
    assert decoder_layers(model)[0].mlp.down_proj.rotation.seed_in != seeds[0][0]
    ref = logits(model, IDS)
    assert fuse_siblings(model) == 2 * len(SIBLINGS)
    assert torch.allclose(logits(model, IDS), ref, atol=1e-5, rtol=1e-5)
    assert attn.q_proj._fused[0].linear.rotation is None  # the group rotates with q_proj's transform
    mlp = decoder_layers(model)[0].mlp
    assert mlp.gate_proj._fused[0].stacked_out is (rotate == "both")


def test_not_fused_across_formats_rotations_or_caches():
    from lowbit.rotations.incoherence import Rotation

    model = quantized(rotate=True)
    attn = decoder_layers(model)[0].self_attn
    attn.k_proj.rotation = Rotation(attn.k_proj.rotation.seed_in + 1, None)  # per-linear seeds, as before sharing
    assert fuse_siblings(model) == 2 * len(SIBLINGS) - 1
    model = quantized()
    decoder_layers(model)[0].mlp.up_proj.cache_weight()
    assert fuse_siblings(model) == 2 * len(SIBLINGS) - 1
    from torch import nn
    plain = tiny_llama()
    assert fuse_siblings(plain) == 0  # nn.Linear: nothing to fuse
    assert fuse_siblings(nn.Linear(4, 4)) == 0


@pytest.mark.parametrize("rotate", [False, True, "both"])
def test_compiled_model_runs_one_matmul_per_group(rotate):
    model = quantized(rotate=rotate)
    ref = logits(model, IDS)
    fuse_siblings(model)
    out, counts = compiled_counts(model, "qmatmul")
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) if rotate else torch.equal(out, ref)
    # per layer: q/k/v and gate/up one op each, o_proj and down_proj their own
    assert counts == [(len(decoder_layers(model)) * (len(SIBLINGS) + 2),)]


def compiled_counts(model, *needles: str) -> tuple[torch.Tensor, list[tuple[int, ...]]]:  # noqa: ANN001
    """The logits of ``model`` on IDS compiled as one graph, and per graph how many of its nodes' targets contain
    each of ``needles``."""
    counts: list[tuple[int, ...]] = []

    def backend(gm, inputs):  # noqa: ANN001, ANN202
        targets = [str(n.target) for n in gm.graph.nodes]
        counts.append(tuple(sum(needle in t for t in targets) for needle in needles))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(IDS).logits
    torch._dynamo.reset()
    return out, counts


def test_static_decoder_fuses_and_keeps_tokens():
    model = quantized("int4_g32_sym", bias=True)
    want = reference_greedy(model, PROMPT, 12)
    dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 12)
    assert dec.fused_groups == 2 * len(SIBLINGS)
    assert dec.generate_greedy(PROMPT, 12).tolist() == want
    unfuse_siblings(model)
    assert StaticDecoder(model, max_cache_len=8, fuse=False).fused_groups == 0
