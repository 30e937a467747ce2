"""Markdown tables of results, and the quality report (``lowbit report``): perplexity vs bits per weight.

The report plots every measured variant as a point (bits per weight of the decoder linears, perplexity), one series
per rounding method, and marks the Pareto frontier: the rows for which no other row has both fewer bits and lower
perplexity. Points come either from a fresh ``pipeline.compare`` run or from results JSON files already measured
(``benchmarks/quality.py``, ``lowbit compare --json``), so a report can be rebuilt without re-running anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), sep, *(line(r) for r in cells)])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


# --- Quality report: perplexity vs bits per weight, one series per method, Pareto frontier -----------------------

BASELINE_VARIANT = "fp16"
# Variant lists for `lowbit report --set`; "quick" is RTN only (minutes on a CPU with --max-windows), the others
# need calibration (GPTQ on a CPU takes minutes per variant).
REPORT_SETS: dict[str, list[str]] = {
    "quick": ["fp16", "rtn:int4_g32_asym", "rtn:int4_g128_sym", "rtn:int3_g128_sym", "rtn:int2_g64_sym"],
    "rtn": ["fp16", *(f"rtn:int{b}_g{g}_{k}" for b in (4, 3, 2) for g in (32, 128) for k in ("sym", "asym"))],
    "gptq": ["fp16", *(f"{m}:int{b}_g128_sym" for m in ("rtn", "gptq", "gptq+rht") for b in (4, 3))],
    "w2": ["fp16", "gptq:int2_g64_sym", "gptq+rht:nz2_ch", "gptq+rht:e8p_ch", "gptq:iq2_xxs",
           "gptq+rht:nz2_ch/int3_g128_sym@2.5bpw"],
}


@dataclass(frozen=True)
class Point:
    """One measured row: a variant, its series (method + simulation suffix), bpw of the decoder linears, ppl."""

    variant: str
    series: str
    bpw: float
    ppl: float
    total_mb: float | None = None
    source: str = ""


def series_of(variant: str) -> str:
    """``gptq+rht:nz2_ch+a4+kv4`` -> ``gptq+rht +a4+kv4``; a bare format is RTN; ``fp16`` is its own series."""
    spec, sim = _SIM_SUFFIX.match(variant.strip()).groups()
    method, _, _fmt = spec.rpartition(":")
    base = BASELINE_VARIANT if spec.lower() == BASELINE_VARIANT else (method or "rtn")
    return f"{base} {sim}" if sim else base


_SIM_SUFFIX = re.compile(r"^(.*?)((?:\+(?:a|kv)\d)*)$", re.IGNORECASE)


def point_from_row(row: dict, source: str = "") -> Point:
    return Point(row["variant"], series_of(row["variant"]), float(row["linear_bpw"]), float(row["ppl"]),
                 row.get("total_mb"), source)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both axes (fewer or equal bits and lower or equal perplexity, one strictly).

    Sorted by bits per weight; ties at equal bpw keep only the lowest perplexity. NaN perplexities never qualify.
    """
    ok = sorted((p for p in points if math.isfinite(p.ppl)), key=lambda p: (p.bpw, p.ppl))
    front: list[Point] = []
    for p in ok:  # by bits, then perplexity: a point joins when it beats every cheaper (or equal) one
        if not front or p.ppl < front[-1].ppl:
            front.append(p)
    return front


def load_results(files: Sequence[str | Path]) -> tuple[list[Point], list[dict]]:
    """Points from ``benchmarks/quality.py`` / ``lowbit compare --json`` files, and each file's metadata.

    The same measurement appearing in several files (the fp16 row of every run) is kept once; different
    measurements of one variant (reruns) are all kept, each with its source file.
    """
    points: list[Point] = []
    meta: list[dict] = []
    seen: set[tuple[str, float]] = set()
    for f in files:
        path = Path(f)
        try:
            data = json.loads(path.read_text())
            rows = data["rows"]
        except FileNotFoundError:
            raise LowbitError(f"results file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LowbitError(f"{path} is not a lowbit results file (JSON with a 'rows' list): {e}") from None
        meta.append({"file": str(path), "command": data.get("command"), "header": data.get("header"),
                     "protocol": data.get("protocol"), "partial": data.get("partial", False)})
        for row in rows:
            key = (row["variant"], round(float(row["ppl"]), 6))
            if key not in seen:
                seen.add(key)
                points.append(point_from_row(row, path.stem))
    if not points:
        raise LowbitError("no result rows in " + ", ".join(map(str, files)))
    return points, meta


def report_markdown(points: Sequence[Point], title: str, context: Sequence[str], plot_name: str = "pareto.png") -> str:
    """The report: context lines (command, protocol, hardware), the plot, and every row (frontier rows marked)."""
    front = {id(p) for p in pareto_front(points)}
    base = next((p.ppl for p in points if p.variant == BASELINE_VARIANT), None)
    rows = []
    for p in sorted(points, key=lambda p: (-p.bpw, p.ppl)):
        delta = f"{100 * (p.ppl / base - 1):+.1f}" if base else "-"
        mb = f"{p.total_mb:.1f}" if p.total_mb is not None else "-"
        rows.append((p.variant, p.series, f"{p.bpw:.3f}", mb, _ppl_str(p.ppl), delta,
                     "yes" if id(p) in front else "", p.source))
    table = markdown_table(("variant", "method", "bpw (linears)", "total MB", "ppl", "Δ vs fp16 %", "Pareto",
                            "source"), rows)
    frontier = ", ".join(f"{p.variant} ({p.bpw:.2f} bpw, {_ppl_str(p.ppl)})" for p in pareto_front(points))
    return "\n".join([f"# {title}", "", *(f"* {c}" for c in context), "",
                      f"![perplexity vs bits per weight]({plot_name})", "",
                      f"Pareto frontier (no other row has both fewer bits and lower perplexity): {frontier}.", "",
                      "bpw = bits per weight of the decoder linears, from the stored bytes (codes + scales/mins); "
                      "embeddings, LM head and norms stay 16-bit and are in total MB.", "", table, ""])


def _ppl_str(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:,.0f}"


def plot_pareto(points: Sequence[Point], out: str | Path, title: str) -> Path:
    """Perplexity (log) vs bits per weight: one marker series per method, fp16 as a reference, frontier drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowbitError("the Pareto plot needs the report extra: pip install 'lowbit[report]'") from None
    fig, ax = plt.subplots(figsize=(9, 6))
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.series, []).append(p)
    base = groups.pop(BASELINE_VARIANT, [None])[0]
    front = pareto_front(points)
    # Collapsed variants (ppl 10^4..10^10) would flatten the useful range: cap the axis and say what is off it.
    ref = base.ppl if base else min(p.ppl for p in points)
    top = max(max(p.ppl for p in front) * 3, ref * 30)
    quantized = [p for pts in groups.values() for p in pts]
    # 16-bit rows (fp16 + simulated activations) would stretch the axis over the empty 6..16 range: listed instead.
    x_hi = max([p.bpw for p in quantized if p.bpw < 16] or [16.0])
    markers = "osD^v<>phXP8H"
    for i, (series, pts) in enumerate(sorted(groups.items())):
        shown = [p for p in pts if p.ppl <= top and p.bpw <= x_hi]
        ax.scatter([p.bpw for p in shown], [p.ppl for p in shown], marker=markers[i % len(markers)], s=30,
                   alpha=0.8, label=f"{series} ({len(shown)}/{len(pts)})")
    if base:
        ax.axhline(base.ppl, color="black", linestyle=":", linewidth=1,
                   label=f"fp16 reference: {base.ppl:.2f} at 16 bpw")
    drawn = [p for p in front if p.bpw <= x_hi]  # fp16 itself lies at 16 bpw, off the axis when x_hi is smaller
    ax.step([p.bpw for p in drawn], [p.ppl for p in drawn], where="post", color="crimson", linewidth=1.5,
            label="Pareto frontier", zorder=2)
    ax.scatter([p.bpw for p in drawn], [p.ppl for p in drawn], s=110, facecolors="none", edgecolors="crimson",
               linewidths=1.5, zorder=4)
    for p in drawn:
        ax.annotate(p.variant, (p.bpw, p.ppl), textcoords="offset points", xytext=(8, 3), fontsize=6.5,
                    color="crimson")
    hidden = [p for p in quantized if p.ppl > top or p.bpw > x_hi]
    if hidden:
        ax.text(0.01, 0.99, f"not drawn (see the table): {len(hidden)} rows above ppl {top:,.0f} or at 16 bpw",
                transform=ax.transAxes, fontsize=7, va="top")
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlim(min(p.bpw for p in points) - 0.15, x_hi + 0.25)
    ax.set_xlabel("bits per weight of the decoder linears (from stored bytes)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def hardware(device: str) -> str:
    import platform

    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_report(points: Sequence[Point], out_dir: str | Path, title: str, context: Sequence[str]) -> Path:
    """DIR/report.md and DIR/pareto.png; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pareto(points, out / "pareto.png", title)
    md = out / "report.md"
    md.write_text(report_markdown(points, title, context))
    return md
