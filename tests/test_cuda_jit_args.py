"""How cuda_jit passes a launch's arguments: one packed buffer of 8-byte slots per argument signature, reused by
every launch (``cuda_jit.PackedArgs``), instead of a ctypes object per argument per launch."""

from __future__ import annotations

import ctypes
import struct

import pytest
import torch

from lowbit.kernels import cuda_jit, verified


def _slot(args: cuda_jit.PackedArgs, i: int, kind: type) -> object:
    return ctypes.cast(args.array[i], ctypes.POINTER(kind)).contents.value


def test_each_value_sits_in_its_slot_and_a_repack_overwrites_it() -> None:
    t = torch.zeros(3)
    values = [t, 7, -3, True, ctypes.c_float(1.5), ctypes.c_longlong(-2**40), ctypes.c_void_p(None),
              ctypes.c_void_p(0x12345678), ctypes.c_uint(2**32 - 1), ctypes.c_int(-5)]
    packed = cuda_jit.PackedArgs(tuple(map(type, values)))
    packed.pack(values)
    kinds = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_longlong,
             ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint, ctypes.c_int]
    want = [t.data_ptr(), 7, -3, 1, 1.5, -2**40, 0, 0x12345678, 2**32 - 1, -5]
    assert [_slot(packed, i, k) for i, k in enumerate(kinds)] == want
    assert [packed.array[i] - packed.array[0] for i in range(len(values))] == [8 * i for i in range(len(values))]
    u = torch.zeros(5)
    packed.pack([u, 8, 9, False, ctypes.c_float(-0.25), ctypes.c_longlong(3), ctypes.c_void_p(1), ctypes.c_void_p(2),
                 ctypes.c_uint(4), ctypes.c_int(6)])
    assert [_slot(packed, i, k) for i, k in enumerate(kinds)] == [u.data_ptr(), 8, 9, 0, -0.25, 3, 1, 2, 4, 6]


def test_arguments_a_kernel_cannot_take_are_refused() -> None:
    with pytest.raises(TypeError, match="not float"):
        cuda_jit.PackedArgs((torch.Tensor, float))
    packed = cuda_jit.PackedArgs((int,))
    with pytest.raises(struct.error):  # an int32 slot: a wider int is an error, not a silent wrap
        packed.pack([2**31])


SOURCE = r"""extern "C" __global__ void put(float* out, int n, float a, long long b, unsigned int c) {
    if (threadIdx.x == 0) { out[0] = (float)n; out[1] = a; out[2] = (float)b; out[3] = (float)c; }
}
"""


@pytest.mark.skipif(not cuda_jit.available(), reason="needs CUDA and NVRTC")
@pytest.mark.parametrize("packed", [True, False])
def test_a_launch_passes_every_kind_of_argument_on_gpu(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of passing arguments (packed: PackedArgs, which left ``verified.GPU_UNVERIFIED`` when this passed
    on an H200; else a ctypes object each), plain and programmatic dependent launches, twice with other values."""
    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset() if packed else frozenset({"packed_args"}))
    dev = torch.device("cuda", torch.cuda.current_device())
    kernel = cuda_jit.kernel(SOURCE, "put", dev)
    for early in {False, torch.cuda.get_device_capability(dev)[0] >= 9}:
        for n in (5, -6):
            out = torch.zeros(4, device=dev)
            kernel((1, 1, 1), (32, 1, 1), [out, n, ctypes.c_float(2.5 * n), ctypes.c_longlong(-7 * n),
                                           ctypes.c_uint(9)], early=early)
            assert out.tolist() == [n, 2.5 * n, -7 * n, 9]
