"""Side by side: quantize copies of one float model with several recipes and measure each on the same windows
(perplexity, KL divergence and top-1 agreement to the 16-bit model, exact sizes, time)."""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.algorithms.sequential import CalibConfig, GPTQConfig
from lowbit.api import load, quantize
from lowbit.atomic import atomic_file
from lowbit.data.assets import DEFAULT_MODEL
from lowbit.data.corpus import load_text
from lowbit.errors import LowbitError
from lowbit.eval import report
from lowbit.eval.perplexity import Reference, choose_seqlen, perplexity, tokenize_stream
from lowbit.eval.simulate import simulate
from lowbit.eval.sizes import model_size
from lowbit.recipe import BASELINE, Variant


@dataclass
class Row:
    variant: str
    linear_bpw: float
    linear_mb: float
    embed_head_mb: float
    total_mb: float
    ppl: float
    delta_pct: float
    quant_s: float
    eval_s: float
    kl: float | None = None  # mean KL(16-bit || variant), nats per token
    top1: float | None = None  # top-1 agreement with the 16-bit model


HEADERS = ("variant", "bpw (linears)", "linears MB", "embed+head MB", "total MB", "ppl", "Δ vs fp16 %",
           "quant s", "eval s", "KL", "top-1 %")


def parse_variants(specs: list[str], **settings: Any) -> list[Variant]:
    """Every variant parsed before any work, so a bad name fails fast; the plain baseline first, once."""
    parsed = [Variant.parse(s, **settings) for s in specs]
    baseline = next((v for v in parsed if v.is_baseline), Variant(BASELINE, None))
    return [baseline] + [v for v in parsed if not v.is_baseline]


def compare(model: nn.Module, tokenizer: Any, variants: list[str | Variant], seqlen: int | None = None,
            max_windows: int | None = None, text_path: str | None = None, progress: bool = True,
            calib: CalibConfig | None = None, gptq: GPTQConfig | None = None,
            on_row: Callable[[Row], None] | None = None,
            on_model: Callable[[Row, nn.Module], None] | None = None) -> tuple[list[Row], dict]:
    """Quantize copies of ``model`` (float, 16-bit-rounded) into each variant and measure them.

    ``variants``: :class:`Variant` values or their strings (``calib`` and ``gptq`` fill in the strings' settings).
    Returns the rows (baseline first) and the protocol used. ``on_row`` sees each row as it is measured,
    ``on_model`` each row with its quantized model (to keep one).

    >>> rows, protocol = lowbit.compare(model, tok, ["fp16", "rtn:q4_0", "gptq_act:q4_0"], max_windows=8)
    >>> from lowbit.comparison import rows_table; print(rows_table(rows))
    """
    settings = {k: v for k, v in (("calib", calib), ("gptq", gptq)) if v is not None}
    specs = [v.label if isinstance(v, Variant) else v for v in variants]
    given = {v.label: v for v in variants if isinstance(v, Variant)}
    parsed = [given.get(v.label, v) for v in parse_variants(specs, **settings)]
    seqlen = choose_seqlen(model, seqlen)
    ids = tokenize_stream(tokenizer, load_text("eval", text_path))
    reference = Reference(model)
    quantized = _Quantized(model, tokenizer, parsed, progress)
    rows: list[Row] = []
    for variant in parsed:
        m, quant_s = quantized.get(variant)
        simulate(m, variant.sim)
        t1 = time.perf_counter()
        res = perplexity(m, ids, seqlen, max_windows=max_windows, progress=progress, desc=variant.label,
                         reference=reference)
        base_ppl = rows[0].ppl if rows else res.ppl
        size = model_size(m)
        rows.append(Row(variant.label, size.linear_bpw, size.linear_bytes / 1e6, size.embed_head_bytes / 1e6,
                        size.total_mb, res.ppl, 100.0 * (res.ppl / base_ppl - 1.0), quant_s,
                        time.perf_counter() - t1, res.kl, res.top1))
        if on_row:
            on_row(rows[-1])
        if on_model:
            on_model(rows[-1], m)
        del m
    protocol = {"seqlen": seqlen, "windows": res.n_windows, "predicted_tokens": res.n_predicted,
                "eval_tokens_available": ids.numel()}
    return rows, protocol


class _Quantized:
    """Quantized copies by recipe: variants that differ only in simulated activations/KV share one, kept while
    a later variant still needs it."""

    def __init__(self, model: nn.Module, tokenizer: Any, variants: list[Variant], progress: bool):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.uses = Counter(_key(v) for v in variants)
        self.cache: dict[str, tuple[nn.Module, float]] = {}

    def get(self, variant: Variant) -> tuple[nn.Module, float]:
        key = _key(variant)
        self.uses[key] -= 1
        if key in self.cache:
            m, seconds = self.cache[key]
            if self.uses[key] == 0:
                del self.cache[key]
                return m, seconds
            return copy.deepcopy(m), seconds
        if variant.is_baseline:
            return self.model, 0.0
        t0 = time.perf_counter()
        m = copy.deepcopy(self.model)
        if variant.recipe is not None:
            device = str(next(m.parameters()).device)
            quantize(m, variant.recipe, self.tokenizer, device=device, progress=self.progress)
        seconds = time.perf_counter() - t0
        if self.uses[key] > 0:
            self.cache[key] = (copy.deepcopy(m), seconds)
        return m, seconds


def _key(variant: Variant) -> str:
    """Variants with equal recipes (every setting, not only the string form) share one quantization."""
    return "" if variant.recipe is None else json.dumps(variant.recipe.to_json(), sort_keys=True)


def rows_table(rows: list[Row]) -> str:
    return report.markdown_table(HEADERS, [_cells(r) for r in rows])


def _cells(r: Row) -> list:
    cells = list(asdict(r).values())
    cells[-2] = "-" if r.kl is None else f"{r.kl:.4f}"
    cells[-1] = "-" if r.top1 is None else f"{100 * r.top1:.1f}"
    return cells


def write_rows_json(path: str | Path, rows: list[Row], protocol: dict) -> None:
    """Rows + protocol as JSON (what ``lowbit report --from-results`` and the planner read), written atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"rows": [asdict(r) for r in rows], "protocol": protocol}, indent=2))


def quality_report(out: str | Path, *, model: str | None = None, variants: str | None = None,
                   variant_set: str = "quick", from_results: list[str] | None = None, title: str | None = None,
                   command: str = "", device: str | None = None, seqlen: int | None = None,
                   max_windows: int | None = None, text_path: str | None = None, calib: CalibConfig | None = None,
                   gptq: GPTQConfig | None = None, progress: bool = True) -> str:
    """Write ``out``/report.md and ``out``/pareto.png, from results JSON files or by measuring variants now
    (``variants``, comma-separated, or a predefined ``variant_set``); returns a one-line summary."""
    title = title or f"{model or DEFAULT_MODEL}: perplexity vs bits per weight"
    if from_results:
        points, meta = report.load_results(from_results)
        context = [f"command: `{command}`"] + [f"{Path(m['file']).name}: `{m['command']}`; {m['header']}"
                                                for m in meta]
    else:
        specs = _variant_list(variants, variant_set)
        parse_variants(specs, **{k: v for k, v in (("calib", calib), ("gptq", gptq)) if v is not None})
        m, tok = load(model, device=device)
        rows, protocol = compare(m, tok, specs, seqlen=seqlen, max_windows=max_windows, text_path=text_path,
                                 progress=progress, calib=calib, gptq=gptq)
        points = [report.point_from_row(asdict(r)) for r in rows]
        calib = calib or CalibConfig()
        context = [f"command: `{command}`",
                   f"model: {model or DEFAULT_MODEL + ' (bundled)'}; "
                   f"eval text: {text_path or 'bundled SOTU 2000-2021'}",
                   f"protocol: {protocol['windows']} windows x {protocol['seqlen']} tokens, "
                   f"{protocol['predicted_tokens']} predicted tokens of {protocol['eval_tokens_available']} "
                   f"available; GPTQ calibration {calib.nsamples} x {calib.seqlen} tokens (seed {calib.seed})",
                   f"hardware: {report.hardware(str(next(m.parameters()).device))}, float32 compute"]
    md = report.write_report(points, out, title, context)
    front = report.pareto_front(points)
    return (f"wrote {md} and {Path(out) / 'pareto.png'}: {len(points)} rows, Pareto frontier: "
            + ", ".join(p.variant for p in front))


def _variant_list(variants: str | None, variant_set: str) -> list[str]:
    if variants:
        return [v.strip() for v in variants.split(",") if v.strip()]
    if variant_set not in report.REPORT_SETS:
        raise LowbitError(f"unknown report set {variant_set!r}; known: {', '.join(report.REPORT_SETS)}")
    return report.REPORT_SETS[variant_set]
