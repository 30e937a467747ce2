"""CPU threads for the command line: how many PyTorch uses, and how its idle ones wait.

PyTorch's CPU operations run on an OpenMP pool (libgomp in the PyPI wheels, shared with MKL). By default idle pool
threads spin for a while before sleeping, so a parallel region whose other thread the OS has descheduled for
another busy process waits for a time slice, on every one of thousands of small operations. Measured on a 2-core
machine beside another 2-thread PyTorch process (``benchmarks/cpu_threads.py``, docs/formats.md#gptq-on-a-cpu):
GPTQ of one stacked q/k/v problem 0.04 s alone, 3.0 s beside it, a 512-token forward 0.9 s and 20 s; with
``OMP_WAIT_POLICY=PASSIVE`` the threads sleep at once and the same runs take 0.05 s and 1.6 s, while alone the
forward is unchanged and runs of tiny operations lose 5-45%.

:func:`configure`, which ``lowbit`` (the CLI) calls before torch is imported: ``OMP_WAIT_POLICY=PASSIVE`` unless
the environment sets it, and ``torch.set_num_threads`` to ``--threads``, else ``OMP_NUM_THREADS`` when set, else
the CPUs this process may run on (:func:`available_cpus`: its affinity mask, capped by a container's CPU quota),
not the machine's. Library users call it themselves, before their first ``import torch``; lowbit's API never
changes a process's settings on its own.

Several processes on one host (torchrun, ``LOCAL_WORLD_SIZE`` > 1) share its CPUs: each gets its share,
``available_cpus() // LOCAL_WORLD_SIZE``. torchrun sets ``OMP_NUM_THREADS=1`` in every process it starts unless the
environment already has a value, so there a 1 is read as torchrun's default, not a choice (``--threads 1`` is
one); a single thread per process starved the work a GPU process does on its CPU (reading or generating the next
layer's weights, host copies): two H200s' 7B run went CPU-bound.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.errors import LowbitError


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota rounded down
    (``docker --cpus``), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, int(quota))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs' worth of time per period the cgroup allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """The thread count without ``--threads``: see the module docstring."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    env_threads = int(env) if env.isdigit() and int(env) > 0 else None
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    procs = int(local) if local.isdigit() and int(local) > 0 else 1
    if procs > 1 and env_threads in (None, 1):  # torchrun's OMP_NUM_THREADS=1, or none
        return max(1, available_cpus() // procs)
    return env_threads or available_cpus()


def configure(threads: int | None = None) -> int:
    """Apply lowbit's CPU defaults to this process (see the module docstring); returns the thread count.

    The wait policy only takes effect when this runs before torch is first imported (OpenMP reads it once)."""
    if threads is not None and threads < 1:
        raise LowbitError(f"--threads must be at least 1, got {threads}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        threads = default_threads()
    import torch

    torch.set_num_threads(threads)
    return threads
