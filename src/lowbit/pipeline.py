"""End-to-end jobs shared by the CLI and the benchmarks: quantize a model, evaluate variants side by side."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lowbit.algorithms.rtn import quantize_rtn, uniform_plan
from lowbit.algorithms.sequential import CalibConfig, GPTQConfig, quantize_sequential
from lowbit.data.corpus import load_text
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import choose_seqlen, perplexity, tokenize_stream
from lowbit.eval.report import markdown_table
from lowbit.eval.sizes import model_size
from lowbit.formats import get_format

BASELINE = "fp16"
METHODS = ("rtn", "gptq", "gptq_act")  # gptq_act = GPTQ with act-order; "+rht" suffix = Hadamard rotation


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def round_to_storage(model: nn.Module) -> nn.Module:
    """Round unquantized float weights to float16, as they are stored, while computing in float32."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().to(p.dtype))
    return model


def parse_variant(spec: str) -> tuple[str, str | None]:
    """``fp16`` -> (baseline, None); ``[method:]format`` -> (method, format name), both validated."""
    spec = spec.strip()
    if spec.lower() in (BASELINE, "bf16", "16bit"):
        return BASELINE, None
    method, _, fmt = spec.rpartition(":")
    method = method or "rtn"
    if method.removesuffix("+rht") not in METHODS:
        raise LowbitError(f"unknown method {method!r} in {spec!r}; known: {', '.join(METHODS)}")
    get_format(fmt)
    return method, fmt


def quantize(model: nn.Module, method: str, format_name: str, tokenizer: object = None,
             calib: CalibConfig | None = None, gptq: GPTQConfig | None = None, device: str | None = None,
             checkpoint_dir: str | None = None, progress: bool = True) -> dict[str, object]:
    """Quantize every decoder linear of ``model`` in place; returns per-linear statistics."""
    plan = uniform_plan(model, format_name)
    method, rotate = method.removesuffix("+rht"), method.endswith("+rht")
    if method == "rtn":
        return quantize_rtn(model, plan, progress=progress, rotate=rotate)
    if method in ("gptq", "gptq_act"):
        if tokenizer is None:
            raise LowbitError("GPTQ needs the tokenizer to build calibration samples")
        cfg = replace(gptq or GPTQConfig())
        cfg.act_order = cfg.act_order or method == "gptq_act"
        cfg.rotate = cfg.rotate or rotate
        report = quantize_sequential(model, tokenizer, plan, calib=calib, gptq=cfg, device=device,
                                     checkpoint_dir=checkpoint_dir, progress=progress)
        return dict(report.linears)
    raise LowbitError(f"unknown method {method!r}")


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


HEADERS = ("variant", "bpw (linears)", "linears MB", "embed+head MB", "total MB", "ppl", "Δ vs fp16 %",
           "quant s", "eval s")


def compare(model: nn.Module, tokenizer: object, variants: list[str], seqlen: int | None = None,
            max_windows: int | None = None, text_path: str | None = None, progress: bool = True,
            calib: CalibConfig | None = None, gptq: GPTQConfig | None = None,
            on_row=None) -> tuple[list[Row], dict]:  # noqa: ANN001
    """Quantize copies of ``model`` (float, 16-bit-rounded) into each variant and measure perplexity."""
    parsed = [(v, *parse_variant(v)) for v in variants]  # fail fast on a bad name
    if not any(m == BASELINE for _, m, _ in parsed):
        parsed.insert(0, (BASELINE, BASELINE, None))
    seqlen = choose_seqlen(model, seqlen)
    ids = tokenize_stream(tokenizer, load_text("eval", text_path))
    rows, base_ppl = [], None
    for spec, method, fmt in parsed:
        m = model if method == BASELINE else copy.deepcopy(model)
        t0 = time.perf_counter()
        if method != BASELINE:
            device = str(next(m.parameters()).device)
            quantize(m, method, fmt, tokenizer, calib=calib, gptq=gptq, device=device, progress=progress)
        t1 = time.perf_counter()
        res = perplexity(m, ids, seqlen, max_windows=max_windows, progress=progress, desc=spec)
        t2 = time.perf_counter()
        base_ppl = res.ppl if method == BASELINE else base_ppl
        size = model_size(m)
        row = Row(spec, size.linear_bpw, size.linear_bytes / 1e6, size.embed_head_bytes / 1e6, size.total_mb,
                  res.ppl, 100.0 * (res.ppl / base_ppl - 1.0), t1 - t0, t2 - t1)
        rows.append(row)
        if on_row:
            on_row(row)
        del m
    protocol = {"seqlen": seqlen, "windows": res.n_windows, "predicted_tokens": res.n_predicted,
                "eval_tokens_available": ids.numel()}
    return rows, protocol


def rows_table(rows: list[Row]) -> str:
    return markdown_table(HEADERS, [list(asdict(r).values()) for r in rows])
