"""Several processes quantizing one model (algorithms/distributed.py), run on the CPU with 2 gloo processes.

The split changes only the order in which the Hessians are summed, so the result is one process's within float
tolerance; a crashed multi-process run resumes from its checkpoint (every rank's activation shard) bit-identically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

WORKER = """
import json, sys, torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig, quantize_sequential
from lowbit.algorithms import distributed, sequential

sequential.SNAPSHOT_SECONDS = 0.0  # as the conftest fixture: every step holds the activation shards
model_dir, text, ckpt, out, crash_after = sys.argv[1:6]
if distributed.launched():
    distributed.init_from_env("cpu")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)

def crash(i):
    if i == int(crash_after):
        raise SystemExit(3)

report = quantize_sequential(model, tok, uniform_plan(model, "int4_g32_asym"), CalibConfig(6, 32, text),
                             device="cpu", checkpoint_dir=ckpt, progress=False, rounding="gptq_act",
                             on_layer_done=crash)
ranks = distributed.current()
if ranks is None or ranks.lead:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    json.dump({n: s.proxy_loss for n, s in report.linears.items()}, open(out + ".json", "w"))
"""


def _torchrun(tmp_path: Path, args: list[str], procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def _worker(tmp_path: Path, model_dir: Path, text: str, name: str, procs: int, crash_after: int = -1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{name}.safetensors"
    args = [str(script), str(model_dir), text, str(tmp_path / f"{name}.ckpt"), str(out), str(crash_after)]
    if procs == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    else:
        res = _torchrun(tmp_path, args, procs)
    return res, out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same tensors; integer codes agree but for rare ties, float parameters to float tolerance."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=k)
        else:
            assert (x == y).float().mean() > 0.99, k


def test_two_gloo_processes_match_one_and_resume_bit_identically(tiny_model_dir, text_file, tmp_path):
    one, out1 = _worker(tmp_path, tiny_model_dir, text_file, "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, out2 = _worker(tmp_path, tiny_model_dir, text_file, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_close(load_file(out1), load_file(out2))
    loss1, loss2 = json.loads(Path(f"{out1}.json").read_text()), json.loads(Path(f"{out2}.json").read_text())
    assert loss1.keys() == loss2.keys()
    assert all(abs(loss1[n] - loss2[n]) <= 1e-3 * abs(loss1[n]) + 1e-6 for n in loss1)

    crashed, out3 = _worker(tmp_path, tiny_model_dir, text_file, "resumed", 2, crash_after=0)
    assert crashed.returncode != 0 and not out3.exists()
    step = tmp_path / "resumed.ckpt" / "step-0"
    assert sorted(p.name for p in step.iterdir()) == ["inputs-0-of-2.safetensors", "inputs-1-of-2.safetensors",
                                                      "layer.safetensors", "state.json"]
    shards = [load_file(step / f"inputs-{r}-of-2.safetensors")["inputs"] for r in (0, 1)]
    assert [s.shape[0] for s in shards] == [3, 3] and not torch.equal(shards[0], shards[1])  # 6 windows, dealt
    resumed, out3 = _worker(tmp_path, tiny_model_dir, text_file, "resumed", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(out2), load_file(out3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.ckpt").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_cli_under_torchrun_writes_one_output(stream, tiny_model_dir, text_file, tmp_path):
    common = [str(tiny_model_dir), "-f", "int4_g32_asym", "--method", "gptq", "--nsamples", "4", "--calib-seqlen",
              "32", "--calib-text", text_file, "--device", "cpu", "--no-progress", *(["--stream"] if stream else [])]
    assert main(["quantize", *common, "-o", str(tmp_path / "one")]) == 0
    res = _torchrun(tmp_path, ["-m", "lowbit.cli", "quantize", *common, "-o", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    _assert_close(one, two)
    info = json.loads((tmp_path / "two" / "lowbit.json").read_text())
    assert info["method"] == "gptq" and info["calibration"]["nsamples"] == 4
    assert not (tmp_path / "two.partial").exists()


def test_cli_refuses_what_processes_cannot_share(tiny_model_dir, tmp_path):
    res = _torchrun(tmp_path, ["-m", "lowbit.cli", "quantize", str(tiny_model_dir), "-f", "q4_0", "--device", "cpu",
                               "-o", str(tmp_path / "x")])
    assert res.returncode != 0 and "rtn recipes in one process" in res.stderr
    assert not (tmp_path / "x").exists()


def test_too_few_windows_for_the_processes():
    from lowbit.algorithms.distributed import Ranks
    from lowbit.errors import LowbitError

    assert Ranks(1, 3).shard(torch.arange(7)).tolist() == [1, 4]
    with pytest.raises(LowbitError, match="--nsamples 3"):
        Ranks(0, 3).shard(torch.arange(2))


def test_rounding_jobs_are_balanced_largest_first():
    from lowbit.algorithms.distributed import Ranks

    two = Ranks(rank=1, world=2)
    # a 7B layer's problems by columns: q/k/v 4096, o 4096, gate/up 4096, down 11008
    assert two.assign([4096, 4096, 4096, 11008]) == [1, 1, 1, 0]  # down alone on one rank, the rest on the other
    assert two.assign([5.0, 5.0]) == [0, 1]  # ties go to the lower rank first
    assert Ranks(rank=0, world=3).assign([1.0, 9.0, 4.0, 4.0]) == [1, 0, 1, 2]
