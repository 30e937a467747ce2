import torch

from conftest import make_model
from lowbit.api import quantize
from lowbit.models.quant_linear import QuantLinear, cache_dequantized
from lowbit.recipe import Recipe
from lowbit.serve.generate import SamplingParams, TextStream, use_weight_cache


def _quantized():
    model = make_model("llama")
    quantize(model, Recipe("int4_g32_sym", rotate=True), progress=False)
    return model


def test_cached_outputs_equal_uncached_exactly():
    model = _quantized()
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    keys = set(model.state_dict())
    with torch.inference_mode():
        ref = model(ids).logits
    assert cache_dequantized(model) == 14
    with torch.inference_mode():
        first, second = model(ids).logits, model(ids).logits  # builds the cache, then uses it
    assert torch.equal(ref, first) and torch.equal(ref, second)
    assert set(model.state_dict()) == keys  # the cache is not part of what is saved
    with torch.no_grad():  # built under inference_mode, usable outside it
        assert torch.equal(model(ids).logits, ref)


def test_cache_invalidated_when_buffers_change():
    model = _quantized()
    cache_dequantized(model)
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    x = torch.randn(3, lin.in_features)
    before = lin(x)
    key = lin._keys[-1]  # scales: changing them changes the weight
    with torch.no_grad():
        getattr(lin, key).mul_(2)
    after = lin(x)
    lin.cache_weight(False)
    assert not torch.equal(before, after) and torch.equal(after, lin(x))


def test_generation_identical_with_and_without_cache(tiny_tokenizer):
    model = _quantized()
    params = SamplingParams(max_new_tokens=12, temperature=0)
    use_weight_cache(model, False)
    plain = TextStream(model, tiny_tokenizer, [1, 2, 3], params)
    list(plain)
    assert use_weight_cache(model) == 4 * sum(m.in_features * m.out_features for m in model.modules()
                                              if isinstance(m, QuantLinear))
    cached = TextStream(model, tiny_tokenizer, [1, 2, 3], params)
    list(cached)
    assert plain.token_ids == cached.token_ids and len(plain.token_ids) > 0
