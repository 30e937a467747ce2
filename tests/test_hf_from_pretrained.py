"""transformers' ``AutoModelForCausalLM.from_pretrained`` on lowbit checkpoints (lowbit.io.hf_quantizer): tiny random
Llama/Qwen2 models quantized with scalar, codebook, k-quant, rotated (+rht, +fused) and mixed per-linear recipes
load with their QuantLinears and give the logits and greedy tokens of ``lowbit.load``; a checkpoint whose files
disagree is refused naming the tensor, before any weight is read; ``import lowbit`` registers the quantizer without
importing transformers or torch, whichever of the two is imported first.

Equality: with ``dtype=torch.float32`` both loaders build the same float32 model from the same fp16/packed tensors
and run the same QuantLinear code, so logits are compared bit for bit. Without a dtype, transformers computes in
the stored float16 (its "auto" dtype): that is checked against the float32 logits within float16 rounding.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lowbit
from conftest import make_model
from lowbit.errors import BadFileError, LowbitError
from lowbit.io import hf_register
from lowbit.models.quant_linear import QuantLinear
from lowbit.rotations.hadamard import hadamard_matrix
from lowbit.rotations.incoherence import hadamard_of
from lowbit.serve.generate import SamplingParams

PROMPT = "The quick brown fox"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
MIXED = {f"model.layers.{i}.{p}": fmt for i in range(2) for p, fmt in [
    ("self_attn.q_proj", "int2_g64_sym"), ("self_attn.k_proj", "q4_0"), ("self_attn.v_proj", "e8p_ch"),
    ("self_attn.o_proj", "iq2_xxs"), ("mlp.gate_proj", "q4_1"), ("mlp.up_proj", "int3_g32_asym"),
    ("mlp.down_proj", "nz2_ch")]}


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _checkpoint(path: Path, tok: Any, arch: str, recipe: lowbit.Recipe | str) -> Path:
    model = _tied_llama() if arch == "tied_llama" else make_model(arch)
    result = lowbit.quantize(model, recipe, tok, device="cpu", progress=False)
    return lowbit.save(model, tok, path, result=result)


@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("hf") / "q4", tiny_tokenizer, "llama", "rtn+rht:q4_0")


def _logits(model: torch.nn.Module, tok: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(tok(PROMPT, return_tensors="pt").input_ids).logits


@pytest.mark.parametrize("arch,recipe", [
    ("llama", "rtn:q4_0"),
    ("llama", "rtn+rht:int2_g64_sym"),
    ("qwen2", "rtn+rht:e8p_ch"),  # q/k/v biases, vector codebook, rotated
    ("tied_llama", "rtn:iq2_xxs"),  # lm_head tied to the embeddings, stored once
    ("llama", "rtn+fused:q4_k"),  # folded rotation: an ordinary model with untied head
    ("llama", lowbit.Recipe(MIXED, rotate=True)),  # a different format per linear, all rotated
])
def test_from_pretrained_equals_lowbit_load(tmp_path: Path, tiny_tokenizer: Any, arch: str, recipe: Any) -> None:
    path = _checkpoint(tmp_path / "q", tiny_tokenizer, arch, recipe)
    info = json.loads((path / "lowbit.json").read_text())
    hadamard_of.cache_clear()  # rotations built afresh inside transformers' meta-device, model-dtype init
    hadamard_matrix.cache_clear()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref, _ = lowbit.load(path, device="cpu")

    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.format_name for n, m in linears.items()} == info["formats"]
    assert {n: m.rotation.to_json() for n, m in linears.items() if m.rotation} == info["rotations"]
    assert model.config.quantization_config.quant_method == "lowbit"
    assert torch.equal(_logits(model, tiny_tokenizer), _logits(ref, tiny_tokenizer))

    ids = tiny_tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, ref.generate(ids, max_new_tokens=8, do_sample=False))
    text = "".join(lowbit.generate(ref, tiny_tokenizer, PROMPT, params=SamplingParams(temperature=0,
                                                                                         max_new_tokens=8)))
    assert tiny_tokenizer.decode(tokens[0, ids.shape[1]:]) == text


def test_default_dtype_is_the_stored_float16(q4: Path, tiny_tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(q4, dtype="auto")  # the checkpoint's float16 (5.x default)
    assert model.dtype == torch.float16
    q = model.model.layers[0].self_attn.q_proj
    assert {k: v.dtype for k, v in q.state_dict().items()} == {"codes": torch.uint8, "scale": torch.float16}
    ref, _ = lowbit.load(q4, device="cpu")
    want = _logits(ref, tiny_tokenizer)
    torch.testing.assert_close(_logits(model, tiny_tokenizer).float(), want, atol=5e-3, rtol=1e-2)


def test_disagreeing_tensor_is_named_before_any_weight_is_read(tmp_path: Path, q4: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in q4.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    info = json.loads((bad / "lowbit.json").read_text())
    info["formats"]["model.layers.1.mlp.up_proj"] = "int2_g64_sym"  # same buffer names, other packed shapes
    (bad / "lowbit.json").write_text(json.dumps(info))
    with pytest.raises(BadFileError) as lowbit_error:
        lowbit.load(bad, device="cpu")

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr("transformers.modeling_utils.PreTrainedModel._load_pretrained_model", no_load)
    with pytest.raises(BadFileError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.codes has shape") as hf_error:
        AutoModelForCausalLM.from_pretrained(bad)
    assert str(hf_error.value) == str(lowbit_error.value)  # one check, one message, both loaders


def test_missing_lowbit_json_is_refused(tmp_path: Path, q4: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((q4 / name).read_bytes())
    with pytest.raises(LowbitError, match="no lowbit.json"):
        AutoModelForCausalLM.from_pretrained(bare)


def test_checkpoint_without_quantization_config(tmp_path: Path, q4: Path, tiny_tokenizer: Any) -> None:
    """Saved before config.json carried it: lowbit.load as ever, from_pretrained with the config passed."""
    old = tmp_path / "old"
    old.mkdir()
    for f in q4.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    ref, _ = lowbit.load(old, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32, quantization_config=lowbit.LowbitConfig())
    assert torch.equal(_logits(model, tiny_tokenizer), _logits(ref, tiny_tokenizer))


def test_version_1_e8p_codes_are_converted_on_load(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Checkpoint version 1 stored E8P's codes themselves; both loaders put them in the stored order of version 2."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.formats import e8p

    new = _checkpoint(tmp_path / "v2", tiny_tokenizer, "llama", "rtn+rht:e8p_ch")
    old = tmp_path / "v1"
    old.mkdir()
    for f in new.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    with safe_open(str(new / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    codes = [k for k in tensors if k.endswith(".codes")]
    assert len(codes) == 14  # every linear of the two layers is E8P
    for k in codes:
        stored = tensors[k]
        tensors[k] = e8p.from_stored(stored).to(torch.int16)  # the codes' 16 bits, as version 1 held them
        assert not torch.equal(tensors[k], stored)
    save_file(tensors, str(old / "model.safetensors"), metadata=meta)
    for name in ("lowbit.json", "config.json"):
        text = (old / name).read_text()
        assert '"checkpoint_version": 2' in text
        (old / name).write_text(text.replace('"checkpoint_version": 2', '"checkpoint_version": 1'))
    want = _logits(lowbit.load(new, device="cpu")[0], tiny_tokenizer)
    assert torch.equal(_logits(lowbit.load(old, device="cpu")[0], tiny_tokenizer), want)
    model = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
    assert torch.equal(_logits(model, tiny_tokenizer), want)


def test_save_goes_through_lowbit_save(tmp_path: Path, q4: Path, tiny_tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(q4, dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "hf")
    again = lowbit.save(model, tiny_tokenizer, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["quantization_config"]["quant_method"] == "lowbit"
    reloaded = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32)
    assert torch.equal(_logits(reloaded, tiny_tokenizer), _logits(model, tiny_tokenizer))


def test_the_docs_example_runs(q4: Path, capsys: pytest.CaptureFixture) -> None:
    section = DOCS.read_text().split("### Using lowbit checkpoints from transformers\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert '"out/smol-q4_0"' in code
    exec(compile(code.replace('"out/smol-q4_0"', repr(str(q4))), "docs/formats.md", "exec"), {})
    ref, _ = lowbit.load(q4, device="cpu")
    tok = AutoTokenizer.from_pretrained(q4)  # as the example loads it
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert capsys.readouterr().out == tok.decode(ref.generate(ids, max_new_tokens=12, do_sample=False)[0]) + "\n"


@pytest.mark.parametrize("first", [
    "import lowbit, sys; assert not {'torch', 'transformers'} & set(sys.modules), 'import lowbit imported them'",
    "import transformers.quantizers.auto; import lowbit",
    "import lowbit; lowbit.LowbitConfig",  # the quantizer module imported before transformers' registry
])
def test_import_lowbit_registers_the_quantizer(first: str) -> None:
    check = ("from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as q, "
             "AUTO_QUANTIZATION_CONFIG_MAPPING as c\n"
             "assert q['lowbit'].__name__ == 'LowbitHfQuantizer' and c['lowbit'].__name__ == 'LowbitConfig'")
    out = subprocess.run([sys.executable, "-W", "error", "-c", f"{first}\n{check}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_failed_registration_warns_and_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise ImportError("cannot import name 'register_quantizer'")

    monkeypatch.setattr(hf_register.importlib, "import_module", broken)
    with pytest.warns(UserWarning, match="cannot load lowbit checkpoints through from_pretrained"):
        hf_register._register()
