"""--preset: llama.cpp's per-tensor type rules (src/llama-quant.cpp llama_tensor_get_type_impl), tables by hand."""

import pytest
from transformers import LlamaConfig

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.io.gguf_presets import PRESETS, preset_plan, use_more_bits


def tiny_config() -> LlamaConfig:  # 4 layers, 256-wide rows, untied output
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2)


def smol_config() -> LlamaConfig:  # SmolLM2-135M's shapes: 576-wide rows, 9/3 heads (n_gqa 3), tied embeddings
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def _t(layer: int, sub: str) -> str:
    return f"model.layers.{layer}.{sub}"


V, DOWN, OUT, Q = "self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj"


def test_use_more_bits_matches_cpp() -> None:
    # n=30: n/8 = 3, 7n/8 = 26: layers 0-2, 26-29 and 5, 8, ..., 23
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]


# (preset, tensor, expected lowbit format) on the tiny config: every row divides 256, nothing falls back
TINY = [
    ("Q4_K_M", _t(0, V), "q4_k"), ("Q4_K_M", _t(2, V), "q6_k"), ("Q4_K_M", _t(3, V), "q6_k"),
    ("Q4_K_M", _t(1, DOWN), "q4_k"), ("Q4_K_M", _t(2, DOWN), "q6_k"), ("Q4_K_M", _t(0, Q), "q4_k"),
    ("Q2_K", _t(0, V), "q3_k"), ("Q2_K", _t(3, DOWN), "q3_k"), ("Q2_K", _t(1, OUT), "q3_k"), ("Q2_K", _t(1, Q), "q2_k"),
    ("Q6_K", _t(0, V), "q6_k"), ("Q6_K", _t(2, DOWN), "q6_k"), ("Q6_K", _t(3, Q), "q6_k"),
]


@pytest.mark.parametrize(("preset", "name", "fmt"), TINY)
def test_tiny_linears(preset: str, name: str, fmt: str) -> None:
    assert preset_plan(tiny_config(), preset).plan[name] == fmt


@pytest.mark.parametrize(("preset", "embed", "output"), [("Q4_K_M", "q4_k", "q6_k"), ("Q2_K", "q2_k", "q6_k"),
                                                        ("Q6_K", "q6_k", "q6_k"), ("IQ2_XXS", "q2_k", "q5_k"),
                                                        ("Q4_0", "q4_0", "q6_k")])
def test_tiny_untied_embed_and_output(preset: str, embed: str, output: str) -> None:
    plan = preset_plan(tiny_config(), preset)
    assert (plan.embed_type, plan.output_type, plan.source) == (embed, output, preset)


# SmolLM2: 576-column rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0); 1536-column ffn_down fits
SMOL = [
    ("Q4_K_M", _t(0, V), "q8_0"), ("Q4_K_M", _t(15, V), "int5_g32_sym"), ("Q4_K_M", _t(29, V), "q8_0"),
    ("Q4_K_M", _t(14, V), "q8_0"), ("Q4_K_M", _t(0, DOWN), "q6_k"), ("Q4_K_M", _t(3, DOWN), "q4_k"),
    ("Q4_K_M", _t(5, DOWN), "q6_k"), ("Q4_K_M", _t(26, DOWN), "q6_k"), ("Q4_K_M", _t(10, Q), "int5_g32_sym"),
    ("Q2_K", _t(0, V), "q4_0"), ("Q2_K", _t(29, V), "q4_0"), ("Q2_K", _t(15, DOWN), "q3_k"),
    ("Q2_K", _t(15, OUT), "q4_0"), ("Q2_K", _t(15, Q), "q4_0"),
    ("Q6_K", _t(0, V), "q8_0"), ("Q6_K", _t(15, DOWN), "q6_k"), ("Q6_K", _t(29, OUT), "q8_0"),
    ("IQ2_XXS", _t(15, Q), "iq4_nl"), ("IQ2_XXS", _t(0, DOWN), "q2_k"), ("IQ2_XXS", _t(4, DOWN), "iq2_xxs"),
    ("Q3_K_M", _t(1, V), "int5_g32_asym"), ("Q3_K_M", _t(0, DOWN), "q5_k"), ("Q3_K_M", _t(2, DOWN), "q4_k"),
]


@pytest.mark.parametrize(("preset", "name", "fmt"), SMOL)
def test_smol_linears(preset: str, name: str, fmt: str) -> None:
    assert preset_plan(smol_config(), preset).plan[name] == fmt


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "Q6_K"])
def test_smol_tied_embedding_takes_output_rule(preset: str) -> None:
    plan = preset_plan(smol_config(), preset)  # 576 % 256 != 0: llama.cpp writes the output matrix Q8_0
    assert (plan.embed_type, plan.output_type) == ("q8_0", "q8_0")
    assert len(plan.plan) == 30 * 7


def test_every_preset_plans_every_linear() -> None:
    for preset in PRESETS:
        assert len(preset_plan(tiny_config(), preset).plan) == 4 * 7


def test_model_and_config_agree(tiny_llama) -> None:  # noqa: ANN001 - fixture
    assert preset_plan(tiny_llama, "Q4_K_M").plan == preset_plan(tiny_llama.config, "Q4_K_M").plan


def test_searched_variant() -> None:
    assert preset_plan(tiny_config(), "Q4_0", searched=True).plan[_t(0, Q)] == "int4_g32_sym_ls"


def test_unknown_preset_is_one_line() -> None:
    with pytest.raises(LowbitError, match="known presets: Q2_K, .*Q4_K_M") as e:
        preset_plan(tiny_config(), "Q4_K_X")
    assert "\n" not in str(e.value)


def test_cli_unknown_preset_writes_nothing(tiny_model_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "x.gguf"
    assert main(["export-gguf", str(tiny_model_dir), "-o", str(out), "--preset", "Q9_K", "--no-progress"]) != 0
    assert "known presets" in capsys.readouterr().err
    assert not out.exists()


def test_cli_preset_excludes_like(tiny_model_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "x.gguf"
    args = ["export-gguf", str(tiny_model_dir), "-o", str(out), "--preset", "Q4_K_M", "--like", "a.gguf"]
    assert main(args) != 0
    assert "--preset" in capsys.readouterr().err
    assert not out.exists()


def test_cli_preset_writes_llama_cpp_types(tiny_model_dir, tmp_path) -> None:  # noqa: ANN001
    from lowbit.io.gguf_types import tensor_types

    out = tmp_path / "q4km.gguf"
    assert main(["export-gguf", str(tiny_model_dir), "-o", str(out), "--preset", "Q4_K_M", "--no-progress"]) == 0
    types = tensor_types(out)  # 64-wide rows: Q4_K falls back to Q5_0, Q6_K to Q8_0; of 2 layers the last uses more
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q5_0" and types["output.weight"] == "Q8_0"  # untied: Q6_K -> Q8_0


def test_untied_output_type_and_narrow_row_fallback(tmp_path, tiny_tokenizer) -> None:  # noqa: ANN001
    """export_gguf's output_type quantizes an untied head apart from token_embd; a k-quant whose superblocks do
    not divide the 64-wide rows takes llama.cpp's fallback for either (Q6_K -> Q8_0, Q4_K -> Q5_0)."""
    from conftest import make_model
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_types import plan_like, tensor_types

    model = make_model("llama", vocab=len(tiny_tokenizer))
    assert not model.config.tie_word_embeddings
    export_gguf(model, tiny_tokenizer, tmp_path / "a.gguf", output_type="q6_k")
    types = tensor_types(tmp_path / "a.gguf")
    assert (types["token_embd.weight"], types["output.weight"]) == ("F16", "Q8_0")
    export_gguf(model, tiny_tokenizer, tmp_path / "b.gguf", embed_type="q4_k")  # the head follows embed_type
    types = tensor_types(tmp_path / "b.gguf")
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q5_0", "Q5_0")
    export_gguf(model, tiny_tokenizer, tmp_path / "c.gguf", embed_type="q4_0", output_type="q8_0")
    like = plan_like(model, tmp_path / "c.gguf")  # --like reads the untied head's type back
    assert (like.embed_type, like.output_type) == ("q4_0", "q8_0")
    with pytest.raises(LowbitError, match="output_type 'int4_g128_sym' has no GGUF type"):
        export_gguf(model, tiny_tokenizer, tmp_path / "d.gguf", output_type="int4_g128_sym")


# ----- against stock llama.cpp: its own quantizer's types, and its logits on a --preset file ----------------------
def _llama(hidden: int, tied: bool, vocab: int, layers: int = 2):  # noqa: ANN202 - a transformers Llama
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


SHAPES = {"narrow": (64, False), "narrow_tied": (64, True), "wide": (256, False)}  # 64: every k-quant falls back


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):  # noqa: ANN001, ANN201 - {shape: (HF dir, its F16 GGUF)}
    from lowbit.io.gguf_export import export_gguf

    out = {}
    for shape, (hidden, tied) in SHAPES.items():
        d = tmp_path_factory.mktemp(shape)
        model = _llama(hidden, tied, len(tiny_tokenizer))
        model.save_pretrained(d / "hf")
        tiny_tokenizer.save_pretrained(d / "hf")
        export_gguf(model, tiny_tokenizer, d / "f16.gguf")
        out[shape] = d / "hf", d / "f16.gguf"
    return out


# llama-quantize refuses IQ2_XXS without an importance matrix where the rows take it (wide); --preset needs none
CASES = [(preset, shape) for preset in PRESETS for shape in SHAPES if (preset, shape) != ("IQ2_XXS", "wide")]


@pytest.mark.parametrize(("preset", "shape"), CASES)
def test_preset_types_match_llama_quantize(preset: str, shape: str, model_dirs, tmp_path) -> None:  # noqa: ANN001
    """lowbit's --preset file has, tensor for tensor, the types llama.cpp's own quantizer (llama-quantize PRESET,
    no imatrix) gives the same model's F16 file: decoder linears, token_embd and an untied output.weight."""
    import lowbit
    from llama_cpp_runner import llama_cpp_quantize, require_llama_cpp
    from lowbit.io.gguf_types import tensor_types

    require_llama_cpp()
    src, f16 = model_dirs[shape]
    llama_cpp_quantize(f16, tmp_path / "llama.gguf", preset)
    lowbit.convert_gguf(str(src), tmp_path / "lowbit.gguf", preset=preset, progress=False)
    want, got = tensor_types(tmp_path / "llama.gguf"), tensor_types(tmp_path / "lowbit.gguf")
    assert got == want
    assert ("output.weight" in got) == (shape != "narrow_tied")


def test_llama_cpp_runs_q4_k_m_preset_like_lowbit(tmp_path, tiny_tokenizer) -> None:  # noqa: ANN001
    """A Q4_K_M file of an untied model (output.weight Q6_K, attn_v / ffn_down of the last layer Q6_K, the rest
    Q4_K): stock llama.cpp loads it and computes the logits of lowbit's dequantized model, within the bound of
    the k-quant agreement tests; the Q6_K head holds exactly q6_k's own fit of the float head."""
    import copy

    import numpy as np
    import torch
    from gguf.quants import dequantize

    from conftest import sharpen_llama
    from llama_cpp_runner import llama_cpp_logits, require_llama_cpp
    from lowbit.api import export_gguf, quantize
    from lowbit.formats import get_format
    from lowbit.io.gguf_import import load_gguf_weights
    from lowbit.io.gguf_types import read_gguf
    from lowbit.recipe import Recipe

    require_llama_cpp()
    model = sharpen_llama(_llama(256, False, len(tiny_tokenizer)))
    float_model = copy.deepcopy(model)
    types = preset_plan(model, "Q4_K_M")
    quantize(model, Recipe(types.plan))
    path = tmp_path / "q4km.gguf"
    export_gguf(model, tiny_tokenizer, path, embed_type=types.embed_type, output_type=types.output_type)
    tensors = {t.name: t for t in read_gguf(path).tensors}
    assert {n: tensors[n].tensor_type.name for n in ("output.weight", "token_embd.weight", "blk.1.attn_v.weight",
                                                     "blk.0.attn_v.weight")} == \
        {"output.weight": "Q6_K", "token_embd.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
         "blk.0.attn_v.weight": "Q4_K"}
    head = get_format("q6_k")
    fit = head.dequantize(head.quantize(model.lm_head.weight.detach().float()))
    assert np.array_equal(dequantize(tensors["output.weight"].data, tensors["output.weight"].tensor_type),
                          fit.numpy())
    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. Low-bit quantization")
    dequantized = load_gguf_weights(float_model, path)  # every tensor as the file holds it, the Q6_K head too
    with torch.no_grad():
        want = dequantized(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    diff, top = np.abs(got - want), np.abs(want).max()
    print(f"Q4_K_M: max |logit diff| llama.cpp vs lowbit = {diff.max():.3f}, mean {diff.mean():.4f} "
          f"(max |logit| {top:.2f})")
    assert top > 1 and diff.max() < 0.1 * top and diff.mean() < 0.01 * top
