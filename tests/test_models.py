import pytest
import torch

from conftest import make_model
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.errors import BadWeightsError, LowbitError, UnsupportedModelError
from lowbit.eval.sizes import model_size
from lowbit.formats import get_format
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, linear_weight

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "opt"]


def test_quant_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    qt = get_format("int4_g32_asym").quantize(lin.weight.data)
    q = QuantLinear.from_quantized(qt, lin.bias.data)
    x = torch.randn(3, 5, 128)
    ref = x @ get_format("int4_g32_asym").dequantize(qt).t() + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-5)
    # casting the module for compute keeps packed storage intact
    q = q.to(torch.float64)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float16
    assert q(x.double()).dtype == torch.float64


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_quantizes_every_decoder_linear(arch):
    model = make_model(arch)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    names = list(decoder_linears(model))
    assert len(names) >= 8  # 2 layers x (attention + mlp)
    errs = quantize_rtn(model, uniform_plan(model, "int8_g32_sym"), progress=False)
    assert set(errs) == set(names)
    assert all(isinstance(m, QuantLinear) for m in decoder_linears(model).values())
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item())  # 8-bit: near lossless
    assert max(errs.values()) < 0.01


def test_gpt2_conv1d_orientation():
    model = make_model("gpt2")
    name, module = next(iter(decoder_linears(model).items()))
    w = linear_weight(module).clone()  # [out, in]
    quantize_rtn(model, {name: "int8_g32_asym"}, progress=False)
    deq = model.get_submodule(name).dequantize()
    assert deq.shape == w.shape and (deq - w).abs().max() < 0.01 * w.abs().max()


def test_nan_weights_rejected_before_any_change():
    model = make_model("llama")
    names = list(decoder_linears(model))
    linear_weight(decoder_linears(model)[names[-1]])[0, 0] = float("nan")
    with pytest.raises(BadWeightsError, match="NaN"):
        quantize_rtn(model, uniform_plan(model, "int4_g32_sym"), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_sizes_count_stored_bytes():
    model = make_model("llama")
    before = model_size(model)
    assert before.linear_bpw == 16.0
    quantize_rtn(model, uniform_plan(model, "int4_g32_asym"), progress=False)
    after = model_size(model)
    assert after.linear_params == before.linear_params
    assert after.linear_bpw == pytest.approx(5.0)
    assert after.embed_head_bytes == before.embed_head_bytes  # 16-bit, reported separately
    assert after.other_bytes == before.other_bytes  # norms


def test_save_load_identity(tmp_path, tiny_tokenizer):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    quantize_rtn(model, uniform_plan(model, "int3_g32_asym"), progress=False)
    from lowbit.models.walker import round_to_storage

    round_to_storage(model)
    save_quantized(model, tiny_tokenizer, tmp_path / "q", meta={"method": "rtn"})
    loaded, tok = load_quantized(tmp_path / "q")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").format_name == "int3_g32_asym"


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gpt_neox", "qwen2"])
def test_save_load_other_architectures(tmp_path, tiny_tokenizer, arch):
    model = make_model(arch, vocab=len(tiny_tokenizer))
    quantize_rtn(model, uniform_plan(model, "int4_g32_sym"), progress=False)
    from lowbit.models.walker import round_to_storage

    round_to_storage(model)
    save_quantized(model, tiny_tokenizer, tmp_path / arch)
    loaded, _ = load_quantized(tmp_path / arch)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_is_atomic_and_refuses_overwrite(tmp_path, tiny_tokenizer):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    with pytest.raises(LowbitError, match="no quantized layers"):
        save_quantized(model, tiny_tokenizer, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    quantize_rtn(model, uniform_plan(model, "int4_g32_sym"), progress=False)
    save_quantized(model, tiny_tokenizer, tmp_path / "q")
    with pytest.raises(FileExistsError):
        save_quantized(model, tiny_tokenizer, tmp_path / "q")

    class Boom(Exception):
        pass

    def broken_save_pretrained(*a, **k):
        raise Boom

    tiny_tokenizer_save = tiny_tokenizer.save_pretrained
    tiny_tokenizer.save_pretrained = broken_save_pretrained
    try:
        with pytest.raises(Boom):
            save_quantized(model, tiny_tokenizer, tmp_path / "q2")
    finally:
        tiny_tokenizer.save_pretrained = tiny_tokenizer_save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no half-written q2, no temp dir left


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path)
    from lowbit.io.loader import load_model

    with pytest.raises(UnsupportedModelError, match="bert"):
        load_model(tmp_path)


def test_missing_path_and_uncached_hub_id(tmp_path):
    from lowbit.io.loader import load_model

    with pytest.raises(LowbitError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(LowbitError, match="never downloads"):
        load_model("some-org/definitely-not-cached-model-xyz")
