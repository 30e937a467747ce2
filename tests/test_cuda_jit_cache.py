"""The disk cache of compiled CUDA kernels (``cuda_jit.cached_cubin``): NVRTC compiles a source once per
architecture, options and compiler version; later calls, in this process or another, read the machine code back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import nvrtc_found
from lowbit.kernels import cuda_jit

pytestmark = pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")

SOURCE = 'extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.f; }\n'
ELF = b"\x7fELF"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    monkeypatch.setattr(cuda_jit, "DISK_CACHE", True)
    return tmp_path


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The calls of NVRTC (compile_cubin) from here on."""
    calls: list[tuple] = []
    real = cuda_jit.compile_cubin

    def compile_counted(*args: object) -> bytes:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cuda_jit, "compile_cubin", compile_counted)
    return calls


def test_compiled_once_then_read_back(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counted(monkeypatch)
    first = cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    again = cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    assert first[:4] == ELF and again == first and len(calls) == 1
    assert list((home / "cuda").iterdir()) == [cuda_jit.cache_path(SOURCE, "add.cu", "sm_90")]


def test_another_process_reads_what_this_one_compiled(home: Path) -> None:
    cubin = cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    probe = ("import sys\nfrom lowbit.kernels import cuda_jit\n"
             "def refuse(*args):\n    raise SystemExit('compiled again')\n"
             "cuda_jit.compile_cubin = refuse\n"
             f"sys.stdout.buffer.write(cuda_jit.cached_cubin({SOURCE!r}, 'add.cu', 'sm_90'))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          env={**os.environ, "LOWBIT_HOME": str(home)}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout == cubin


def test_other_inputs_are_compiled_again(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counted(monkeypatch)
    cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_80")
    cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90", ("-lineinfo",))
    cuda_jit.cached_cubin(SOURCE.replace("1.f", "2.f"), "add.cu", "sm_90")
    assert len(calls) == 4 and len(list((home / "cuda").iterdir())) == 4
    path = cuda_jit.cache_path(SOURCE, "add.cu", "sm_90")
    monkeypatch.setattr(cuda_jit, "nvrtc_version", lambda: (99, 0))  # a new compiler: new machine code
    assert cuda_jit.cache_path(SOURCE, "add.cu", "sm_90") != path


def test_a_damaged_file_is_compiled_and_written_again(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cuda_jit.cache_path(SOURCE, "add.cu", "sm_90")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a cub")
    calls = _counted(monkeypatch)
    cubin = cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    assert len(calls) == 1 and cubin[:4] == ELF and path.read_bytes() == cubin


def test_switched_off_it_compiles_every_time_and_keeps_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_jit, "DISK_CACHE", False)
    calls = _counted(monkeypatch)
    cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")
    assert len(calls) == 2 and not (home / "cuda").exists()


def test_a_cache_that_cannot_be_written_only_costs_the_compile(home: Path) -> None:
    (home / "cuda").write_text("a file where the cache folder would be")
    assert cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")[:4] == ELF
    assert cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")[:4] == ELF


def test_the_least_recently_used_go_when_the_folder_is_full(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = [SOURCE.replace("1.f", f"{i}.f") for i in range(3)]
    paths = [cuda_jit.cache_path(s, "add.cu", "sm_90") for s in sources]
    size = len(cuda_jit.cached_cubin(sources[0], "add.cu", "sm_90"))
    monkeypatch.setattr(cuda_jit, "CACHE_BYTES", 2 * size + size // 2)  # room for two, not three
    os.utime(paths[0], (1, 1))  # long unused
    cuda_jit.cached_cubin(sources[1], "add.cu", "sm_90")
    os.utime(paths[1], (2, 2))
    cuda_jit.cached_cubin(sources[0], "add.cu", "sm_90")  # read back: used now
    cuda_jit.cached_cubin(sources[2], "add.cu", "sm_90")  # a third: the least recently used goes
    assert [p.exists() for p in paths] == [True, False, True]


def test_a_read_only_cache_is_still_read(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cubin = cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(cuda_jit.os, "utime", refuse)
    calls = _counted(monkeypatch)
    assert cuda_jit.cached_cubin(SOURCE, "add.cu", "sm_90") == cubin and not calls
