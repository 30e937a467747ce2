"""End-to-end tuning of scales and norms (algorithms/finetune.py): codes fixed, KL down, storage unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_model, sharpen_llama
from lowbit.algorithms.finetune import FinetuneConfig, ScaleTunedLinear, finetune, kl_per_token, norm_modules
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.models.quant_linear import QuantLinear


def _samples(n: int = 8, seqlen: int = 32, vocab: int = 320, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _teacher():
    return sharpen_llama(make_model("llama")).float()  # peaked logits: a random init's are nearly uniform


def _quantized(fmt: str = "int3_g32_sym"):
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    quantize_rtn(student, uniform_plan(student, fmt), progress=False)
    return teacher, student


@torch.no_grad()
def _kl(teacher, student, ids) -> float:  # noqa: ANN001
    return float(kl_per_token(teacher(ids).logits, student(ids).logits))


def _codes(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: m.fmt.unpack(m.quantized())[0] for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize(("fmt", "gain"), [("int3_g32_sym", 0.92), ("q4_1", 0.97), ("iq4_nl", 0.99)])
def test_kl_drops_on_held_out_windows_and_codes_stay(fmt, gain):
    """Measured held-out KL ratios: int3 0.874, q4_1 0.930, iq4_nl 0.967 (64 x 64 random-token windows)."""
    teacher, student = _quantized(fmt)
    train, held_out = _samples(64, 64), _samples(16, 64, seed=2)
    before, codes = _kl(teacher, student, held_out), _codes(student)
    rep = finetune(student, teacher, train, FinetuneConfig(epochs=2, lr=3e-3, batch_size=8), device="cpu",
                   progress=False)
    after = _kl(teacher, student, held_out)
    assert after < gain * before, (before, after)
    assert rep.kl_last < rep.kl_first and rep.steps == 16
    assert all(torch.equal(codes[n], c) for n, c in _codes(student).items())  # only floats moved
    assert all(type(m) is not ScaleTunedLinear for m in student.modules())


def test_tuned_values_are_what_is_stored():
    """The scales the model computes with are float16 (what pack stores), and the norms are float16-rounded."""
    teacher, student = _quantized("q4_0")
    finetune(student, teacher, _samples(), FinetuneConfig(epochs=2, lr=1e-2), device="cpu", progress=False)
    for m in student.modules():
        if isinstance(m, QuantLinear):
            again = get_format(m.format_name).pack(*m.fmt.unpack(m.quantized()), (m.out_features, m.in_features))
            assert torch.equal(again.data["codes"], m.codes) and torch.equal(again.data["scale"], m.scale)
    for m in norm_modules(student).values():
        assert torch.equal(m.weight, m.weight.half().float())
        assert not m.weight.requires_grad or m.weight.is_leaf


def test_iq2_xxs_tunes_superblock_scales_only():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    plan = {n: "iq2_xxs" for n in uniform_plan(student, "q4_0") if n.endswith("down_proj")}
    quantize_rtn(student, plan, progress=False)
    q = student.model.layers[0].mlp.down_proj
    ls_before = q.fmt.unpack(q.quantized())[1]["ls"]
    rep = finetune(student, teacher, _samples(), FinetuneConfig(epochs=1, lr=1e-2), device="cpu", progress=False)
    q = student.model.layers[0].mlp.down_proj
    assert torch.equal(q.fmt.unpack(q.quantized())[1]["ls"], ls_before)
    n_norm = sum(m.weight.numel() for m in norm_modules(student).values())
    n_d = sum(m.out_features * -(-m.in_features // 256) for n, m in student.named_modules() if n in plan)
    assert rep.tuned_values == n_norm + n_d


def test_failure_leaves_the_model_untouched():
    teacher, student = _quantized()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(LowbitError, match="non-finite"):
        finetune(student, teacher, _samples(), FinetuneConfig(epochs=1, lr=1e30), device="cpu", progress=False)
    # the first step is finite; the huge step makes the second one non-finite, after parameters moved
    assert all(type(m) is not ScaleTunedLinear for m in student.modules())
    after = student.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_bad_settings_are_refused():
    teacher, student = _quantized()
    with pytest.raises(LowbitError, match="epochs"):
        finetune(student, teacher, _samples(), FinetuneConfig(epochs=0), progress=False)
    with pytest.raises(LowbitError, match="seqlen"):
        finetune(student, teacher, torch.zeros(5, dtype=torch.long), progress=False)
    with pytest.raises(LowbitError, match="no quantized"):
        finetune(copy.deepcopy(teacher), teacher, _samples(), progress=False)


def test_pipeline_ft_suffix(tiny_tokenizer, text_file):
    from lowbit.algorithms.sequential import CalibConfig
    from lowbit.api import quantize
    from lowbit.calibration.samples import calibration_samples
    from lowbit.recipe import Recipe

    r = Recipe.parse("gptq_act+fused+ft:q4_0")
    assert (r.method, r.rotate, r.fuse_rotation, r.finetune) == ("gptq_act", False, True, FinetuneConfig())
    assert str(Recipe.parse("gptq+ft:q4_0")) == "gptq+ft:q4_0"
    model = sharpen_llama(make_model("llama", vocab=len(tiny_tokenizer))).float()
    teacher = copy.deepcopy(model)
    calib = CalibConfig(16, 32, text_file)
    ft = quantize(model, Recipe("int3_g32_sym", "gptq", finetune=FinetuneConfig(epochs=2, lr=3e-3), calib=calib),
                  tiny_tokenizer, device="cpu", progress=False).finetune
    assert ft.steps == 8 and ft.kl_last < ft.kl_first
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    plain = copy.deepcopy(teacher)
    quantize(plain, Recipe("int3_g32_sym", "gptq", calib=calib), tiny_tokenizer, device="cpu", progress=False)
    held_out = calibration_samples(tiny_tokenizer, 8, 32, text_file, seed=7)
    assert _kl(teacher, model, held_out) < 0.95 * _kl(teacher, plain, held_out)


def test_cli_finetune_quantize_and_export(tiny_model_dir, tmp_path, text_file):
    """--finetune on quantize records the tuning in lowbit.json; on export-gguf the file keeps its types and
    holds the tuned scales (read back, it equals the tuned model's weights)."""
    import json

    from lowbit.cli import main
    from lowbit.io.gguf_import import load_gguf_weights
    from lowbit.io.gguf_types import tensor_types
    from lowbit.io.loader import load_model

    calib = ["--nsamples", "8", "--calib-seqlen", "32", "--calib-text", text_file, "--device", "cpu", "--no-progress"]
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "--method", "gptq", "-o", str(out), "--finetune",
                 "--ft-epochs", "1", "--ft-batch", "4", *calib]) == 0
    info = json.loads((out / "lowbit.json").read_text())
    assert info["method"] == "gptq+ft" and info["finetune"]["steps"] == 2 and info["finetune"]["lr"] == 3e-3
    tuned, _ = load_model(out)
    plain = tmp_path / "plain.gguf"
    assert main(["export-gguf", str(out), "--out", str(plain)]) == 0
    gguf = tmp_path / "ft.gguf"
    assert main(["export-gguf", str(tiny_model_dir), "--format", "q4_0", "--method", "rtn", "--finetune",
                 "--ft-epochs", "1", "--out", str(gguf), *calib]) == 0
    assert set(tensor_types(gguf).values()) == set(tensor_types(plain).values()) == {"Q4_0", "F32", "F16"}
    base, _ = load_model(tiny_model_dir)
    back = load_gguf_weights(base, plain)
    w = tuned.model.layers[0].mlp.down_proj.dequantize()
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight.float(), w)


def test_cli_refuses_bad_tuning_settings_before_quantizing(tiny_model_dir, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "--method", "gptq", "-o", str(out), "--finetune",
                 "--ft-lr", "-1", "--no-progress"]) == 2
    assert "lr > 0" in capsys.readouterr().err and not out.exists() and not (tmp_path / "q.partial").exists()
