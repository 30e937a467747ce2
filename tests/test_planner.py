import json

import pytest
import torch

from lowbit.api import quantize
from lowbit.errors import LowbitError
from lowbit.eval.sizes import model_size
from lowbit.planner import parse_memory, read_shapes, run_plan, runtime_bytes, stored_bytes
from lowbit.recipe import Recipe


def _llama(hidden: int, layers: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def model_dirs(tmp_path):
    dirs = {}
    for name, hidden, layers, tie in (("small", 64, 2, True), ("big", 128, 3, False)):
        d = tmp_path / name
        _llama(hidden, layers, tie).config.save_pretrained(d)  # config only: the planner never reads weights
        dirs[name] = d
    return dirs


@pytest.mark.parametrize("name, hidden, layers, tie, fmt", [
    ("small", 64, 2, True, None), ("small", 64, 2, True, "int3_g128_sym"), ("small", 64, 2, True, "q4_0"),
    ("big", 128, 3, False, None), ("big", 128, 3, False, "int4_g32_asym"), ("big", 128, 3, False, "int2_g64_sym"),
])
def test_sizes_exact_against_quantized_models(model_dirs, fmt, name, hidden, layers, tie):
    shapes = read_shapes(str(model_dirs[name]))
    model = _llama(hidden, layers, tie)
    if fmt:
        quantize(model, Recipe(fmt), progress=False)
    assert stored_bytes(shapes, fmt) == model_size(model).total_bytes


def test_runtime_allowance_counts_kv_cache(model_dirs):
    shapes = read_shapes(str(model_dirs["big"]))
    kv = 2 * 3 * 2 * (128 // 4) * 2  # K and V, 3 layers, 2 kv heads, head_dim 32, fp16
    assert runtime_bytes(shapes, 1000) - runtime_bytes(shapes, 0) - 4 * 512 * shapes.act_width == kv * 1000


@pytest.mark.parametrize("text, value", [("4GB", 4 * 10**9), ("512MB", 512 * 10**6), ("4GiB", 4 * 2**30),
                                         ("1.5 gb", 1.5e9), ("100kib", 102400)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["4", "4XB", "", "-1GB", "0GB"])
def test_parse_memory_rejects(text):
    with pytest.raises(LowbitError, match="--memory"):
        parse_memory(text)


def test_recommendation_respects_budget(model_dirs, tmp_path):
    res = tmp_path / "quality-small.json"
    rows = [{"variant": "fp16", "linear_bpw": 16.0, "ppl": 20.0}, {"variant": "int4_g32_asym", "linear_bpw": 5.0,
            "ppl": 21.0}, {"variant": "int3_g128_sym", "linear_bpw": 3.135, "ppl": 30.0},
            {"variant": "int2_g64_sym", "linear_bpw": 2.25, "ppl": 200.0}]
    res.write_text(json.dumps({"header": "model: small; cpu", "rows": rows}))
    dirs = [str(model_dirs["small"]), str(model_dirs["big"])]
    fmts = "fp16,int8_g32_sym,int4_g32_asym,int4_g128_sym,int3_g128_sym,int2_g64_sym"
    big_fp16 = stored_bytes(read_shapes(dirs[1]), None) + runtime_bytes(read_shapes(dirs[1]), 64)
    budget_mb = (big_fp16 - 20_000) / 1e6  # just too small for big in fp16
    text = run_plan(dirs, f"{budget_mb}MB", context=64, formats=fmts, results=[str(res)],
                    fp16_ppl=["big=15"], show_all=True)
    rec = next(line for line in text.splitlines() if line.startswith("recommended:"))
    assert rec.startswith("recommended: big int8_g32_sym")  # the biggest format of the bigger model that fits
    table = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in text.splitlines()
             if line.startswith("| ")}
    assert "| no " in table[("big", "fp16")] and "| yes " in table[("big", "int8_g32_sym")]
    assert "measured (quality-small)" in table[("small", "int3_g128_sym")]
    assert "estimated: above the measured range" in table[("big", "int8_g32_sym")]
    assert "estimated: log-log between int3_g128_sym on small and int4_g32_asym" in table[("big", "int4_g128_sym")]
    assert "vs small" in text
    nothing = run_plan(dirs, "1KB", context=64, formats=fmts, results=[str(res)])
    assert "recommended: none" in nothing


def test_unknown_model_error(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        run_plan([str(tmp_path / "nope")], "4GB", results=[])
