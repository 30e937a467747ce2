"""Damaged artifacts never crash lowbit: real checkpoints written by lowbit from a tiny random Llama (a quantized
lowbit checkpoint and a float HF directory) are truncated, bit-flipped, replaced, their JSON edited and their
tensors reshaped, and every load either gives a model that runs or raises a LowbitError; a failed convert leaves
nothing behind; through the CLI the same damage is exit code 2 and one line on stderr."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from conftest import SAMPLE_TEXT, make_model
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.cli import main
from lowbit.errors import BadFileError, LowbitError
from lowbit.io.checkpoint import save_quantized
from lowbit.io.loader import load_model
from lowbit.models.walker import round_to_storage

FUZZ = settings(derandomize=True, max_examples=30, deadline=None)
WEIGHTS = "model.safetensors"
FORMATS = ["q4_0", "q8_0", "int3_g32_asym", "int4_ch_sym", "iq2_xxs", "e8p_g256", "nf4", "int9_g32_sym",
           "int4_g7_sym", ""]
ODD_VALUES = [None, "x", -1, 0, 1, 2.5, True, [], {}, [1, 2], 10**6]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    """A float HF directory and a quantized lowbit checkpoint (two formats, rotated linears) of one tiny Llama."""
    root = tmp_path_factory.mktemp("pristine")
    model = round_to_storage(make_model("llama", vocab=len(tiny_tokenizer)))
    model.save_pretrained(root / "float")
    tiny_tokenizer.save_pretrained(root / "float")
    plan = {n: ("q4_0" if i % 2 else "int3_g32_asym") for i, n in enumerate(uniform_plan(model, "q4_0"))}
    quantize_rtn(model, plan, progress=False, rotate=True, seed=3)
    save_quantized(model, tiny_tokenizer, root / "quant")
    return {"float": root / "float", "quant": root / "quant"}


# --------------------------------------------------------------------------------------------------------- damage


def _truncate(path: Path, frac: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(frac * len(data))])


def _flip(path: Path, flips: list[tuple[float, int]]) -> None:
    data = bytearray(path.read_bytes())
    for frac, xor in flips:
        if data:
            data[min(int(frac * len(data)), len(data) - 1)] ^= xor
    path.write_bytes(bytes(data))


def _edit_json(path: Path, data: st.DataObject) -> None:
    obj = json.loads(path.read_text())
    target, key = obj, data.draw(st.sampled_from(sorted(obj)), label="key")
    if isinstance(obj[key], dict) and obj[key] and data.draw(st.booleans(), label="nested"):
        target, key = obj[key], data.draw(st.sampled_from(sorted(obj[key])), label="nested key")
    action = data.draw(st.sampled_from(["delete", "odd", "scale", "format", "rotation"]), label="action")
    value = target[key]
    if action == "delete":
        del target[key]
    elif action == "odd":
        target[key] = data.draw(st.sampled_from(ODD_VALUES), label="value")
    elif action == "scale" and isinstance(value, int) and not isinstance(value, bool):
        target[key] = value * data.draw(st.sampled_from([2, 0, -1]), label="factor") + data.draw(
            st.integers(0, 1), label="offset")
    elif action == "format":
        target[key] = data.draw(st.sampled_from(FORMATS), label="format")
    elif action == "rotation":
        target[key] = data.draw(st.sampled_from([[1, 2], [None, 5], [-1, 0], [1], "x", None]), label="seeds")
    path.write_text(json.dumps(obj))


def _edit_tensors(path: Path, data: st.DataObject) -> None:
    state = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(state)), label="tensor")
    t = state.pop(key)
    action = data.draw(st.sampled_from(["transpose", "flatten", "shrink", "cast", "delete", "rename", "extra"]),
                       label="tensor action")
    if action == "transpose" and t.dim() == 2:
        t = t.t().contiguous()
    elif action == "flatten":
        t = t.reshape(-1)
    elif action == "shrink" and t.shape[0] > 1:
        t = t[:-1].contiguous()
    elif action == "cast":
        t = t.to(data.draw(st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.float16]), label="dtype"))
    elif action == "rename":
        key = key + ".renamed"
    elif action == "extra":
        state["extra.weight"] = torch.zeros(3)
    if action != "delete":
        state[key] = t
    save_file(state, str(path), metadata={"format": "pt"})


FAMILIES = {"bytes": ["truncate", "flip", "random"], "json": ["json"], "tensors": ["tensors"]}


def damage(d: Path, data: st.DataObject, files: list[str], family: str) -> str:
    """Damage one file of the directory ``d`` as ``data`` draws it, with one of the ``family``'s kinds of damage;
    returns what was done (for the statistics and failure reports)."""
    kinds = FAMILIES[family]
    kind = data.draw(st.sampled_from(kinds), label="damage")
    suffix = {"json": ".json", "tensors": ".safetensors"}.get(kind, "")
    name = data.draw(st.sampled_from([f for f in files if f.endswith(suffix)]), label="file")
    path = d / name
    if kind == "truncate":
        _truncate(path, data.draw(st.floats(0, 1, exclude_max=True), label="offset"))
    elif kind == "flip":
        where = st.one_of(st.floats(0, 0.03), st.floats(0, 1, exclude_max=True))  # the header is the first few %
        _flip(path, data.draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=8), label="flips"))
    elif kind == "random":
        path.write_bytes(data.draw(st.binary(max_size=2048), label="bytes"))
    elif kind == "json":
        _edit_json(path, data)
    else:
        _edit_tensors(path, data)
    return f"{kind} {name}"


def loads_and_runs(d: Path) -> bool:
    """True when ``d`` loads into a model whose forward runs; False on a LowbitError; anything else fails."""
    try:
        model, _ = load_model(d)
    except LowbitError:
        return False
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[:2] == (1, 4)
    return True


def in_copy(src: Path, fn: Callable[[Path], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / src.name
        shutil.copytree(src, d)
        fn(d)


# --------------------------------------------------------------------------------------------------------- fuzzing


def test_pristine_artifacts_load(pristine: dict[str, Path]) -> None:
    assert loads_and_runs(pristine["quant"]) and loads_and_runs(pristine["float"])


@pytest.mark.parametrize("family, examples", [("bytes", 50), ("json", 80), ("tensors", 30)])
def test_damaged_quantized_checkpoint_loads_or_raises_lowbit_error(pristine: dict[str, Path], family: str,
                                                                    examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        def check(d: Path) -> None:
            what = damage(d, data, [WEIGHTS, "lowbit.json", "config.json"], family)
            event(f"{what}: {'loads' if loads_and_runs(d) else 'LowbitError'}")  # --hypothesis-show-statistics

        in_copy(pristine["quant"], check)

    fuzz()


@pytest.mark.parametrize("family, examples", [("bytes", 25), ("json", 40), ("tensors", 20)])
def test_damaged_float_dir_converts_or_raises_lowbit_error_leaving_nothing(pristine: dict[str, Path], family: str,
                                                                           examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        def check(d: Path) -> None:
            what = damage(d, data, [WEIGHTS, "config.json"], family)
            out = d.parent / "out" / "q"
            try:
                lowbit.convert(d, "q4_0", out, device="cpu", progress=False)
            except LowbitError:
                event(f"{what}: LowbitError")
                assert not out.exists()
                assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no half-written temporaries
                return
            event(f"{what}: converted")
            assert loads_and_runs(out)

        in_copy(pristine["float"], check)

    fuzz()


# ------------------------------------------------------------------------------------------- specific, through CLI


def _rewrite_json(path: Path, **fields: Any) -> None:
    obj = json.loads(path.read_text())
    obj.update(fields)
    path.write_text(json.dumps(obj))


def _set_format(d: Path, fmt: str) -> None:
    formats = json.loads((d / "lowbit.json").read_text())["formats"]
    _rewrite_json(d / "lowbit.json", formats={**formats, "model.layers.0.mlp.up_proj": fmt})


def _nan_scale(path: Path) -> None:
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("down_proj.scale"))
    state[key][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


def _reshape_first_linear(path: Path) -> None:
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(path), metadata={"format": "pt"})


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # id: (which pristine dir, what to do to it, what the one error line says)
    "truncated-quant-weights": ("quant", lambda d: _truncate(d / WEIGHTS, 0.5), "model.safetensors is truncated"),
    "random-quant-weights": ("quant", lambda d: (d / WEIGHTS).write_bytes(bytes(range(256)) * 4), WEIGHTS),
    "truncated-lowbit-json": ("quant", lambda d: _truncate(d / "lowbit.json", 0.5), "lowbit.json is not valid JSON"),
    "unknown-format": ("quant", lambda d: _set_format(d, "nf4"), "unknown format"),
    "wrong-format": ("quant", lambda d: _set_format(d, "q8_0"), "model.layers.0.mlp.up_proj"),
    "nan-scale": ("quant", lambda d: _nan_scale(d / WEIGHTS), "down_proj.scale has 1 NaN/Inf values"),
    "config-vs-weights": ("quant", lambda d: _rewrite_json(d / "config.json", intermediate_size=96),
                          "config.json"),
    "truncated-float-weights": ("float", lambda d: _truncate(d / WEIGHTS, 0.3), "model.safetensors is truncated"),
    "float-config-vs-weights": ("float", lambda d: _rewrite_json(d / "config.json", hidden_size=32), "config.json"),
    "float-tensor-shape": ("float", lambda d: _reshape_first_linear(d / WEIGHTS), "q_proj.weight has shape"),
    "float-config-type": ("float", lambda d: _rewrite_json(d / "config.json", rms_norm_eps="small"), "rms_norm_eps"),
    "float-layers": ("float", lambda d: _rewrite_json(d / "config.json", num_hidden_layers=10**9), "num_hidden_layers"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_one_line_and_exit_2_through_the_cli(case: str, pristine: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    which, fn, message = DAMAGE[case]
    d = tmp_path / which
    shutil.copytree(pristine[which], d)
    fn(d)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    if which == "float":
        argv = ["quantize", str(d), "-f", "q4_0", "-o", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    else:
        argv = ["eval", str(d), "--text", str(text), "--seqlen", "16", "--max-windows", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1 and message in err, err  # before loading
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([which, "text.txt"])


def test_shape_mismatch_names_file_and_tensor(pristine: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "float"
    shutil.copytree(pristine["float"], d)
    _reshape_first_linear(d / WEIGHTS)
    with pytest.raises(BadFileError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.weight "
                                           r"has shape \[63, 64\], but config\.json gives \[64, 64\]"):
        load_model(d)
