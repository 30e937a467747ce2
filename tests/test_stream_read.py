"""The read-only yardstick kernel (lowbit.kernels.cuda_read) against the plain XOR: run on the CPU (g++), compiled
for sm_90 (NVRTC), and on a GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from conftest import nvrtc_found
from lowbit.kernels import cuda_host, cuda_read


def _buffer(units: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (units * 4,), generator=g, dtype=torch.int32).to(device)


@pytest.mark.skipif(not cuda_host.available(), reason="needs g++ to run the CUDA source on the CPU")
@pytest.mark.parametrize("unroll", [1, 4, 16])
def test_stream_read_on_the_cpu_is_the_xor_of_every_unit(unroll: int) -> None:
    """A ragged last block (units past the end read as zeros), every unit read once: one flipped bit anywhere
    changes the result."""
    buf = _buffer(256 * unroll + 37, seed=unroll)
    parts = cuda_read.stream_read(buf, unroll)
    assert parts.numel() == 8 * 2
    assert int(cuda_read.xor_all(parts)) == int(cuda_read.xor_all(buf))
    buf[-1] ^= 1 << 30  # the last unit
    assert int(cuda_read.xor_all(cuda_read.stream_read(buf, unroll))) == int(cuda_read.xor_all(buf))


def test_stream_read_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="16-byte units"):
        cuda_read.stream_read(torch.zeros(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="unroll"):
        cuda_read.stream_read(torch.zeros(8, dtype=torch.int32), unroll=3)


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
def test_stream_read_compiles_for_hopper() -> None:
    from lowbit.kernels import cuda_jit

    for unroll in cuda_read.UNROLLS:  # the sources stream_read launches
        assert cuda_jit.compile_cubin(cuda_read._source(unroll), "stream_read.cu", "sm_90")[:4] == b"\x7fELF"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_stream_read_on_gpu_is_the_xor_of_every_unit() -> None:
    buf = _buffer(3 * 256 * 16 + 5, seed=7, device="cuda")
    for unroll in cuda_read.UNROLLS:
        assert int(cuda_read.xor_all(cuda_read.stream_read(buf, unroll).cpu())) == int(cuda_read.xor_all(buf.cpu()))
