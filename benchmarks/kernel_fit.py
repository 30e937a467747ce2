"""Split each format's GEMV time into a fixed cost per call and a streaming rate, from a gemv_speed.py results file.

    python benchmarks/kernel_fit.py benchmarks/results/kernels-h200-lean.json --batch 1

A least-squares line time = t0 + bytes / rate over every shape of the file, per format: ``t0`` is what a call
costs whatever its size (launch gap, first DRAM latency, set-up, the partial-sum reduction, the tail), ``rate`` the
bandwidth at which the kernel streams codes once it runs, as a share of the file's measured copy bandwidth. The
issue's target is a mean over five shapes of bytes / time, so it counts t0 against every call; this says which of
the two is short of it. fp16 (cuBLAS, ``fp16_ms``) is fitted the same way over the same shapes, and with
``gemv_speed.py --read-ceiling`` the kernel that only reads each row's bytes (``read-only``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(t0, seconds per byte) of the least-squares line through (bytes, seconds)."""
    n = len(points)
    if n < 2 or len({b for b, _ in points}) < 2:
        raise ValueError("a line needs two or more sizes")
    mb, mt = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    slope = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return mt - slope * mb, slope


def fits(results: dict, batch: int) -> dict[str, tuple[float, float, int]]:
    """format -> (t0 seconds, streaming bytes per second, shapes) for the rows of ``batch``; "fp16" included."""
    rows = [r for r in results["rows"] if r.get("batch") == batch and r.get("ms")]
    by_format: dict[str, list[tuple[float, float]]] = {}
    fp16: dict[tuple, tuple[float, float]] = {}
    read: dict[int, tuple[float, float]] = {}
    for r in rows:
        if r.get("read_ms"):
            read[r["bytes"]] = (r["bytes"], r["read_ms"] * 1e-3)
        by_format.setdefault(r["format"], []).append((r["bytes"], r["ms"] * 1e-3))
        if r.get("fp16_ms"):
            n, k = r["shape"]
            fp16[tuple(r["shape"])] = (2.0 * n * k, r["fp16_ms"] * 1e-3)  # the fp16 weights; activations are small
    if len(fp16) >= 2:
        by_format["fp16"] = list(fp16.values())
    if len({b for b, _ in read.values()}) >= 2:
        by_format["read-only"] = list(read.values())
    out = {}
    for name, pts in by_format.items():
        t0, spb = fit(pts)
        out[name] = (t0, 1.0 / spb, len(pts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    data = json.loads(args.results.read_text())
    copy_bw = data["copy_bw"]
    print(f"{args.results.name}, batch {args.batch}, copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print("| format | shapes | fixed cost per call (us) | streaming rate (TB/s) | share of copy bandwidth |")
    print("|---|---|---|---|---|")
    for name, (t0, rate, n) in sorted(fits(data, args.batch).items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {t0 * 1e6:.2f} | {rate / 1e12:.2f} | {rate / copy_bw:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
