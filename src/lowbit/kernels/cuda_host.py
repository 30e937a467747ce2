"""The CUDA kernels of ``kernels/cuda/`` on the CPU, for tests: g++ compiles a kernel's source after
``cuda/host.h`` (``LOWBIT_HOST``: each thread of a block a ``std::thread``, blocks one after another, the GPU's
PRMT / LOP3 / fp16 arithmetic emulated bit for bit, the MMA in fp32), so a kernel's logic (fragment layouts,
decode steps, scales, loops, barriers) is checked against its torch reference without a GPU. ``cuda_jit.kernel``
returns one of these for a CPU device. Slow (thousands of threads per launch): small shapes only."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

CXX = "g++"
_HERE = Path(__file__).with_name("cuda")
_FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w")


class HostCompileError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which(CXX) is not None


def _params(source: str, name: str) -> str:
    """The parameter list of ``extern "C"`` kernel ``name`` in ``source``."""
    m = re.search(rf"\b{re.escape(name)}\s*\(([^)]*)\)\s*\{{", source)
    if m is None:
        raise HostCompileError(f"kernel {name} not found in its source")
    return m.group(1)


def _build(text: str, stem: str, what: str) -> Path:
    """``text`` compiled into a shared library in the temporary directory, once per content (a file per hash)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    out = Path(tempfile.gettempdir()) / "lowbit-cuda-host" / f"{stem}-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(f".{os.getpid()}.cpp")
        src.write_text(text)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([CXX, *_FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
        src.unlink()
        if done.returncode:
            raise HostCompileError(f"g++ could not compile {what} for the CPU:\n{done.stderr[-4000:]}")
        tmp.replace(out)  # atomic: a concurrent process sees the whole library or none
    return out


@cache
def _runtime() -> ctypes.CDLL:
    """cuda/host_runtime.cpp (threads, barriers, warp buffers), loaded with its symbols global so that each
    kernel's library finds them."""
    text = (_HERE / "host_runtime.cpp").read_text()
    return ctypes.CDLL(str(_build(text, "runtime", "the host runtime")), mode=ctypes.RTLD_GLOBAL)


@cache
def _library(source: str, name: str) -> ctypes.CDLL:
    params = _params(source, name)
    names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
    wrapper = (f'\nextern "C" int lowbit_launch(int grid, int threads, int shared, {params}) {{\n'
               f"    auto body = [&] {{ {name}({', '.join(names)}); }};\n"
               "    auto call = [](void* c) { (*(decltype(body)*)c)(); };\n"
               "    return lowbit_host::run(grid, threads, shared, call, &body);\n}\n")
    _runtime()
    text = "#define LOWBIT_HOST 1\n" + (_HERE / "host.h").read_text() + source + wrapper
    return ctypes.CDLL(str(_build(text, name, name)))


class HostKernel:
    """``cuda_jit.Kernel``'s interface, run on the CPU: tensors must be CPU tensors."""

    def __init__(self, source: str, name: str):
        self.name = name
        self._fn = _library(source, name).lowbit_launch

    def allow_shared(self, nbytes: int) -> None:
        pass

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared: int = 0,
                 early: bool = False) -> None:
        if grid[1:] != (1, 1) or block[1:] != (1, 1):
            raise ValueError("the CPU emulation runs one-dimensional grids and blocks")
        for a in args:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                raise ValueError(f"{self.name} on the CPU takes CPU tensors, got one on {a.device}")
        cargs = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
                 ctypes.c_int(a) if isinstance(a, int) else a for a in args]
        if self._fn(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), ctypes.c_int(shared), *cargs):
            raise RuntimeError(f"could not start {block[0]} threads for a block of {self.name} on the CPU")
