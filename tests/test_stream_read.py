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


def _phase_bounds(units: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *units], dtype=torch.int64).cumsum(0).to(device)


@pytest.mark.skipif(not cuda_host.available(), reason="needs g++ to run the CUDA source on the CPU")
@pytest.mark.parametrize("unroll", [1, 4])
@pytest.mark.parametrize(("barrier", "prefetch"), [(False, 0), (True, 0), (True, 1), (True, 2), (False, 2), (True, 3),
                                                   (False, 3)])
def test_stream_phases_on_the_cpu_reads_each_matrix_once(unroll: int, barrier: bool, prefetch: int) -> None:
    """Matrices of ragged sizes (one of a single unit, one that some threads have no share of): the whole step, and
    any run of matrices from any first one, read every unit once."""
    buf = _buffer(3000, seed=unroll)
    bounds = _phase_bounds([37, 963, 1, 1998])
    parts = cuda_read.stream_phases(buf, bounds, blocks=3, unroll=unroll, barrier=barrier, prefetch=prefetch)
    assert parts.numel() == 8 * 3
    assert int(cuda_read.xor_all(parts)) == int(cuda_read.xor_all(buf[:4 * 2999]))
    some = cuda_read.stream_phases(buf, bounds, blocks=2, first=1, phases=2, unroll=unroll, barrier=barrier,
                                   prefetch=prefetch)
    assert int(cuda_read.xor_all(some)) == int(cuda_read.xor_all(buf[4 * 37:4 * 1001]))


def test_stream_phases_refuses_what_it_cannot_read() -> None:
    buf = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(ValueError, match="int64"):
        cuda_read.stream_phases(buf, torch.tensor([0, 4], dtype=torch.int32), blocks=1)
    with pytest.raises(ValueError, match="not all in bounds"):
        cuda_read.stream_phases(buf, _phase_bounds([4, 4]), blocks=1, first=1, phases=2)
    with pytest.raises(ValueError, match="per_sm"):
        cuda_read.stream_phases(buf, _phase_bounds([4]), blocks=1, per_sm=3)
    with pytest.raises(ValueError, match="prefetch"):
        cuda_read.stream_phases(buf, _phase_bounds([4]), blocks=1, prefetch=4)


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
def test_stream_phases_compiles_for_hopper() -> None:
    from lowbit.kernels import cuda_jit

    for barrier, prefetch in ((False, 0), (True, 1), (True, 2), (False, 2), (True, 3), (False, 3)):
        source = cuda_read._phases_source(16, barrier, prefetch, 4)
        assert cuda_jit.compile_cubin(source, "stream_phases.cu", "sm_90")[:4] == b"\x7fELF"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_stream_phases_on_gpu_reads_each_matrix_once_behind_its_barriers() -> None:
    """The grid barrier with every resident block (two per SM) taking part, many times over in one launch."""
    buf = _buffer(200_000, seed=3, device="cuda")
    bounds = _phase_bounds([1, 4095, 70_000, 3, 125_901], device="cuda")
    blocks = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")
    want = int(cuda_read.xor_all(buf.cpu()))
    for barrier, prefetch in ((False, 0), (True, 0), (True, 1), (True, 2), (False, 2), (True, 3), (False, 3)):
        for _ in range(3):
            parts = cuda_read.stream_phases(buf, bounds, blocks, unroll=8, barrier=barrier, prefetch=prefetch,
                                            sync=sync, per_sm=2)
            assert int(cuda_read.xor_all(parts.cpu())) == want
    assert int(sync[0]) == 0  # every barrier's arrivals reset


@pytest.mark.parametrize(("blocks", "per_sm", "prefetch", "sms", "threads", "smem", "fits"), [
    (264, 2, 2, 132, 2048, 233472, True),  # an H100: 2 blocks an SM, 66 KB of shared memory
    (265, 2, 0, 132, 2048, 233472, False),  # one block more than 2 an SM
    (528, 4, 2, 132, 2048, 233472, True),
    (512, 4, 2, 128, 1536, 102400, False),  # a consumer GPU: 132 KB of shared memory asked of 100
    (1024, 8, 0, 128, 1536, 102400, False),  # 2048 threads asked of 1536
])
def test_stream_phases_barrier_refuses_a_grid_that_is_not_all_resident(monkeypatch, blocks, per_sm, prefetch, sms,
                                                                       threads, smem, fits) -> None:
    """A grid barrier over blocks that cannot all run at once would wait forever: the grid is checked first."""
    from types import SimpleNamespace

    props = SimpleNamespace(multi_processor_count=sms, max_threads_per_multi_processor=threads,
                            shared_memory_per_multiprocessor=smem)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert cuda_read._all_resident(blocks, per_sm, prefetch, torch.device("cuda")) is fits
