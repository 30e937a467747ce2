"""A decoder layer's RMSNorms and residual adds inside its matmuls (lowbit.models.fused_norms): same function."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import dispatch
from lowbit.kernels.reference import dequant_matmul_reference, rms_norm_reference
from lowbit.models.fused_linears import fuse_siblings, unfuse_siblings
from lowbit.models.fused_norms import fold_norms, foldable, unfold_norms
from lowbit.models.walker import decoder_layers
from lowbit.serve.fast_decode import StaticDecoder
from test_fast_decode import PROMPT, reference_greedy
from test_fused_linears import IDS, compiled_counts, logits, quantized


def test_rms_norm_reference_is_transformers_llama_norm() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).half()
    norm.weight.data = (1 + 0.3 * torch.randn(64)).half()
    x = (torch.randn(3, 5, 64) * 40).half()
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("fmt,rotate", [("int4_g32_asym", False), ("q4_0", False), ("int2_g16_sym", False),
                                        ("e8p_ch", False), ("int4_g32_sym", True), ("e8p_ch", True),
                                        ("int4_g32_sym", "both"), ("e8p_ch", "both")])
def test_folded_layers_compute_the_same_logits(fmt: str, rotate: bool | str) -> None:
    """Gated groups normalize in their GEMV's prologue; rotated (``+rht``, input sides or, as older checkpoints,
    both) and vector-format groups normalize before their input rotation and multiply SiLU(gate) by up after their
    matmul: either way the layer's function."""
    model = quantized(fmt, rotate=rotate)
    ref = logits(model, IDS)
    assert fold_norms(model) == 0  # q/k/v and gate/up must be fused groups first
    fuse_siblings(model)
    assert fold_norms(model) == len(decoder_layers(model))
    assert fold_norms(model) == 0  # already folded
    layer = decoder_layers(model)[0]
    h = torch.randn(1, 3, 64)
    assert layer.input_layernorm(h) is h and layer.self_attn.o_proj(h) is h  # the groups and the layer apply them
    assert torch.equal(logits(model, IDS), ref)
    assert unfold_norms(model) == len(decoder_layers(model))
    assert not torch.equal(layer.input_layernorm(h), h)
    assert torch.equal(logits(model, IDS), ref)
    fold_norms(model)
    assert unfuse_siblings(model) == 4  # the layers unfold themselves at their next call
    assert torch.equal(logits(model, IDS), ref)
    assert not foldable(layer) and unfold_norms(model) == 0


def test_a_layer_whose_linear_was_replaced_unfolds_itself_and_refolds() -> None:
    """Replacing a folded layer's o_proj (quantizing again, say) breaks the fold: the layer restores its norms and
    runs the class's forward, and fold_norms folds it anew with the new linear."""
    from lowbit.models.quant_linear import QuantLinear

    model = quantized()
    ref = logits(model, IDS)
    fuse_siblings(model)
    fold_norms(model)
    layer = decoder_layers(model)[0]
    layer.self_attn.o_proj = QuantLinear.from_quantized(layer.self_attn.o_proj.quantized())
    assert torch.equal(logits(model, IDS), ref)
    assert foldable(layer) and not foldable(decoder_layers(model)[1])
    assert fold_norms(model) == 1
    assert torch.equal(logits(model, IDS), ref)


@pytest.mark.parametrize("why", ["bias", "weight cache"])
def test_layers_that_cannot_fold_keep_their_forward(why: str) -> None:
    """o_proj with a bias (the residual would be added before it), a weight cache (its matmul has no prologue):
    not folded, and the model is unchanged."""
    model = quantized(bias=why == "bias")
    if why == "weight cache":
        decoder_layers(model)[0].mlp.down_proj.cache_weight()
    ref = logits(model, IDS)
    fuse_siblings(model)
    assert fold_norms(model) == (1 if why == "weight cache" else 0)
    assert torch.allclose(logits(model, IDS), ref, atol=1e-5, rtol=1e-5)


def test_compiled_folded_model_puts_the_norms_into_the_matmuls() -> None:
    """Under torch.compile each layer is four lowbit ops and no norm of its own: the only rsqrt left in the graph is
    the final norm's."""
    model = quantized()
    ref = logits(model, IDS)
    fuse_siblings(model)
    fold_norms(model)
    out, seen = compiled_counts(model, "qmatmul", "rsqrt")
    assert torch.equal(out, ref)
    assert seen == [(4 * len(decoder_layers(model)), 1)]


def test_dispatch_normalizes_and_adds_around_other_kernels() -> None:
    """Off the CUDA GEMV (here the reference), ``norm`` and ``residual`` are the model's own norm and add."""
    from lowbit.formats import get_format

    torch.manual_seed(1)
    fmt = get_format("q4_0")
    qt = fmt.quantize(torch.randn(48, 64) * 0.02)
    x, w, res = torch.randn(2, 64) * 30, 1 + 0.2 * torch.randn(64), torch.randn(2, 48)
    want = res + dequant_matmul_reference(rms_norm_reference(x, w, 1e-6), fmt, qt)
    assert torch.equal(dispatch.dequant_matmul(x, fmt, qt, norm=(w, 1e-6), residual=res), want)


def test_static_decoder_folds_and_keeps_tokens() -> None:
    model = quantized("int4_g32_sym")
    want = reference_greedy(model, PROMPT, 12)
    dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 12)
    assert dec.folded_layers == len(decoder_layers(model))
    assert dec.generate_greedy(PROMPT, 12).tolist() == want
    unfuse_siblings(model)
    assert StaticDecoder(model, max_cache_len=8, fold_norms=False).folded_layers == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_rotated_layers_hand_the_next_layer_its_input(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folded layer rotated on both sides (older ``+rht`` checkpoints): its last junction (output side undone,
    residual, norm) also computes the next layer's rotated q/k/v input, and the next layer uses it instead of
    normalizing and rotating again (under torch.compile too: one RMSNorm fewer in the graph); the logits are the
    unfolded model's."""
    from lowbit.models.fused_linears import FusedGroup

    model = quantized("int4_g32_sym", rotate="both")
    ref = logits(model, IDS)
    fuse_siblings(model)
    fold_norms(model)
    layers = decoder_layers(model)
    assert [layer._lowbit_fold.next for layer in layers] == [layers[1]._lowbit_fold.qkv, None]
    taken: list[bool] = []
    real = FusedGroup._take_prepared

    def spy(self: FusedGroup, x: torch.Tensor) -> torch.Tensor | None:
        out = real(self, x)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(FusedGroup, "_take_prepared", spy)
    if not compiled:
        assert torch.equal(logits(model, IDS), ref)
        assert taken == [False, True]
        return
    out, norms = compiled_counts(model, "rsqrt")
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert norms == [(2 * len(layers) + 1,)]  # two per layer and the final one: none computed twice


def test_input_side_rotated_layers_add_the_residual_inside_and_undo_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A folded layer rotated as lowbit rotates now (input sides only): o and down add the residual inside their
    matmuls (the GEMV's epilogue) after their input side, each group normalizes and rotates its input in one step
    (:func:`dispatch.norm_rotated`), and no output-side transform runs; the logits are the unfolded model's."""
    from lowbit.models import fused_linears, quant_linear

    model = quantized("int4_g32_sym", rotate=True)
    ref = logits(model, IDS)
    fuse_siblings(model)
    assert fold_norms(model) == len(decoder_layers(model))
    assert not any(layer._lowbit_fold.rotated for layer in decoder_layers(model))
    calls: dict[str, int] = {"residual inside": 0, "norm_rotated": 0, "output side": 0}
    real_matmul, real_norm_rotated = dispatch.dequant_matmul, dispatch.norm_rotated

    def matmul(x, fmt, qt, norm=None, residual=None):  # noqa: ANN001, ANN202
        calls["residual inside"] += residual is not None
        return real_matmul(x, fmt, qt, norm, residual)

    def norm_rotated(h, norm, v):  # noqa: ANN001, ANN202
        calls["norm_rotated"] += norm is not None  # (o's and down's input sides come without a norm)
        return real_norm_rotated(h, norm, v)

    def output_side(*args):  # noqa: ANN002, ANN202
        calls["output side"] += 1
        raise AssertionError("no output side to undo")

    monkeypatch.setattr(quant_linear, "dequant_matmul", matmul)
    for module in (quant_linear, fused_linears):
        monkeypatch.setattr(module, "norm_rotated", norm_rotated)
    monkeypatch.setattr(quant_linear, "rotate_output", output_side)
    monkeypatch.setattr(fused_linears, "rotate_outputs", output_side)
    assert torch.allclose(logits(model, IDS), ref, atol=1e-5, rtol=1e-5)
    n = len(decoder_layers(model))
    assert calls == {"residual inside": 2 * n, "norm_rotated": 2 * n, "output side": 0}


def test_rotated_vector_format_layers_take_the_silu_product_and_downs_input_side_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A folded e8p_ch+rht layer (gate/up not gated: a vector format) computes silu(gate) * up and down's input side
    in one call (:func:`dispatch.silu_mul_rotated`, one kernel where one runs) and gives the unfolded logits."""
    from lowbit.models import fused_norms

    model = quantized("e8p_ch", rotate=True)
    ref = logits(model, IDS)
    fuse_siblings(model)
    assert fold_norms(model) == len(decoder_layers(model))
    seen = []
    real = fused_norms.silu_mul_rotated
    monkeypatch.setattr(fused_norms, "silu_mul_rotated", lambda gu, v: seen.append((gu.shape[-1], v.n)) or real(gu, v))
    assert torch.equal(logits(model, IDS), ref)
    down = decoder_layers(model)[0].mlp.down_proj
    assert seen == [(2 * down.in_features, down.in_features)] * len(decoder_layers(model))
    x = torch.randn(1, down.in_features)
    assert torch.equal(down.project(down._v.apply(x), rotated=True), down(x))  # the input side already applied
    with pytest.raises(ValueError, match="no norm"):
        down.project(x, norm=(torch.ones(down.in_features), 1e-5), rotated=True)
