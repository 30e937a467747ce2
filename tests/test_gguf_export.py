"""GGUF export: the file holds exactly lowbit's weights (bit for bit) in llama.cpp's layout and metadata."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from conftest import exported_logits, make_model, sharpen_llama
from llama_cpp_runner import llama_cpp_logits, llama_cpp_tokenize, require_llama_cpp
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.api import quantize
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.io.gguf_blocks import to_ggml_blocks
from lowbit.io.gguf_export import export_gguf, qk_permutation
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import round_to_storage
from lowbit.recipe import Recipe

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _quantized_llama(tokenizer, plan_or_format: str | dict[str, str]) -> torch.nn.Module:
    model = round_to_storage(make_model("llama", vocab=len(tokenizer)))
    plan = uniform_plan(model, plan_or_format) if isinstance(plan_or_format, str) else plan_or_format
    quantize_rtn(model, plan, progress=False)
    return model


def _read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def _gguf_name(module_name: str) -> str:
    layer = module_name.split(".")[2]
    return f"blk.{layer}.{GGUF_NAMES[module_name.split('.', 3)[3]]}.weight"


def _reference_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in spirit: reshape, swap the pair axis, reshape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected(model, name: str, w: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    if name.endswith("q_proj"):
        return _reference_permute(w, cfg.num_attention_heads)
    if name.endswith("k_proj"):
        return _reference_permute(w, cfg.num_key_value_heads)
    return w


def _assert_round_trip(model, tensors: dict) -> None:
    """Every quantized linear dequantizes from the GGUF to exactly lowbit's weight (Q/K rows permuted)."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            t = tensors[_gguf_name(name)]
            got = dequantize(t.data, t.tensor_type)
            want = _expected(model, name, m.dequantize()).numpy()
            assert got.shape == want.shape and np.array_equal(got, want), name
            n += 1
    assert n == 14
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(dequantize(emb.data, emb.tensor_type), model.model.embed_tokens.weight.detach().numpy())
    norm = tensors["blk.1.ffn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(norm.data, model.model.layers[1].post_attention_layernorm.weight.detach().numpy())


@pytest.mark.parametrize(("fmt", "qtype"), [("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_1", "Q4_1"),
                                            ("int5_g32_sym", "Q5_0"), ("iq4_nl", "IQ4_NL")])
def test_round_trip_is_bit_exact(tmp_path, tiny_tokenizer, fmt, qtype):
    model = _quantized_llama(tiny_tokenizer, fmt)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    _assert_round_trip(model, tensors)
    assert report.type_counts() == {qtype: 14, "F16": 2, "F32": 5}  # untied output; 2x2 layer norms + final
    assert report.file_bytes == (tmp_path / "m.gguf").stat().st_size
    assert report.linear_bpw == pytest.approx(get_format(fmt).bits_per_weight((64, 64)))


def test_mixed_file(tmp_path, tiny_tokenizer):
    base = make_model("llama", vocab=len(tiny_tokenizer))
    kinds = ["q4_0", "q4_1", "q8_0", "int5_g32_asym"]
    plan = {name: kinds[i % len(kinds)] for i, name in enumerate(uniform_plan(base, "q4_0"))}
    model = _quantized_llama(tiny_tokenizer, plan)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "mixed.gguf", embed_type="q8_0")
    meta, tensors = _read(tmp_path / "mixed.gguf")
    _assert_round_trip_types(model, tensors, plan)
    _assert_round_trip_mixed(model, tensors)
    assert {"Q4_0", "Q4_1", "Q8_0", "Q5_1"} <= set(report.type_counts())
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert meta["general.file_type"] in {int(gguf.LlamaFileType.MOSTLY_Q4_0), int(gguf.LlamaFileType.MOSTLY_Q4_1)}


def _assert_round_trip_types(model, tensors: dict, plan: dict[str, str]) -> None:
    names = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0", "int5_g32_asym": "Q5_1"}
    for name, fmt in plan.items():
        assert tensors[_gguf_name(name)].tensor_type.name == names[fmt]


def _assert_round_trip_mixed(model, tensors: dict) -> None:
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            t = tensors[_gguf_name(name)]
            assert np.array_equal(dequantize(t.data, t.tensor_type), _expected(model, name, m.dequantize()).numpy())


def test_metadata(tmp_path, tiny_tokenizer):
    model = _quantized_llama(tiny_tokenizer, "q4_0")
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    meta, tensors = _read(tmp_path / "m.gguf")
    cfg = model.config
    expected = {
        "general.architecture": "llama", "llama.context_length": 256, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.vocab_size": len(tiny_tokenizer),
        "llama.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": tiny_tokenizer.eos_token_id, "general.file_type": 2,
        "general.quantization_version": 2,
    }
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    vocab = tiny_tokenizer.get_vocab()
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tiny_tokenizer) and all(tokens[i] == t for t, i in vocab.items())
    assert meta["tokenizer.ggml.token_type"][vocab["<eos>"]] == int(gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.token_type"][vocab["a"]] == int(gguf.TokenType.NORMAL)
    assert len(meta["tokenizer.ggml.merges"]) > 0 and all(" " in m for m in meta["tokenizer.ggml.merges"])
    assert "output.weight" in tensors  # the tiny model's head is untied
    assert set(tensors) >= {"token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight",
                            "blk.1.ffn_down.weight"}


def test_qk_permutation_matches_convert_hf_to_gguf():
    w = torch.arange(12 * 3).reshape(12, 3)
    for n_head in (1, 2, 3):
        assert torch.equal(w[qk_permutation(n_head, 12)], _reference_permute(w, n_head))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_reads_back_the_same_model(tmp_path, tiny_tokenizer, arch):
    """Independent reader: transformers' own GGUF loader (which un-permutes llama's Q/K, and maps names and
    hyperparameters back) must reproduce lowbit's logits; Qwen2 adds Q/K/V biases and no permutation."""
    from transformers import AutoModelForCausalLM

    model = round_to_storage(make_model(arch, vocab=len(tiny_tokenizer)))
    quantize_rtn(model, uniform_plan(model, "q8_0"), progress=False)
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_rotated_model_is_refused_or_falls_back(tmp_path, tiny_tokenizer):
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))
    quantize(model, Recipe("q4_0", rotate=True), progress=False)
    with pytest.raises(LowbitError, match="rotation"):
        export_gguf(model, tiny_tokenizer, tmp_path / "rot.gguf")
    assert not (tmp_path / "rot.gguf").exists()
    report = export_gguf(model, tiny_tokenizer, tmp_path / "rot.gguf", fallback="q8_0")
    assert len(report.fallbacks) == 14 and all(t.qtype == "Q8_0" for t in report.fallbacks)
    _, tensors = _read(tmp_path / "rot.gguf")
    m = model.model.layers[0].mlp.down_proj
    t = tensors["blk.0.ffn_down.weight"]
    # the fallback re-quantizes the effective (unrotated) weight, so the file is close to lowbit's model
    requant = get_format("q8_0").dequantize(get_format("q8_0").quantize(m.dequantize()))
    assert np.array_equal(dequantize(t.data, t.tensor_type), requant.numpy())


@pytest.mark.parametrize(("fmt", "match"), [("iq2_xxs", "multiples of 256"), ("int4_g128_sym", "no GGUF type"),
                                            ("int4_g48_sym", "no GGUF type")])
def test_unsupported_tensors(tmp_path, tiny_tokenizer, fmt, match):
    plan = uniform_plan(make_model("llama", vocab=len(tiny_tokenizer)), "q4_0")
    plan[next(iter(plan))] = fmt  # one offending linear is enough (and IQ2_XXS fitting is slow on a CPU)
    model = _quantized_llama(tiny_tokenizer, plan)
    with pytest.raises(LowbitError, match=match):
        export_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf")
    report = export_gguf(model, tiny_tokenizer, tmp_path / "ok.gguf", fallback="q4_0")
    assert report.type_counts()["Q4_0"] == 14 and len(report.fallbacks) == 1
    assert match.split()[0] in report.fallbacks[0].note


def test_bad_fallback_is_refused(tmp_path, tiny_tokenizer):
    model = _quantized_llama(tiny_tokenizer, "int4_g128_sym")
    with pytest.raises(LowbitError, match="no GGUF type"):
        export_gguf(model, tiny_tokenizer, tmp_path / "bad.gguf", fallback="int4_g64_sym")


def test_iq2_xxs_rows_of_256_are_copied_verbatim():
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    qt = get_format("iq2_xxs").quantize(w)
    qtype, blocks = to_ggml_blocks(qt)
    assert qtype == gguf.GGMLQuantizationType.IQ2_XXS and np.array_equal(blocks, qt.data["qs"].numpy())
    assert np.array_equal(dequantize(blocks, qtype), get_format("iq2_xxs").dequantize(qt).numpy())


def test_cli_export(tmp_path, tiny_model_dir, capsys):
    from lowbit.cli import main
    from lowbit.io.checkpoint import save_quantized
    from lowbit.io.loader import load_model

    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(tiny_model_dir), "--format", "q4_0", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "14 x Q4_0" in capsys.readouterr().out and out.exists()
    assert main(["export-gguf", str(tiny_model_dir), "--out", str(out)]) == 2  # exists, no --overwrite
    assert main(["export-gguf", str(tiny_model_dir), "--out", str(tmp_path / "x.gguf")]) == 2  # float, no --format
    model, tok = load_model(tiny_model_dir)
    quantize(round_to_storage(model), Recipe("q8_0"), progress=False)
    save_quantized(model, tok, tmp_path / "ckpt")
    assert main(["export-gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ck.gguf")]) == 0
    assert "14 x Q8_0" in capsys.readouterr().out


def _sharp_llama(tokenizer) -> torch.nn.Module:
    return sharpen_llama(make_model("llama", vocab=len(tokenizer)))


# Measured max |logit diff| (logits up to ~7): f16 5e-3, q8_0 0.062, q4_0 0.073, q4_1 0.074 (llama.cpp rounds
# activations to 8 bits for quantized dot products); without the Q/K permutation it is ~4.
LLAMA_CPP_TOL = 0.2


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "iq4_nl", "int5_g32_sym", "int5_g32_asym"])  # Q5_0, Q5_1
def test_llama_cpp_matches_lowbit_logits(tmp_path, tiny_tokenizer, fmt):
    """Stock llama.cpp computes the same logits as lowbit's dequantized model, within its own activation
    rounding."""
    require_llama_cpp()
    model = _sharp_llama(tiny_tokenizer)
    quantize_rtn(model, uniform_plan(model, fmt), progress=False)
    want, got = exported_logits(model, tiny_tokenizer, tmp_path / "m.gguf")
    diff = np.abs(got - want).max()
    print(f"{fmt}: max |logit diff| llama.cpp vs lowbit = {diff:.3f} (max |logit| {np.abs(want).max():.2f})")
    assert np.abs(want).max() > 3  # the model is sharp enough for the bound to mean something
    assert diff < LLAMA_CPP_TOL


def test_llama_cpp_tokenizes_like_hf(tmp_path, tiny_tokenizer):
    """The exported tokenizer (vocabulary, merges, pre-tokenizer) gives llama.cpp the ids Hugging Face gives."""
    require_llama_cpp()
    export_gguf(make_model("llama", vocab=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf")
    for text in ("The quick brown fox jumps over the lazy dog.", "Low-bit  quantization, 2/3/4 bits!\n<eos>x"):
        assert llama_cpp_tokenize(tmp_path / "m.gguf", text) == tiny_tokenizer.encode(text)


def test_calibrated_format_gets_the_types_searched_fit():
    """export-gguf --format q4_0 with a calibrated method rounds as --preset Q4_0 does (the least-squares block fit),
    round-to-nearest keeps ggml's own fit, and formats with no searched variant or plans are left alone."""
    from lowbit.jobs import searched_fit

    assert searched_fit(Recipe("q4_0", "gptq_act")).format == "int4_g32_sym_ls"
    assert searched_fit(Recipe("int5_g32_sym", "imatrix")).format == "int5_g32_sym_ls"
    assert searched_fit(Recipe("q5_0", "gptq")).format == "int5_g32_sym_ls"
    assert searched_fit(Recipe("Q5_1", "gptq")).format == "int5_g32_asym_mse"
    assert searched_fit(Recipe("q4_1", "gptq")).format == "int4_g32_asym_mse"
    assert searched_fit(Recipe("q4_0", "rtn")).format == "q4_0"
    assert searched_fit(Recipe("iq4_nl", "gptq")).format == "iq4_nl"
    plan = {"model.layers.0.mlp.down_proj": "q4_0"}
    assert searched_fit(Recipe(plan, "gptq")).format == plan


def test_plan_like_reproduces_another_files_types(tmp_path, tiny_tokenizer):
    """--like: lowbit re-quantizes a model into exactly the per-tensor types of another GGUF (here one lowbit
    wrote with a mixed plan and a q4_0 embedding), so both files have the same types and the same size."""
    from lowbit.io.gguf_types import SEARCHED, plan_like

    base = make_model("llama", vocab=len(tiny_tokenizer))
    kinds = ["iq4_nl", "q4_1", "q8_0", "int5_g32_sym"]
    plan = {name: kinds[i % len(kinds)] for i, name in enumerate(uniform_plan(base, "q4_0"))}
    first = export_gguf(_quantized_llama(tiny_tokenizer, plan), tiny_tokenizer, tmp_path / "a.gguf",
                        embed_type="q4_0")
    like = plan_like(make_model("llama", vocab=len(tiny_tokenizer)), tmp_path / "a.gguf")
    assert like.plan == plan and like.embed_type == "q4_0"
    searched = plan_like(base, tmp_path / "a.gguf", searched=True)  # same GGUF types, searched block scales
    assert searched.plan == {n: SEARCHED.get(f, f) for n, f in plan.items()} and searched.embed_type == "q4_0"
    assert searched.plan != plan
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer), seed=1))
    quantize(model, Recipe(like.plan))
    second = export_gguf(model, tiny_tokenizer, tmp_path / "b.gguf", embed_type=like.embed_type)
    assert [(t.name, t.qtype, t.nbytes) for t in first.tensors] == [(t.name, t.qtype, t.nbytes) for t in second.tensors]
    assert first.file_bytes == second.file_bytes
    with pytest.raises(LowbitError, match="not found"):
        plan_like(model, tmp_path / "missing.gguf")


def test_fused_rotation_exports_and_llama_cpp_agrees(tmp_path, tiny_tokenizer):
    """A tied model with fused rotation: the head is untied (output.weight written), the GGUF runs in stock
    llama.cpp with no runtime change, and its logits match lowbit's quantized fused model."""
    model = _sharp_llama(tiny_tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. Low-bit quantization")
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits[0]
    quantize(model, Recipe("q8_0", fuse_rotation=True))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert (want - before).abs().max() < 0.1 * before.abs().max()  # same function, up to 8-bit rounding
    report = export_gguf(model, tiny_tokenizer, tmp_path / "fused.gguf")
    assert {"token_embd.weight", "output.weight"} <= {t.name for t in report.tensors}
    got = llama_cpp_logits(tmp_path / "fused.gguf", ids)
    assert np.abs(got - want.numpy()).max() < LLAMA_CPP_TOL


def test_cli_export_like_and_fused(tmp_path, tiny_model_dir, capsys):
    from lowbit.cli import main

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert main(["export-gguf", str(tiny_model_dir), "--format", "iq4_nl", "--embed-type", "q8_0", "--out", str(a),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["export-gguf", str(tiny_model_dir), "--like", str(a), "--fuse-rotation", "--out", str(b),
                 "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "14 x IQ4_NL" in out and "2 x Q8_0" in out  # token_embd + the untied output, both q8_0 as in a.gguf
    assert main(["export-gguf", str(tiny_model_dir), "--format", "f16", "--out", str(tmp_path / "f.gguf")]) == 0
    assert main(["export-gguf", str(tiny_model_dir), "--like", str(a), "--format", "q4_0",
                 "--out", str(tmp_path / "x.gguf")]) == 2


@pytest.mark.parametrize("fused", [False, True])
def test_gguf_weights_load_back_into_a_model(tmp_path, tiny_tokenizer, fused):
    """load_gguf_weights: a fresh float model given a GGUF's dequantized tensors computes what the quantized model
    computes (Q/K layout undone, untied head restored), so any GGUF can be scored with lowbit's protocol."""
    from lowbit.io.gguf_import import load_gguf_weights

    model = _sharp_llama(tiny_tokenizer)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    quantize(model, Recipe("iq4_nl", fuse_rotation=fused))
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    fresh = make_model("llama", vocab=len(tiny_tokenizer), seed=5)
    fresh.lm_head.weight = fresh.model.embed_tokens.weight
    load_gguf_weights(fresh, tmp_path / "m.gguf")
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == (not fused)
    ids = torch.tensor([tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(LowbitError, match="not found"):
        load_gguf_weights(fresh, tmp_path / "nope.gguf")
