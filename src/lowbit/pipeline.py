"""End-to-end jobs shared by the CLI and the benchmarks: quantize a model, evaluate variants side by side."""

from __future__ import annotations

import copy
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from lowbit.algorithms.finetune import FinetuneConfig
from lowbit.algorithms.finetune import finetune as tune_scales
from lowbit.algorithms.mixed import is_mix, mixed_plan, parse_mix
from lowbit.algorithms.rtn import quantize_rtn, uniform_plan
from lowbit.algorithms.sequential import CalibConfig, GPTQConfig, calibration_set, quantize_sequential
from lowbit.data.corpus import load_text
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import choose_seqlen, perplexity, tokenize_stream
from lowbit.eval.report import markdown_table
from lowbit.eval.simulate import SimConfig, simulate
from lowbit.eval.sizes import model_size
from lowbit.formats import get_format
from lowbit.rotations.fused import fuse_rotation

BASELINE = "fp16"
# gptq_act = GPTQ with act-order; imatrix = nearest rounding weighted by calibration diag(H) (llama.cpp's imatrix);
# suffixes: "+rht" rotates each linear with randomized Hadamards undone online by QuantLinear (lowbit runtime only);
# "+fused" folds norms and a residual-stream rotation into the float weights first (rotations/fused.py; the model
# stays a plain one, so GGUF export works); "+ft" then tunes the stored float scales and the norms end to end
# against the float model, codes fixed (algorithms/finetune.py; same storage, GGUF included).
METHODS = ("rtn", "gptq", "gptq_act", "imatrix")
SUFFIXES = ("+rht", "+fused", "+ft")
# A variant is [method[+rht]:]format-or-mix[+aN][+kvN]; +aN/+kvN simulate N-bit activations / KV cache.


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def round_to_storage(model: nn.Module) -> nn.Module:
    """Round unquantized float weights to float16, as they are stored, while computing in float32."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().to(p.dtype))
    return model


_SIM = re.compile(r"\+(a|kv)(\d)$", re.IGNORECASE)


def split_sim(spec: str) -> tuple[str, SimConfig]:
    """``gptq+rht:nz2_ch+a4+kv4`` -> (``gptq+rht:nz2_ch``, simulated 4-bit activations and KV cache)."""
    bits: dict[str, int] = {}
    spec = spec.strip()
    while m := _SIM.search(spec):
        bits[m[1].lower()] = int(m[2])
        spec = spec[: m.start()]
    return spec, SimConfig(act_bits=bits.get("a"), kv_bits=bits.get("kv"))


def parse_variant(spec: str) -> tuple[str, str | None]:
    """``fp16`` -> (baseline, None); ``[method:]format`` -> (method, format name or mix spec), both validated."""
    spec = spec.strip()
    if spec.lower() in (BASELINE, "bf16", "16bit"):
        return BASELINE, None
    method, _, fmt = spec.rpartition(":")
    method = method or "rtn"
    if split_method(method)[0] not in METHODS:
        raise LowbitError(f"unknown method {method!r} in {spec!r}; known: {', '.join(METHODS)}, each optionally "
                          f"with any of {', '.join(SUFFIXES)}")
    if is_mix(fmt):
        parse_mix(fmt)
    else:
        get_format(fmt)
    return method, fmt


class MethodSpec(NamedTuple):
    base: str  # rtn, gptq, gptq_act or imatrix
    rotate: bool  # +rht: online per-linear rotation
    fused: bool  # +fused: residual-stream rotation folded into the weights
    finetune: bool  # +ft: end-to-end tuning of scales and norms after rounding


def split_method(method: str) -> MethodSpec:
    """``gptq+fused+rht+ft`` -> MethodSpec(``gptq``, rotate, fused, finetune), suffixes in any order."""
    base, found = method, set()
    while suffix := next((s for s in SUFFIXES if base.endswith(s)), None):
        base = base.removesuffix(suffix)
        found.add(suffix)
    return MethodSpec(base, "+rht" in found, "+fused" in found, "+ft" in found)


def quantize(model: nn.Module, method: str, format_name: str | dict[str, str], tokenizer: object = None,
             calib: CalibConfig | None = None, gptq: GPTQConfig | None = None, device: str | None = None,
             checkpoint_dir: str | None = None, progress: bool = True,
             finetune: FinetuneConfig | None = None) -> dict[str, object]:
    """Quantize every decoder linear of ``model`` in place; returns per-linear statistics.

    ``format_name`` is one format, a mixed-precision spec (``LOW/HIGH@budget``, see algorithms.mixed) whose
    per-layer choice is measured on calibration text first, or a plan {linear name: format}. A ``+ft`` method
    then tunes scales and norms end to end (``finetune`` settings; the report is under ``"finetune"``).
    """
    spec = split_method(method)
    if not spec.finetune:
        return _quantize(model, method, format_name, tokenizer, calib, gptq, device, checkpoint_dir, progress)
    if tokenizer is None:
        raise LowbitError(f"{method} needs the tokenizer to build calibration samples")
    calib = calib or CalibConfig()
    teacher = copy.deepcopy(model)  # the float model (a +fused student computes the same function)
    samples = calibration_set(model, tokenizer, calib)
    stats = _quantize(model, method.replace("+ft", ""), format_name, tokenizer, calib, gptq, device,
                      checkpoint_dir, progress, samples)
    report = tune_scales(model, teacher, samples, finetune, device or default_device(), progress)
    stats["finetune"] = asdict(report)
    return stats


def _quantize(model: nn.Module, method: str, format_name: str | dict[str, str], tokenizer: object,
              calib: CalibConfig | None, gptq: GPTQConfig | None, device: str | None, checkpoint_dir: str | None,
              progress: bool, samples: torch.Tensor | None = None) -> dict[str, object]:
    method, rotate, fused, _ = split_method(method)
    if fused:
        # rounded again: float tensors (embeddings, head, norms) are stored as float16 by checkpoints and GGUF
        round_to_storage(fuse_rotation(model, seed=(gptq or GPTQConfig()).rotation_seed))
    if isinstance(format_name, dict):
        plan = format_name
    elif is_mix(format_name):
        if tokenizer is None:
            raise LowbitError("mixed precision needs the tokenizer to measure layer sensitivity")
        calib = calib or CalibConfig()
        plan = mixed_plan(model, tokenizer, format_name, rotate=rotate, seqlen=min(512, calib.seqlen),
                          seed=calib.seed, text_path=calib.text_path, progress=progress).plan
    else:
        plan = uniform_plan(model, format_name)
    if method == "rtn":
        return quantize_rtn(model, plan, progress=progress, rotate=rotate)
    if method in ("gptq", "gptq_act", "imatrix"):
        if tokenizer is None:
            raise LowbitError(f"{method} needs the tokenizer to build calibration samples")
        cfg = replace(gptq or GPTQConfig())
        cfg.act_order = cfg.act_order or method == "gptq_act"
        if cfg.act_order and all(get_format(f).vector_dim > 1 for f in plan.values()):
            raise LowbitError(f"act-order needs a scalar format; {sorted(set(plan.values()))} are vector "
                              "codebooks (block LDLQ keeps natural order): use gptq")
        cfg.rounding = "imatrix" if method == "imatrix" else cfg.rounding
        cfg.rotate = cfg.rotate or rotate
        report = quantize_sequential(model, tokenizer, plan, calib=calib, gptq=cfg, device=device,
                                     checkpoint_dir=checkpoint_dir, progress=progress, samples=samples)
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
    parsed = []
    for v in variants:  # all parsed before any work: fail fast on a bad name
        base, sim = split_sim(v)
        parsed.append((v, *parse_variant(base), sim))

    def is_plain(p: tuple) -> bool:
        return p[1] == BASELINE and not p[3].active

    # the plain baseline comes first (every delta is relative to it), once
    baseline = next((p for p in parsed if is_plain(p)), (BASELINE, BASELINE, None, SimConfig()))
    parsed = [baseline] + [p for p in parsed if not is_plain(p)]
    # Variants that differ only in simulated activations/KV share one quantization (kept while still needed).
    uses = Counter((method, fmt) for _, method, fmt, _ in parsed)
    cache: dict[tuple, tuple[nn.Module, float]] = {}
    seqlen = choose_seqlen(model, seqlen)
    ids = tokenize_stream(tokenizer, load_text("eval", text_path))
    rows, base_ppl = [], None
    for spec, method, fmt, sim in parsed:
        plain = is_plain((spec, method, fmt, sim))
        key = (method, fmt)
        uses[key] -= 1
        t0 = time.perf_counter()
        if key in cache:
            m, quant_s = copy.deepcopy(cache[key][0]), cache[key][1]
        else:
            m = model if plain else copy.deepcopy(model)
            if method != BASELINE:
                device = str(next(m.parameters()).device)
                quantize(m, method, fmt, tokenizer, calib=calib, gptq=gptq, device=device, progress=progress)
            quant_s = time.perf_counter() - t0
            if uses[key] > 0 and method != BASELINE:
                cache[key] = (copy.deepcopy(m), quant_s)
        if uses[key] == 0:
            cache.pop(key, None)
        simulate(m, sim)
        t1 = time.perf_counter()
        res = perplexity(m, ids, seqlen, max_windows=max_windows, progress=progress, desc=spec)
        t2 = time.perf_counter()
        base_ppl = res.ppl if plain else base_ppl
        size = model_size(m)
        row = Row(spec, size.linear_bpw, size.linear_bytes / 1e6, size.embed_head_bytes / 1e6, size.total_mb,
                  res.ppl, 100.0 * (res.ppl / base_ppl - 1.0), quant_s, t2 - t1)
        rows.append(row)
        if on_row:
            on_row(row)
        del m
    protocol = {"seqlen": seqlen, "windows": res.n_windows, "predicted_tokens": res.n_predicted,
                "eval_tokens_available": ids.numel()}
    return rows, protocol


def rows_table(rows: list[Row]) -> str:
    return markdown_table(HEADERS, [list(asdict(r).values()) for r in rows])
