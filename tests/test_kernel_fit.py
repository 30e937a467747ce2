"""benchmarks/kernel_fit.py recovers a GEMV's fixed cost and streaming rate from timings that follow a line."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import kernel_fit  # noqa: E402


def _rows(t0: float, rate: float, fp16_t0: float, fp16_rate: float) -> list[dict]:
    shapes = [(4096, 4096), (11008, 4096), (4096, 14336), (1024, 4096)]
    rows = []
    for n, k in shapes:
        codes = n * k // 4 + n * 2  # 2 bits a weight and an fp16 scale a row
        rows.append({"format": "nz2_ch", "batch": 1, "shape": [n, k], "bytes": codes,
                     "ms": (t0 + codes / rate) * 1e3, "fp16_ms": (fp16_t0 + 2 * n * k / fp16_rate) * 1e3})
        rows.append({"format": "nz2_ch", "batch": 8, "shape": [n, k], "bytes": codes, "ms": 1.0, "fp16_ms": 1.0})
    return rows


def test_fit_recovers_the_line_per_format_and_for_fp16():
    got = kernel_fit.fits({"rows": _rows(2.7e-6, 2.4e12, 6e-6, 4.5e12)}, batch=1)
    t0, rate, n = got["nz2_ch"]
    assert n == 4 and t0 == pytest.approx(2.7e-6, rel=1e-6) and rate == pytest.approx(2.4e12, rel=1e-6)
    t0, rate, _ = got["fp16"]
    assert t0 == pytest.approx(6e-6, rel=1e-6) and rate == pytest.approx(4.5e12, rel=1e-6)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError):
        kernel_fit.fit([(1e6, 1e-5), (1e6, 2e-5)])


def test_fit_of_the_read_only_kernel_when_timed():
    """Rows of ``gemv_speed.py --read-ceiling`` carry the read-only kernel's time over the same bytes: fitted as
    "read-only" (one point per size); rows without it leave it out."""
    rows = _rows(2.7e-6, 2.4e12, 6e-6, 4.5e12)
    assert "read-only" not in kernel_fit.fits({"rows": rows}, batch=1)
    for r in rows:
        r["read_ms"] = (1.5e-6 + r["bytes"] / 3.9e12) * 1e3
    t0, rate, n = kernel_fit.fits({"rows": rows}, batch=1)["read-only"]
    assert n == 4 and t0 == pytest.approx(1.5e-6, rel=1e-6) and rate == pytest.approx(3.9e12, rel=1e-6)
