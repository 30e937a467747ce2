"""Fused rotation: folding norms and a randomized Hadamard into the weights leaves the model's function intact."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from lowbit.errors import UnsupportedModelError
from lowbit.models.fused_rotation import fold_layer_norms, fuse_rotation


def _spiky(arch: str, tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny model with non-trivial norm scales, biases, and an outlier feature in the residual stream."""
    model = make_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.model.embed_tokens.weight[:, 5] *= 30  # an outlier channel, as real LLMs have
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_function_is_unchanged(arch, tied):
    model = _spiky(arch, tied)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    fuse_rotation(model, seed=3)
    after = _logits(model, ids)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


def test_folding_the_layer_norms_alone_keeps_the_function():
    model = _spiky("llama")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    g = model.model.layers[0].input_layernorm.weight.detach().clone()
    fold_layer_norms(model)
    assert (_logits(model, ids) - before).abs().max() < 1e-4 * before.abs().max()
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q * g)
    layers = [n for n, p in model.named_parameters() if n.endswith("layernorm.weight")]
    assert layers and all(torch.equal(model.get_parameter(n), torch.ones_like(model.get_parameter(n))) for n in layers)
    assert not torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))  # the final norm stays


def test_rotation_spreads_outlier_features():
    model = _spiky("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 7] *= 40  # one input column far larger than the rest

    def peak(w):  # max |w| over its root mean square: large when a few entries dominate
        w = w.detach()
        return float(w.abs().max() / w.pow(2).mean().sqrt())

    q = model.model.layers[0].self_attn.q_proj
    before = peak(q.weight)
    fuse_rotation(model)
    assert peak(q.weight) < before / 4


def test_seeds_give_different_rotations_and_are_deterministic():
    a, b, c = (fuse_rotation(_spiky("llama"), seed=s) for s in (0, 0, 1))
    wa, wb, wc = (m.model.layers[1].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.allclose(wa, wc)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox"])
def test_layernorm_models_are_refused(arch):
    with pytest.raises(UnsupportedModelError, match="RMSNorm"):
        fuse_rotation(make_model(arch))


def test_method_suffixes():
    from lowbit.errors import LowbitError
    from lowbit.recipe import Recipe

    spec = lambda s: (lambda r: (r.method, r.rotate, r.fuse_rotation, r.finetune is not None))(Recipe.parse(s))
    assert spec("gptq+fused+rht:q4_0") == ("gptq", True, True, False)
    assert spec("rtn+rht:q4_0") == ("rtn", True, False, False)
    assert spec("imatrix+fused:q4_0") == ("imatrix", False, True, False)
    assert str(Recipe.parse("gptq+rht+fused:iq2_xxs")) == "gptq+rht+fused:iq2_xxs"
    with pytest.raises(LowbitError, match="unknown method"):
        Recipe.parse("gptq+spin:q4_0")


def test_fused_quantization_runs_through_the_pipeline():
    from lowbit.api import quantize
    from lowbit.models.walker import round_to_storage
    from lowbit.recipe import Recipe

    model = round_to_storage(_spiky("llama"))
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    quantize(model, Recipe("q8_0", fuse_rotation=True), progress=False)
    assert (_logits(model, ids) - before).abs().max() < 0.05 * before.abs().max()
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
