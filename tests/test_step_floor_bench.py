"""benchmarks/step_floor.py without a GPU: the step it streams is the 7B decode step's matrices, and it says it needs
a GPU instead of failing. (Its kernel is tested in tests/test_stream_read.py.)"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import step_floor  # noqa: E402


def test_the_step_is_the_7b_decode_steps_matrices() -> None:
    """129 matrices (4 a layer, the head), 1.652 GB at 2 bits (as docs/kernel-measurements.md's table says)."""
    units = step_floor.matrix_units(32, 2)
    assert len(units) == 4 * 32 + 1
    assert units[:4] == [12288 * 4096 // 64, 4096 * 4096 // 64, 22016 * 4096 // 64, 4096 * 11008 // 64]
    assert round(16 * sum(units) / 1e9, 3) == 1.652
    assert sum(step_floor.matrix_units(32, 4)) == 2 * sum(units)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message a machine without a GPU gets")
def test_without_a_gpu_it_says_so(capsys) -> None:  # noqa: ANN001
    assert step_floor.main(["--bits", "2"]) == []
    assert "needs a CUDA GPU" in capsys.readouterr().err
