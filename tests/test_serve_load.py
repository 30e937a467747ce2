"""A bounded load test of `lowbit serve` on loopback (benchmarks/serve_load.py with small counts, on the tiny random
Llama): good requests still complete while oversized, too-long and malformed ones are refused, and the server's
resident memory after the load is within a small margin of before. No timing assertions beyond sanity bounds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from test_serve import tiny_dir  # noqa: F401 - fixture used by name

ROOT = Path(__file__).resolve().parents[1]
RSS_MARGIN_MB = 24  # allocator noise over ~150 requests; a per-request leak of the refused bodies would be 100s of MB


def load_benchmark():  # noqa: ANN201 - the benchmark module
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
@pytest.mark.parametrize("fast", [False, True], ids=["loop", "fast"])
def test_mixed_load_keeps_serving_and_memory_flat(tiny_dir, fast):  # noqa: F811
    """With --fast, every good request (warm-up round included) ran on the server's decoder, which is free at the
    end; the refused ones never took it."""
    bench = load_benchmark()
    args = bench.parse_args(["--model", str(tiny_dir), "--rounds", "2", "--good", "6", "--huge", "6", "--long", "4",
                             "--bad", "24", "--tokens", "8", "--workers", "12", "--max-body-bytes", str(256 << 10),
                             "--max-prompt-tokens", "128", *(["--fast"] if fast else [])])
    out = bench.run(args)
    if fast:
        assert out["fast"] is not None and out["fast"]["free"] == 1, out
        assert (out["fast"]["decoded"], out["fast"]["fallback"]) == (6 * 3, 0), out
    else:
        assert out["fast"] is None, out
    for kind, status in (("good", 200), ("huge", 413), ("long", 400), ("bad", 400)):
        assert out[kind]["wrong"] == 0 and out[kind]["statuses"] == [status], (kind, out)
    assert out["good"]["max_s"] < 60, out  # sane latency: a few tokens of a tiny model, queued behind one slot
    assert out["rss_growth_mb"] < RSS_MARGIN_MB, out
    assert out["exit_code"] == 0 and not out["traceback_in_log"], out
