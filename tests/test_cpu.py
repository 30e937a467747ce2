"""CPU thread defaults of the command line (lowbit/cpu.py): how many threads, and idle threads that sleep."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import cpu
from lowbit.cli import build_parser
from lowbit.errors import LowbitError


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: None)
    assert cpu.available_cpus() == mask
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1.5)  # docker --cpus 1.5: one whole CPU
    assert cpu.available_cpus() == 1
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 0.25)
    assert cpu.available_cpus() == 1


def test_configure_sets_threads_and_keeps_a_users_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.configure(1) == 1 and torch.get_num_threads() == 1
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.configure(None) == 1
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu.configure(None) == cpu.available_cpus()
    with pytest.raises(LowbitError, match="at least 1"):
        cpu.configure(0)


def test_processes_of_one_host_share_its_cpus(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 in its processes unless the user set it: that 1 is not a choice."""
    monkeypatch.setattr(cpu, "available_cpus", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.default_threads() == 16
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu.default_threads() == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice
    assert cpu.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.default_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process: OMP_NUM_THREADS as set
    assert cpu.default_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu.default_threads() == 32


def test_threads_flag_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["formats"]).threads is None
    assert parser.parse_args(["--threads", "3", "formats"]).threads == 3
    assert parser.parse_args(["--threads", "3", "formats", "--threads", "1"]).threads == 1


def test_cli_sets_the_policy_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch is imported: the CLI must set it first."""
    script = ("import json, os, sys\nfrom lowbit import cli\nassert 'torch' not in sys.modules\n"
              "cli.main(['formats'])\nimport torch\nfrom lowbit.cpu import available_cpus\n"
              "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads(), available_cpus()]))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    policy, threads, available = json.loads(out.stdout.strip().splitlines()[-1])
    assert policy == "PASSIVE" and threads == available
