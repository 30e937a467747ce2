"""benchmarks/linear_host_time.py on the CPU: a QuantLinear call on the CUDA GEMV's route, timed without its launch,
and everything it patched for that put back."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import linear_host_time  # noqa: E402
from lowbit.kernels import cuda_host, dispatch  # noqa: E402


@pytest.mark.skipif(not cuda_host.available(), reason="needs g++ to run the CUDA source on the CPU")
def test_times_each_format_and_leaves_the_route_as_it_was(capsys) -> None:  # noqa: ANN001
    route, launch = dispatch.cuda_gemv_plan, cuda_host.HostKernel.__call__
    us = linear_host_time.main(["--formats", "q4_0,nz2_ch", "--features", "256", "--calls", "20"])
    assert set(us) == {"nn.Linear(64, 64)", "q4_0", "nz2_ch"} and all(0 < t < 1e5 for t in us.values())
    assert "nz2_ch: " in capsys.readouterr().out
    assert dispatch.cuda_gemv_plan is route and cuda_host.HostKernel.__call__ is launch
    assert dispatch.cuda_gemv_plan(torch.zeros(1, 256, dtype=torch.float16), None, (256, 256)) is None  # a CPU input
