"""The public API at the package root: names, Recipe, and a quantize -> evaluate -> save -> load round trip."""

from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import make_model
from lowbit.errors import LowbitError
from lowbit.models.walker import round_to_storage
from lowbit.recipe import Recipe, Variant


def test_every_export_resolves_to_what_it_names() -> None:
    for name in lowbit.__all__:
        value = getattr(lowbit, name)
        assert not isinstance(value, types.ModuleType), f"lowbit.{name} is a module"
    importlib.import_module("lowbit.comparison")  # importing a submodule must not shadow an exported function
    assert callable(lowbit.compare) and inspect.isfunction(lowbit.compare)


@pytest.mark.parametrize("name", ["load", "quantize", "save", "evaluate", "export_gguf", "generate", "convert",
                                  "convert_gguf", "compare", "Recipe"])
def test_public_functions_have_an_example(name: str) -> None:
    assert ">>>" in (getattr(lowbit, name).__doc__ or ""), f"lowbit.{name} has no example in its docstring"


@pytest.mark.parametrize("spec", ["gptq_act+rht+ft:q4_0", "rtn:iq2_xxs", "imatrix+fused:int3_g64_sym",
                                  "gptq+rht:nz2_ch/int4_g128_sym@2.5bpw"])
def test_recipe_string_round_trip(spec: str) -> None:
    r = Recipe.parse(spec)
    assert str(r) == spec and Recipe.parse(str(r)) == r


def test_recipe_is_checked_when_built() -> None:
    with pytest.raises(LowbitError, match="unknown method"):
        Recipe("q4_0", method="awq")
    with pytest.raises(LowbitError, match="unknown format|nope"):
        Recipe("nope")
    with pytest.raises(LowbitError, match="act-order needs a scalar format"):
        Recipe.parse("gptq_act:iq2_xxs")
    with pytest.raises(LowbitError, match="no format"):
        Recipe.parse("gptq_act:")
    with pytest.raises(LowbitError, match="calibration needs"):
        lowbit.CalibConfig(nsamples=0)
    with pytest.raises(LowbitError, match="empty plan"):
        Recipe({})
    with pytest.raises(AttributeError):
        Recipe("q4_0").method = "gptq"  # type: ignore[misc]


def test_plan_recipe_is_frozen_and_described() -> None:
    plan = {"model.layers.0.mlp.down_proj": "q4_0", "model.layers.0.mlp.up_proj": "q8_0"}
    r = Recipe(plan, method="gptq")
    plan["model.layers.0.mlp.up_proj"] = "q4_1"  # the recipe keeps its own copy
    assert r.format["model.layers.0.mlp.up_proj"] == "q8_0"
    assert str(r) == "gptq:plan(2 linears: q4_0, q8_0)" and r.needs_calibration


def test_variant_grammar() -> None:
    assert Variant.parse("fp16").is_baseline
    v = Variant.parse("int4_g32_sym+kv4")
    assert str(v.recipe) == "rtn:int4_g32_sym" and v.sim.kv_bits == 4 and not v.is_baseline


def test_quantize_evaluate_save_load_round_trip(tiny_tokenizer, text_file, tmp_path: Path) -> None:
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))  # as lowbit.load gives it
    reference = make_model("llama", vocab=len(tiny_tokenizer))
    reference.load_state_dict(model.state_dict())
    recipe = Recipe("int4_g32_sym", method="gptq", calib=lowbit.CalibConfig(nsamples=4, seqlen=32, text_path=text_file))
    result = lowbit.quantize(model, recipe, tiny_tokenizer, device="cpu", progress=False)
    assert result.recipe == recipe and result.size.linear_bpw == pytest.approx(4.5)
    assert "gptq:int4_g32_sym: 4.5000 bits/weight" in result.summary()

    same = lowbit.evaluate(reference, tiny_tokenizer, text_file=text_file, seqlen=32, reference=reference,
                           progress=False)
    # repeated windows are served from the float16 cache: near-ties of a random model may flip
    assert same.kl == pytest.approx(0.0, abs=1e-5) and same.top1 > 0.98
    res = lowbit.evaluate(model, tiny_tokenizer, text_file=text_file, seqlen=32, reference=reference,
                          progress=False)
    assert res.kl > 0 and 0 < res.top1 <= 1 and "KL" in str(res)

    out = lowbit.save(model, tiny_tokenizer, tmp_path / "q", result=result)
    info = (out / "lowbit.json").read_text()
    assert '"recipe": "gptq:int4_g32_sym"' in info and '"nsamples": 4' in info
    loaded, _ = lowbit.load(out, device="cpu")
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_quantize_refuses_calibration_without_tokenizer() -> None:
    with pytest.raises(LowbitError, match="pass the tokenizer"):
        lowbit.quantize(make_model("llama", vocab=320), "gptq:q4_0", progress=False)


def test_convert_gguf_checks_before_work(tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"")
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.convert_gguf(None, out, "q4_0")


def test_compare_rows(tiny_tokenizer, text_file) -> None:
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))
    calib = lowbit.CalibConfig(nsamples=4, seqlen=32, text_path=text_file)
    kept = {}
    rows, protocol = lowbit.compare(model, tiny_tokenizer, ["int4_g32_sym", "int4_g32_sym+a8", "gptq:int3_g32_sym"],
                                    seqlen=32, text_path=text_file, progress=False, calib=calib,
                                    on_model=lambda r, m: kept.__setitem__(r.variant, m))
    assert [r.variant for r in rows] == ["fp16", "int4_g32_sym", "int4_g32_sym+a8", "gptq:int3_g32_sym"]
    assert rows[0].kl == pytest.approx(0.0, abs=1e-5) and rows[0].delta_pct == 0.0
    assert all(r.kl > 0 for r in rows[1:]) and rows[3].linear_bpw == pytest.approx(3.5)
    assert rows[2].quant_s == rows[1].quant_s  # the simulated-activation row reuses the same quantization
    assert protocol["seqlen"] == 32 and set(kept) == {r.variant for r in rows}
    with pytest.raises(LowbitError, match="unknown"):  # a bad name fails before any work
        lowbit.compare(model, tiny_tokenizer, ["int4_g32_sym", "int9_nope"], seqlen=32, text_path=text_file)


def test_demo_picks_the_smallest_good_model() -> None:
    from lowbit.comparison import Row
    from lowbit.demo import GOOD_KL, smallest_good

    def row(name: str, mb: float, kl: float) -> Row:
        return Row(name, 4.0, mb, 0.0, mb, 20.0, 0.0, 0.0, 0.0, kl, 0.9)

    rows = [row("fp16", 269, 0.0), row("a", 116, 0.05), row("b", 99, GOOD_KL / 2), row("c", 84, 2 * GOOD_KL)]
    assert smallest_good(rows, {"a", "b", "c"}).variant == "b"
    assert smallest_good([row("c", 84, 2 * GOOD_KL), row("d", 90, 3 * GOOD_KL)], {"c", "d"}).variant == "c"


def test_load_auto_dtype_follows_the_device_and_the_model(tiny_model_dir, tiny_tokenizer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' on CUDA: float16 for a lowbit checkpoint (the GEMVs' activations), a float model's own float16 or
    bfloat16 (float16 for one stored in float32); float32 on a CPU. Anything but a torch dtype or 'auto' is refused
    before loading. (Only the choice is made here: no GPU needed.)"""
    import json

    from lowbit.io import loader
    from lowbit.io.loader import decode_dtype, load_config

    def config_of(path: Path) -> object:
        return load_config(path)[1]

    assert decode_dtype(config_of(tiny_model_dir), "cpu") == torch.float32
    assert decode_dtype(config_of(tiny_model_dir), "cuda") == torch.float16  # saved in float32
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    (tiny_model_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert decode_dtype(config_of(tiny_model_dir), torch.device("cuda", 1)) == torch.bfloat16
    model = make_model("llama", vocab=len(tiny_tokenizer))
    out = lowbit.save(model, tiny_tokenizer, tmp_path / "q", result=lowbit.quantize(model, "q4_0", progress=False))
    loaded, _ = lowbit.load(out, device="cpu", dtype="auto")
    assert next(loaded.parameters()).dtype == torch.float32
    asked = []  # what a lowbit checkpoint is loaded in on CUDA (the load itself stopped there: no GPU needed)
    monkeypatch.setattr(loader, "load_quantized", lambda src, dtype, device: asked.append(dtype) or (None, None))
    loader.load_model(out, dtype="auto", device="cuda")
    assert asked == [torch.float16]
    model, _ = lowbit.load(tiny_model_dir, device="cpu", dtype="auto")
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(LowbitError, match="dtype must be a torch dtype or 'auto'"):
        lowbit.load(tiny_model_dir, device="cpu", dtype="float16")


@pytest.mark.parametrize("fmt", ["q4_0", "nz2_ch", "iq2_xxs"])
def test_a_quantized_model_halved_is_its_checkpoint_loaded_in_float16(fmt: str, tiny_tokenizer, tmp_path: Path) -> None:
    """model.half() on a model just quantized (what the slow-dtype note suggests for one in memory) gives the logits
    of its checkpoint loaded with dtype=torch.float16, bit for bit."""
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))
    out = lowbit.save(model, tiny_tokenizer, tmp_path / "q", result=lowbit.quantize(model, fmt, progress=False))
    loaded, _ = lowbit.load(out, device="cpu", dtype=torch.float16)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.half()(ids).logits, loaded(ids).logits)


def test_fast_decoding_says_when_a_cuda_model_computes_in_another_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with packed linears on CUDA in float32 or bfloat16 would decode its matmuls on slower kernels than
    in float16: fast decoding says so (and how to load it), and says nothing for float16, a CPU, or a float
    model."""
    from types import SimpleNamespace

    from lowbit.serve import generate

    class Packed(torch.nn.Linear):
        pass

    monkeypatch.setattr(generate, "QuantLinear", Packed)

    def on(device: str, dtype: torch.dtype, packed: bool = True) -> torch.nn.Module:
        model = torch.nn.Sequential(Packed(4, 4) if packed else torch.nn.Linear(4, 4))
        fake = SimpleNamespace(device=torch.device(device), dtype=dtype)
        model.parameters = lambda: iter([fake])
        return model

    note = generate.slow_dtype_note(on("cuda", torch.float32))
    assert "computes in float32" in note and "dtype='auto'" in note and "model.half()" in note
    assert "bfloat16" in generate.slow_dtype_note(on("cuda", torch.bfloat16))
    assert generate.slow_dtype_note(on("cuda", torch.float16)) is None
    assert generate.slow_dtype_note(on("cpu", torch.float32)) is None
    assert generate.slow_dtype_note(on("cuda", torch.float32, packed=False)) is None
    with pytest.warns(UserWarning, match="computes in float32"):
        assert generate.fast_or_loop(on("cuda", torch.float32), True, True, False, lambda: "decoder", "") == "decoder"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_checkpoint_loaded_to_generate_on_cuda_decodes_on_the_cuda_gemv(tiny_tokenizer, tmp_path: Path) -> None:
    """lowbit.load(..., dtype='auto') on CUDA (what lowbit generate and serve do): float16, every packed linear's
    batch-1 matmul routed to the CUDA GEMV, and generation without the slow-dtype warning."""
    import warnings

    from lowbit.kernels import dispatch
    from lowbit.models.quant_linear import QuantLinear
    from lowbit.serve.generate import SamplingParams

    model = make_model("llama", vocab=len(tiny_tokenizer))
    result = lowbit.quantize(model, "q4_0", device="cpu", progress=False)
    out = lowbit.save(model, tiny_tokenizer, tmp_path / "q", result=result)
    loaded, tok = lowbit.load(out, device="cuda", dtype="auto")
    assert next(loaded.parameters()).dtype == torch.float16
    linears = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert linears
    for q in linears:
        x = torch.randn(1, q.in_features, device="cuda", dtype=torch.float16)
        assert dispatch.route(x, q.fmt, q.quantized().shape) == "cuda"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the model computes in")
        text = "".join(lowbit.generate(loaded, tok, "hello", params=SamplingParams(max_new_tokens=4, temperature=0)))
    assert isinstance(text, str)
