"""Merge benchmarks/results/quality-*.json into one side-by-side table: one row per format, one column per method.

    python benchmarks/tables.py [benchmarks/results/quality-h100-rtn.json benchmarks/results/quality-h100-gptq.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lowbit.eval.report import markdown_table


def side_by_side(files: list[Path]) -> str:
    by_format: dict[str, dict[str, float]] = {}
    bpw: dict[str, float] = {}
    methods: list[str] = []
    base = None
    for f in files:
        for r in json.loads(f.read_text())["rows"]:
            method, _, fmt = r["variant"].rpartition(":")
            if not fmt or r["variant"] == "fp16":
                base = r["ppl"]
                continue
            method = method or "rtn"
            if method not in methods:
                methods.append(method)
            by_format.setdefault(fmt, {})[method] = r["ppl"]
            bpw[fmt] = r["linear_bpw"]
    headers = ["format", "bpw (linears)", *(f"{m} ppl" for m in methods)]
    rows = [["fp16", "16.000", *([f"{base:.2f}"] * len(methods))]] if base else []
    for fmt, res in by_format.items():
        rows.append([fmt, f"{bpw[fmt]:.3f}", *(_ppl(res.get(m)) for m in methods)])
    return markdown_table(headers, rows)


def _ppl(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.0f}"


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]] or sorted((Path(__file__).parent / "results").glob("quality-*.json"))
    print(side_by_side(args))
