"""Plot perplexity against the inner/outer ratio r of the no-zero 2-bit level set {-1, -r, r, 1}.

    python benchmarks/plot_ratio.py benchmarks/results/quality-h100-w2.json benchmarks/results/quality-h100-sweep.json

Reads quality.py result files, takes every per-channel no-zero row with a Hadamard rotation (``nz2r{RR}_ch``: r =
RR/100, ``nz2_ch``: r = 1/3, ``pm12_ch``: {+-1, +-2} = r 1/2), one series per rounding method, and writes
docs/w2_ratio_sweep.png (log-scale perplexity, fp16 as a reference line).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_ROW = re.compile(r"^(?P<method>\w+)\+rht:(?:nz2r(?P<rr>\d\d)|(?P<named>nz2|pm12))_ch$")
_NAMED_RATIO = {"nz2": 1 / 3, "pm12": 0.5}


def sweep_points(files: list[Path]) -> tuple[dict[str, dict[float, float]], float | None]:
    series: dict[str, dict[float, float]] = {}
    fp16 = None
    for f in files:
        for row in json.loads(f.read_text())["rows"]:
            if row["variant"] == "fp16":
                fp16 = row["ppl"]
            m = _ROW.match(row["variant"])
            if m:
                r = int(m["rr"]) / 100 if m["rr"] else _NAMED_RATIO[m["named"]]
                series.setdefault(m["method"], {})[r] = row["ppl"]
    return series, fp16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "w2_ratio_sweep.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, fp16 = sweep_points(args.results)
    if not series:
        print("no no-zero ratio rows in these files", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in sorted(series.items()):
        rs = sorted(pts)
        ax.plot(rs, [pts[r] for r in rs], marker="o", label=f"{method} + Hadamard")
    if fp16:
        ax.axhline(fp16, color="gray", linestyle="--", label=f"fp16 ({fp16:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("inner/outer ratio r of levels {-1, -r, r, 1} (per-channel scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("W2 no-zero level set: ratio sweep (SmolLM2-135M)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    for method, pts in sorted(series.items()):
        print(method, ", ".join(f"r={r:.2f}: {p:.1f}" for r, p in sorted(pts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
