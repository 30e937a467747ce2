"""GPTQ's per-layer checkpoint: a kill at any write point resumes to a bit-identical model."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SIGKILL_AT_SAVE, make_model
from lowbit.algorithms import sequential
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig, calibration_set, quantize_sequential
from lowbit.errors import LowbitError

FMT = "int3_g32_asym"


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small only lose from intra-op threads (by seconds per run on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_gptq(model, tok, text_file, fmt=FMT, nsamples=8, seqlen=32, **kw):
    calib = CalibConfig(nsamples=nsamples, seqlen=seqlen, text_path=text_file)
    return quantize_sequential(model, tok, uniform_plan(model, fmt), calib=calib, device="cpu",
                               progress=False, **kw)


def assert_same(a, b, what=""):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys(), what
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], what


def leftovers(ckpt):
    """The checkpoint and anything a (killed) run left beside it."""
    return sorted(p.name for p in ckpt.parent.iterdir() if p.name in (ckpt.name, f".{ckpt.name}")
                  or p.name.startswith(f".{ckpt.name}."))


def test_resume_after_crash_is_bit_identical(tiny_tokenizer, text_file, tmp_path):
    base = make_model("llama", vocab=len(tiny_tokenizer))
    clean = copy.deepcopy(base)
    run_gptq(clean, tiny_tokenizer, text_file)

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt  # as if Ctrl-C after layer 1 of 2 finished

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_gptq(copy.deepcopy(base), tiny_tokenizer, text_file, checkpoint_dir=ckpt, on_layer_done=crash)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0"]
    assert sorted(p.name for p in (ckpt / "step-0").iterdir()) == ["inputs.safetensors", "layer.safetensors",
                                                                   "state.json"]
    assert json.loads((ckpt / "step-0" / "state.json").read_text())["next_layer"] == 1

    resumed = copy.deepcopy(base)  # a fresh process: original weights again
    report = run_gptq(resumed, tiny_tokenizer, text_file, checkpoint_dir=ckpt)
    assert report.resumed_from_layer == 1
    assert not ckpt.exists()  # cleaned up after success
    assert_same(clean, resumed)


def test_resume_refuses_other_settings(tiny_tokenizer, text_file, tmp_path):
    def crash(i):
        raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_gptq(make_model("llama", vocab=len(tiny_tokenizer)), tiny_tokenizer, text_file,
                 checkpoint_dir=ckpt, on_layer_done=crash)
    with pytest.raises(LowbitError, match="other settings"):
        run_gptq(make_model("llama", vocab=len(tiny_tokenizer)), tiny_tokenizer, text_file,
                 fmt="int4_g32_sym", checkpoint_dir=ckpt)
    assert (ckpt / "step-0" / "inputs.safetensors").exists()  # a refused checkpoint is left as it was


class Killed(Exception):
    """Stands in for a kill at a write point."""


def instrument(mp, calls, kill_at=None, torn=True):
    """Record every write point of a run in ``calls``; at call ``kill_at`` raise Killed, either after a torn write
    (half a file; a rename simply does not happen) or, with ``torn=False``, right after the write completed."""
    real_save, real_write, real_replace, real_rename = (sequential.save_file, Path.write_text, os.replace,
                                                        os.rename)

    def point(label, write, tear):
        calls.append(label)
        if len(calls) != kill_at:
            return write()
        if torn:
            tear()
        else:
            write()
        raise Killed(f"write point {kill_at}: {label}")

    def save_file(tensors, filename, metadata=None):
        def tear():
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)

        return point(f"save_file {Path(filename).parent.name}/{Path(filename).name}",
                     lambda: real_save(tensors, filename, metadata=metadata), tear)

    def write_text(self, data, *a, **kw):
        return point(f"write_text {self.parent.name}/{self.name}", lambda: real_write(self, data, *a, **kw),
                     lambda: real_write(self, data[: len(data) // 2], *a, **kw))

    def renamer(real, name):
        def rename(src, dst, *a, **kw):
            what = Path(dst).name if Path(dst).name.startswith("step-") else "retire checkpoint"
            return point(f"{name} {what}", lambda: real(src, dst, *a, **kw), lambda: None)

        return rename

    mp.setattr(sequential, "save_file", save_file)
    mp.setattr(Path, "write_text", write_text)
    mp.setattr(os, "replace", renamer(real_replace, "os.replace"))
    mp.setattr(os, "rename", renamer(real_rename, "os.rename"))


def test_kill_at_every_write_point_resumes_bit_identical(tiny_tokenizer, text_file, tmp_path, monkeypatch):
    base = make_model("llama", vocab=len(tiny_tokenizer))
    kw = {"nsamples": 4, "seqlen": 16}
    clean = copy.deepcopy(base)
    calls = []
    with monkeypatch.context() as mp:
        instrument(mp, calls)
        run_gptq(clean, tiny_tokenizer, text_file, checkpoint_dir=tmp_path / "counted", **kw)
    step = ["save_file {i}.tmp/layer.safetensors", "save_file {i}.tmp/inputs.safetensors",
            "write_text {i}.tmp/state.json", "os.replace {i}"]
    assert calls == [c.format(i=f"step-{i}") for i in range(2) for c in step] + ["os.replace retire checkpoint"]

    for torn in (True, False):
        for k in range(1, len(calls) + 1):
            ckpt = tmp_path / f"ckpt-{'torn' if torn else 'done'}-{k}"
            with monkeypatch.context() as mp, pytest.raises(Killed):
                instrument(mp, [], kill_at=k, torn=torn)
                run_gptq(copy.deepcopy(base), tiny_tokenizer, text_file, checkpoint_dir=ckpt, **kw)
            done = calls[: k if not torn else k - 1]  # the writes that completed
            committed = sum(c.startswith("os.replace step-") for c in done)
            resumed = copy.deepcopy(base)
            report = run_gptq(resumed, tiny_tokenizer, text_file, checkpoint_dir=ckpt, **kw)
            what = f"kill at write point {k} ({calls[k - 1]}, {'torn' if torn else 'after it'})"
            assert report.resumed_from_layer == (0 if "os.replace retire checkpoint" in done else committed), what
            assert_same(clean, resumed, what)
            assert leftovers(ckpt) == [], what


_KILLED_CHILD = SIGKILL_AT_SAVE + """
sys.path.insert(0, args["tests"])
from conftest import make_model
from lowbit.algorithms.plans import uniform_plan
model = make_model("llama", vocab=args["vocab"])
sequential.quantize_sequential(model, None, uniform_plan(model, args["fmt"]),
                               calib=sequential.CalibConfig(**args["calib"]), device="cpu", progress=False,
                               samples=torch.load(args["samples"]), checkpoint_dir=args["ckpt"])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_write_resumes_bit_identical(tiny_tokenizer, text_file, tmp_path):
    base = make_model("llama", vocab=len(tiny_tokenizer))
    calib = {"nsamples": 4, "seqlen": 16, "text_path": text_file}
    samples = calibration_set(base, tiny_tokenizer, CalibConfig(**calib))
    torch.save(samples, tmp_path / "samples.pt")

    def run(model, **kw):
        return quantize_sequential(model, None, uniform_plan(model, FMT), calib=CalibConfig(**calib), device="cpu",
                                   progress=False, samples=samples, **kw)

    clean = copy.deepcopy(base)
    run(clean)
    ckpt = tmp_path / "ckpt"
    args = {"tests": str(Path(__file__).parent), "vocab": len(tiny_tokenizer), "fmt": FMT, "calib": calib,
            "samples": str(tmp_path / "samples.pt"), "ckpt": str(ckpt), "kill_at": 4}  # 4: layer 1's inputs
    out = subprocess.run([sys.executable, "-c", _KILLED_CHILD, json.dumps(args)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0", "step-1.tmp"]

    resumed = copy.deepcopy(base)
    assert run(resumed, checkpoint_dir=ckpt).resumed_from_layer == 1
    assert_same(clean, resumed)
    assert leftovers(ckpt) == []


def test_unusable_checkpoints_are_refused(tiny_tokenizer, text_file, tmp_path):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    old = tmp_path / "old"  # layout 1: flat layer_<i>.safetensors, inputs.safetensors, state.json
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"fingerprint": "x", "next_layer": 1, "stats": {}}))
    with pytest.raises(LowbitError, match="older, non-atomic layout"):
        run_gptq(model, tiny_tokenizer, text_file, checkpoint_dir=old)

    bad = tmp_path / "bad"
    (bad / "step-0").mkdir(parents=True)
    (bad / "step-0" / "state.json").write_text('{"layout": 2, "finger')  # cannot come from a kill; refused anyway
    with pytest.raises(LowbitError, match="unreadable"):
        run_gptq(model, tiny_tokenizer, text_file, checkpoint_dir=bad)
    assert all(not isinstance(m, sequential.QuantLinear) for m in model.modules())  # refused before any work


def test_resume_without_a_snapshot_replays_the_committed_layers(tiny_tokenizer, text_file, tmp_path, monkeypatch):
    """No activation snapshot is due (SNAPSHOT_SECONDS infinite): a step holds the layer and the state only, and a
    resume captures layer 0's inputs again and runs the committed layers on them, to the same bits."""
    monkeypatch.setattr(sequential, "SNAPSHOT_SECONDS", float("inf"))
    base = make_model("llama", vocab=len(tiny_tokenizer))
    clean = copy.deepcopy(base)
    run_gptq(clean, tiny_tokenizer, text_file)

    def crash(i):
        raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_gptq(copy.deepcopy(base), tiny_tokenizer, text_file, checkpoint_dir=ckpt, on_layer_done=crash)
    assert sorted(p.name for p in (ckpt / "step-0").iterdir()) == ["layer.safetensors", "state.json"]
    assert json.loads((ckpt / "step-0" / "state.json").read_text())["inputs_from"] == -1

    resumed = copy.deepcopy(base)
    report = run_gptq(resumed, tiny_tokenizer, text_file, checkpoint_dir=ckpt)
    assert report.resumed_from_layer == 1
    assert_same(clean, resumed)
