"""benchmarks/gemv_speed.py's summary: % of copy bandwidth per format and batch, and batch 8 against batch 1."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gemv_speed  # noqa: E402


def _row(shape: tuple[int, int], m: int, ms: float) -> dict:
    return {"format": "nz2_ch", "batch": m, "shape": list(shape), "ms": ms, "frac_of_copy_bw": 0.5 / m,
            "speedup_vs_fp16": 3.0}


def test_batches_report_their_time_over_batch_1s() -> None:
    ones = {shape: 0.01 * (i + 1) for i, shape in enumerate(gemv_speed.LARGE)}
    eights = dict(zip(gemv_speed.LARGE, (1.2, 1.5, 1.51, 2.0, 1.0), strict=True))
    rows = [_row(s, 1, t) for s, t in ones.items()] + [_row(s, 8, ones[s] * r) for s, r in eights.items()]
    rows.append(_row((1024, 4096), 8, 1.0))  # not a large shape: left out
    one, eight = gemv_speed.summarize(rows)
    assert "over_batch1_max" not in one
    assert eight["over_batch1_max"] == pytest.approx(2.0)
    assert (eight["within_1_5x"], eight["shapes_with_batch1"]) == (3, 5)  # 1.2, 1.5 and 1.0
    assert eight["mean"] == pytest.approx(0.5 / 8)


def test_batch_8_without_batch_1_reports_no_ratio() -> None:
    (eight,) = gemv_speed.summarize([_row(s, 8, 0.02) for s in gemv_speed.LARGE])
    assert "over_batch1_max" not in eight and eight["min"] == pytest.approx(0.5 / 8)


def test_committed_h100_run_counts_e8p_within_1_5x_at_every_large_shape() -> None:
    """The committed H100 run of the staged batch rows (docs/kernels.md): e8p_ch batch 8 within 1.5x of batch 1 at
    all five large shapes, nz2_ch at two."""
    data = json.loads((Path(__file__).parents[1] / "benchmarks/results/kernels-h100-staged.json").read_text())
    lines = {(r["format"], r["batch"]): r for r in gemv_speed.summarize(data["rows"])}
    assert lines[("e8p_ch", 8)]["within_1_5x"] == 5 and lines[("nz2_ch", 8)]["within_1_5x"] == 2
