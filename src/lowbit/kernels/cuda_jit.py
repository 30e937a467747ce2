"""Compile CUDA C++ at first use with NVRTC and launch it through the CUDA driver API, both via ctypes.

Why not ``torch.utils.cpp_extension``: that needs nvcc, a host compiler and ninja on the user's machine and a
minute per build. NVRTC ships with every CUDA build of PyTorch (the ``nvidia-cuda-nvrtc`` wheel or the CUDA
toolkit), compiles a kernel in a fraction of a second (0.1-0.4 s for a GEMV variant), and the driver library is
wherever a GPU works. The kernels use no headers (inline PTX for the half-precision and tensor-core instructions),
so nothing else has to be found. Compiled kernels are kept on disk (:func:`cached_cubin`).

A launch goes on PyTorch's current stream, so it is captured by CUDA graphs like any PyTorch kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import site
import struct
import sys
import threading
from functools import cache
from pathlib import Path

import torch

from lowbit.atomic import atomic_file
from lowbit.data.assets import cache_dir
from lowbit.errors import LowbitError
from lowbit.kernels import verified


class CudaJitError(LowbitError):
    """NVRTC or the driver refused: the message carries the compiler log or the driver's error name."""


def _candidates(stem: str) -> list[str]:
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    found = []
    for root in roots:  # pip wheels: nvidia/cuda_nvrtc/lib (CUDA 12), nvidia/cu13/lib (CUDA 13)
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"{stem}.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", f"{stem}.so*")), reverse=True)
    return [f"{stem}.so", *found]


def _load(stem: str) -> ctypes.CDLL:
    for name in _candidates(stem):
        if "builtins" in name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaJitError(f"cannot find {stem}.so (install PyTorch with CUDA, or set CUDA_HOME)")


@cache
def _nvrtc() -> ctypes.CDLL:
    return _load("libnvrtc")


@cache
def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaJitError(f"cannot load the CUDA driver (libcuda.so.1): {e}") from e


@cache
def available() -> bool:
    """True when CUDA, NVRTC and the driver library are all usable here."""
    if not torch.cuda.is_available():
        return False
    try:
        _nvrtc()
        _driver()
    except CudaJitError:
        return False
    return True


def _check_nvrtc(status: int, what: str) -> None:
    if status != 0:
        lib = _nvrtc()
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaJitError(f"NVRTC {what}: {lib.nvrtcGetErrorString(status).decode()}")


def _check_cu(status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(status, ctypes.byref(name))
        raise CudaJitError(f"CUDA driver {what}: {name.value.decode() if name.value else status}")


def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """Machine code for ``arch`` (e.g. ``sm_90``) of CUDA C++ ``source``; errors carry NVRTC's log."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaJitError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _ensure_context(device: torch.device) -> None:
    """The driver API works on the calling thread's current context: make it PyTorch's primary context."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=device)  # makes the primary context current on this thread through the runtime
        ctx = ctypes.c_void_p()
        _check_cu(_driver().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            _check_cu(_driver().cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
            _check_cu(_driver().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check_cu(_driver().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an enum id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_ubyte * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class Kernel:
    """One ``extern "C" __global__`` function of a compiled module, launched on PyTorch's current stream."""

    def __init__(self, cubin: bytes, name: str, device: torch.device):
        _ensure_context(device)
        self.name = name
        self._module = ctypes.c_void_p()
        _check_cu(_driver().cuModuleLoadData(ctypes.byref(self._module), cubin), f"load module of {name}")
        self._fn = ctypes.c_void_p()
        _check_cu(_driver().cuModuleGetFunction(ctypes.byref(self._fn), self._module, name.encode()),
                  f"find {name}")
        self._shared_allowed = 0  # set on the first launch that asks for any
        self._lock = threading.Lock()
        self._params: dict[tuple[type, ...], PackedArgs] = {}  # per signature of the arguments
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)  # early launches' (Hopper)
        attr.value[0] = 1
        self._early_attr = attr
        self._config = _LaunchConfig(attrs=ctypes.pointer(attr), n_attrs=1)

    def attribute(self, attr: int) -> int:
        """``cuFuncGetAttribute``: e.g. 4 = registers per thread, 3 = local (spilled) bytes per thread."""
        v = ctypes.c_int()
        _check_cu(_driver().cuFuncGetAttribute(ctypes.byref(v), attr, self._fn), f"attribute {attr} of {self.name}")
        return v.value

    def allow_shared(self, nbytes: int) -> None:
        """Let launches ask for ``nbytes`` of dynamic shared memory: where the kernel's static and dynamic shared
        memory together pass the 48 KB a block gets by default, opt in to more, with the SM's memory split in
        favour of shared memory."""
        if nbytes <= self._shared_allowed:
            return
        if nbytes + self.attribute(1) > 48 * 1024:  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: the static part
            _check_cu(_driver().cuFuncSetAttribute(self._fn, 8, nbytes),  # MAX_DYNAMIC_SHARED_SIZE_BYTES
                      f"allow {nbytes} bytes of shared memory for {self.name}")
            _check_cu(_driver().cuFuncSetAttribute(self._fn, 9, 100),  # PREFERRED_SHARED_MEMORY_CARVEOUT: max
                      f"shared memory carveout of {self.name}")
        self._shared_allowed = nbytes

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared: int = 0,
                 early: bool = False) -> None:
        """``args``: tensors (passed as device pointers), Python ints (int32) or ctypes values. ``early``: a
        programmatic dependent launch (Hopper and later): the kernel may start before the one ahead of it in the
        stream has finished, and must execute ``griddepcontrol.wait`` before it reads that kernel's output."""
        packed = "packed_args" not in verified.GPU_UNVERIFIED
        stream = _current_stream() if packed else torch.cuda.current_stream().cuda_stream
        with self._lock:  # the packed arguments are this kernel's buffer until the driver has copied them
            if packed:
                params = self._params.get(kinds := tuple(map(type, args))) or self._packer(kinds)
                params.pack(args)
                array = params.array
            else:
                array, _kept = _ctypes_params(args)  # _kept: the values the array points to, alive until launched
            if not early:
                _check_cu(_driver().cuLaunchKernel(self._fn, *grid, *block, shared, ctypes.c_void_p(stream), array,
                                                   None), f"launch {self.name}")
                return
            config = self._config
            config.grid[:], config.block[:], config.shared, config.stream = grid, block, shared, stream
            _check_cu(_driver().cuLaunchKernelEx(ctypes.byref(config), self._fn, array, None), f"launch {self.name}")

    def _packer(self, kinds: tuple[type, ...]) -> PackedArgs:
        self._params[kinds] = PackedArgs(kinds)
        return self._params[kinds]


def _current_stream() -> int:
    """The handle of PyTorch's current stream on the current device: what ``torch.cuda.current_stream()`` names,
    without the Python Stream object it builds on every call."""
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())


# How each kind of kernel argument is written into its 8-byte slot (little-endian struct codes) and read from the
# Python value. A launch once built a ctypes object and a pointer to it per argument: ~40 µs of host time for a
# 14-argument GEMV (3.5 packed: benchmarks/launch_args.py), more than the GEMV takes on the GPU.
_SLOTS: dict[type, str] = {ctypes.c_int: "i4x", ctypes.c_uint: "I4x", ctypes.c_float: "f4x", ctypes.c_long: "q",
                           ctypes.c_longlong: "q", ctypes.c_void_p: "Q"}


def _ctypes_params(args: list) -> tuple[ctypes.Array, list]:
    """The launch's argument array built from one ctypes object per argument (what launches did before
    :class:`PackedArgs`; still taken with ``packed_args`` put back in ``verified.GPU_UNVERIFIED``), and those
    objects."""
    kept = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
            ctypes.c_int(a) if isinstance(a, int) else a for a in args]
    return (ctypes.c_void_p * len(kept))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in kept]), kept


class PackedArgs:
    """Kernel arguments of one signature packed into a reusable buffer, 8 bytes a slot, with the array of pointers
    to the slots that ``cuLaunchKernel`` takes (the driver copies the values at launch, so the buffer is free again
    as soon as the launch returns)."""

    def __init__(self, kinds: tuple[type, ...]):
        codes = []
        for t in kinds:
            if issubclass(t, torch.Tensor):
                codes.append("Q")  # a device pointer
            elif issubclass(t, int):
                codes.append("i4x")  # int32
            elif t in _SLOTS:
                codes.append(_SLOTS[t])
            else:
                raise TypeError(f"a kernel argument is a tensor, an int or one of {list(_SLOTS)}, not {t.__name__}")
        self.struct = struct.Struct("<" + "".join(codes))
        self.buffer = ctypes.create_string_buffer(max(self.struct.size, 8))
        base = ctypes.addressof(self.buffer)
        self.array = (ctypes.c_void_p * len(kinds))(*(base + 8 * i for i in range(len(kinds))))

    def pack(self, args: list) -> None:
        self.struct.pack_into(self.buffer, 0, *[a.data_ptr() if isinstance(a, torch.Tensor) else
                                                a if isinstance(a, int) else a.value or 0 for a in args])


_KERNELS: dict[tuple, Kernel] = {}


def kernel(source: str, name: str, device: torch.device) -> Kernel:
    """The kernel ``name`` of ``source`` compiled for ``device`` (cached per process: source, name, device). On a
    CPU device: the same source compiled by g++ and run on the CPU (:mod:`cuda_host`, for tests)."""
    key = (source, name, str(device))
    if key not in _KERNELS and device.type == "cpu":
        from lowbit.kernels.cuda_host import HostKernel

        _KERNELS[key] = HostKernel(source, name)  # same interface
    if key not in _KERNELS:
        major, minor = torch.cuda.get_device_capability(device)
        cubin = cached_cubin(source, f"{name}.cu", f"sm_{major}{minor}", ("-lineinfo",))
        _KERNELS[key] = Kernel(cubin, name, device)
    return _KERNELS[key]


# Compiled kernels are kept on disk, so a new process (a server start, each benchmark run) loads the machine code
# a decode step needs instead of compiling every variant again with NVRTC. ``LOWBIT_CUDA_CACHE=0``: compile every
# time, keep nothing. The least recently used files go once the folder passes CACHE_BYTES (a GEMV variant's
# machine code is 40-80 KB; a run of the GPU tests builds a few thousand).
DISK_CACHE = os.environ.get("LOWBIT_CUDA_CACHE", "1") != "0"
CACHE_BYTES = 256 << 20


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(_nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
    return major.value, minor.value


def cache_path(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> Path:
    """Where :func:`cached_cubin` keeps the machine code of these inputs: ``$LOWBIT_HOME/cuda/<hash>.cubin``, the
    hash over the source, its name, the architecture, the options and NVRTC's version (a new compiler compiles
    again)."""
    key = "\0".join([source, name, arch, *options, "nvrtc {}.{}".format(*nvrtc_version())])
    return cache_dir() / "cuda" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.cubin"


def cached_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """:func:`compile_cubin`'s result, read from the disk cache where an earlier process (or call) left it, else
    compiled and written there (an atomic write: concurrent processes see a whole file or none). A cached file that
    is not an ELF image is compiled and written again; a cache that cannot be written only costs the compile."""
    if not DISK_CACHE:
        return compile_cubin(source, name, arch, options)
    path = cache_path(source, name, arch, options)
    try:
        cubin = path.read_bytes()
        if cubin[:4] == b"\x7fELF":
            with contextlib.suppress(OSError):  # a read-only cache is still read
                os.utime(path)  # used now: the last to go when the folder is trimmed
            return cubin
    except OSError:
        pass
    cubin = compile_cubin(source, name, arch, options)
    try:
        with atomic_file(path) as tmp:
            tmp.write_bytes(cubin)
        _trim(path.parent)
    except (OSError, LowbitError):
        pass  # a read-only or full disk: the kernel still runs, compiled again next time
    return cubin


def _trim(folder: Path) -> None:
    """Remove the least recently used machine code until ``folder`` holds at most :data:`CACHE_BYTES`."""
    files = []
    for entry in os.scandir(folder):
        try:
            if entry.name.endswith(".cubin"):
                st = entry.stat()
                files.append((st.st_mtime, st.st_size, entry.path))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    total = sum(size for _, size, _ in files)
    for _, size, file in sorted(files):
        if total <= CACHE_BYTES:
            break
        with contextlib.suppress(FileNotFoundError):
            os.remove(file)
        total -= size


def source_dir() -> Path:
    return Path(__file__).with_name("cuda")


def source(name: str, defines: str = "") -> str:
    """The CUDA source ``cuda/<name>`` after ``defines`` and ``cuda/common.cuh`` (types, launch helpers)."""
    return defines + (source_dir() / "common.cuh").read_text() + (source_dir() / name).read_text()
