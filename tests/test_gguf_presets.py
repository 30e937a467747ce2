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
    assert preset_plan(tiny_config(), "Q4_0", searched=True).plan[_t(0, Q)] == "int4_g32_sym_mse"


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
