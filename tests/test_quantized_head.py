"""A quantized LM head (``Recipe.head``, ``lowbit quantize --head``): rounded in place after the decoder, untied
from the embeddings, counted, saved and loaded bit for bit, decoded by the fast path, written by GGUF export and
refused by the 16-bit-head HF exports."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from conftest import make_model
from lowbit.errors import LowbitError
from lowbit.eval.sizes import model_size
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import round_to_storage
from lowbit.serve.fast_decode import StaticDecoder
from test_fast_decode import PROMPT, reference_greedy

IDS = torch.tensor([[3, 17, 42, 5, 99, 7]])


def _tied_llama() -> torch.nn.Module:
    model = make_model("llama")
    model.lm_head.weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True
    return model


def _logits_with_float_head(model: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The model's logits with ``weight`` as a float LM head in place of its own (put back after)."""
    head = model.get_output_embeddings()
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    model.set_output_embeddings(lin)
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        model.set_output_embeddings(head)


@pytest.mark.parametrize("tied", [False, True])
def test_head_is_quantized_in_place_untied_and_counted(tied: bool) -> None:
    model = _tied_llama() if tied else make_model("llama")
    embed = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    result = lowbit.quantize(model, lowbit.Recipe("q4_0", head="q8_0"), progress=False)
    q = model.get_output_embeddings()
    assert isinstance(q, QuantLinear) and q.format_name == "q8_0" and not model.config.tie_word_embeddings
    assert result.extra["lm_head"]["format"] == "q8_0" and 0 < result.extra["lm_head"]["rel_error"] < 0.02
    assert torch.equal(model.get_input_embeddings().weight, embed)  # the embeddings stay as they were
    assert float((q.dequantize() - head).norm() / head.norm()) < 0.02
    # the logits are those of the model with the dequantized head as its float weight
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, _logits_with_float_head(model, q.dequantize()), atol=1e-5)
    size = model_size(model)
    assert size.embed_head_bytes == embed.numel() * 2 + q.quantized().nbytes
    assert q.quantized().nbytes == head.numel() * 34 // 32  # q8_0: 34 bytes per 32 weights


def test_kquant_head_falls_back_as_llamacpp_does() -> None:
    """Rows of 64 do not fill Q6_K's 256-weight superblocks: llama.cpp writes Q8_0 there, and so does lowbit."""
    model = make_model("llama")
    result = lowbit.quantize(model, lowbit.Recipe("q4_0", head="q6_k"), progress=False)
    assert model.lm_head.format_name == "q8_0" and result.extra["lm_head"]["format"] == "q8_0"


def test_checkpoint_with_quantized_head_reloads_bit_for_bit(tmp_path, tiny_tokenizer) -> None:
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))  # float tensors as they are stored
    result = lowbit.quantize(model, lowbit.Recipe("q4_0", head="q4_0"), progress=False)
    lowbit.save(model, tiny_tokenizer, tmp_path / "q", result=result)
    info = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert info["formats"]["lm_head"] == "q4_0" and info["head"] == "q4_0"
    again, _ = lowbit.load(tmp_path / "q", device="cpu")
    assert isinstance(again.lm_head, QuantLinear) and not again.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_fast_decode_with_quantized_head_gives_the_reference_tokens() -> None:
    model = make_model("llama")
    lowbit.quantize(model, lowbit.Recipe("q4_0", head="q4_0"), progress=False)
    dec = StaticDecoder(model, max_cache_len=len(PROMPT) + 16)
    assert dec.generate_greedy(PROMPT, 16).tolist() == reference_greedy(model, PROMPT, 16)


def test_gguf_export_writes_the_quantized_head(tmp_path, tiny_tokenizer) -> None:
    """The head's bytes go to output.weight in their GGUF type; read back by the gguf package, they decode to the
    QuantLinear's weight."""
    from lowbit.io.gguf_import import load_gguf_weights

    model = make_model("llama", vocab=len(tiny_tokenizer))
    lowbit.quantize(model, lowbit.Recipe("q4_0", head="q8_0"), progress=False)
    lowbit.export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    back = load_gguf_weights(make_model("llama", vocab=len(tiny_tokenizer)), tmp_path / "m.gguf")
    assert torch.allclose(back.lm_head.weight, model.lm_head.dequantize(), atol=1e-6)


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_hf_exports_refuse_a_quantized_head(tmp_path, tiny_tokenizer, to: str) -> None:
    model = make_model("llama", vocab=len(tiny_tokenizer))
    lowbit.quantize(model, lowbit.Recipe("int4_g32_sym", head="q8_0"), progress=False)
    with pytest.raises(LowbitError, match="LM head is quantized"):
        lowbit.export_hf(model, tiny_tokenizer, tmp_path / "hf", to=to)
    assert not (tmp_path / "hf").exists()


def test_bad_head_format_fails_before_any_work(tmp_path, tiny_model_dir, capsys) -> None:
    from lowbit.cli import main
    from lowbit.streaming import check_streamable

    with pytest.raises(LowbitError, match="unknown format"):
        lowbit.Recipe("q4_0", head="q9_9")
    with pytest.raises(LowbitError, match="cannot be streamed"):
        check_streamable(lowbit.Recipe("q4_0", head="q8_0"))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "--head", "q9_9", "-o", str(out), "--no-progress"]) == 2
    assert "q9_9" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "--head", "q8_0", "-o", str(out), "--no-progress"]) == 0
    assert "decoder linears, LM head q8_0," in capsys.readouterr().out
    assert json.loads((out / "lowbit.json").read_text())["formats"]["lm_head"] == "q8_0"
