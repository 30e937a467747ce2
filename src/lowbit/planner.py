"""``lowbit plan``: which model x format fits a memory budget, and which is likely best.

Sizes are exact, perplexities are measured where possible and estimated otherwise:

* **Size** = decoder linears at the format's stored bytes (its ``storage_spec`` per linear shape, biases fp16)
  + embeddings / LM head (a tied head once) / norms in fp16, exactly what ``model_size`` reports after
  ``pipeline.quantize``; + a runtime allowance: the KV cache for ``context`` tokens in fp16 and the float32
  activations of one 512-token prefill chunk. Shapes come from the config alone: the model is built on the meta
  device, so no weights are read. A mix ``LOW/HIGH@NL`` is exact (layers of one model have equal shapes); a mix
  with a ``bpw``/``MB`` budget is counted at its budget (an upper bound).
* **Perplexity**: a row measured for the same model and exact variant (results JSON) is used as is. Otherwise,
  from the measured rows (weight-only, one method at a time, any model with an fp16 row), the relative increase
  ``ppl / ppl_fp16 - 1`` is interpolated in log-log against bits per weight along that method's best rows, and
  multiplied onto the candidate's fp16 perplexity (measured, or given with ``--fp16-ppl``). This transfers a
  small model's relative losses to a larger one, which is pessimistic: larger models lose less at the same bpw.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.eval.report import Point, load_results, pareto_front

ACT_CHUNK_TOKENS = 512  # prefill is assumed to run in chunks of this many tokens (activation allowance)
DEFAULT_VARIANTS = ["fp16", "q8_0", "rtn:int4_g32_asym", "rtn:int4_g128_sym", "gptq+rht:int4_g128_sym",
                    "gptq+rht:int3_g128_sym", "gptq+rht:e8p_ch", "gptq+rht:nz2_ch"]
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_REL_FLOOR = 1e-4  # relative increases below this (e.g. re-rounding onto the model's own grid) count as this


def parse_memory(text: str) -> int:
    """``4GB`` (10^9), ``4GiB`` (2^30), ``512MB`` -> bytes. A unit is required: a bare number is ambiguous."""
    m = _MEMORY.match(text)
    if not m or m[2].lower() not in _UNITS:
        raise LowbitError(f"--memory must be a size with a unit, e.g. 4GB, 512MB or 3.5GiB; got {text!r}")
    value = int(float(m[1]) * _UNITS[m[2].lower()])
    if value <= 0:
        raise LowbitError(f"--memory must be positive, got {text!r}")
    return value


@dataclass
class ModelShapes:
    """What the planner needs from a model, read from its config (built on the meta device)."""

    name: str
    linear_shapes: list[tuple[int, int]]  # [out, in] of every decoder linear, in order
    linear_bias_params: int
    layer_count: int
    embed_head_params: int
    other_params: int
    kv_per_token: int  # K and V values per token over all layers
    act_width: int  # floats per token alive during a layer's forward (hidden + MLP width, a few times)
    vocab: int

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes)


def model_name(name: str | None) -> str:
    from lowbit.data.assets import DEFAULT_MODEL

    if name is None:
        return DEFAULT_MODEL
    p = Path(name).expanduser()
    return p.resolve().name if p.exists() else name


def read_shapes(name: str | None) -> ModelShapes:
    """Exact parameter shapes of a model from its config only: nothing is loaded or allocated."""
    from transformers import AutoModelForCausalLM

    from lowbit.io.loader import load_config
    from lowbit.models.walker import decoder_layers, decoder_linears, linear_weight

    _, config = load_config(name)
    with torch.device("meta"):  # shapes without memory: a 70B model costs nothing here
        model = AutoModelForCausalLM.from_config(config)
    linears = decoder_linears(model)
    counted = {id(m.weight) for m in linears.values()}
    bias = [m.bias for m in linears.values() if getattr(m, "bias", None) is not None]
    counted |= {id(b) for b in bias}
    embed = 0
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None and id(emb.weight) not in counted:  # a tied head is stored once
            embed += emb.weight.numel()
            counted.add(id(emb.weight))
    other = sum(t.numel() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
                if id(t) not in counted and t.is_floating_point())
    shapes = [tuple(linear_weight(m).shape) for m in linears.values()]
    return ModelShapes(model_name(name), shapes, sum(b.numel() for b in bias), len(decoder_layers(model)),
                       embed, other, _kv_per_token(config), _act_width(config, shapes), config.vocab_size)


def _kv_per_token(config: object) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim


def _act_width(config: object, shapes: list[tuple[int, int]]) -> int:
    # residual + normed input + attention output + q/k/v + MLP up/gate/act: ~4 hidden + 3 MLP widths per token
    return 4 * config.hidden_size + 3 * max(o for o, _ in shapes)


def linear_bytes(shapes: ModelShapes, format_name: str | None) -> int:
    """Stored bytes of the decoder linears (biases in fp16) in one format, a mix, or 16-bit (``None``)."""
    from lowbit.algorithms.mixed import is_mix, parse_mix

    bias = 2 * shapes.linear_bias_params
    if format_name is None:
        return 2 * shapes.linear_params + bias
    if not is_mix(format_name):
        return _format_bytes(shapes.linear_shapes, format_name) + bias
    spec = parse_mix(format_name)
    if spec.unit == "L":
        if not 0 <= spec.value <= shapes.layer_count:
            raise LowbitError(f"{format_name}: the model has {shapes.layer_count} layers")
        per_layer = len(shapes.linear_shapes) // shapes.layer_count
        layer = shapes.linear_shapes[:per_layer]  # decoder layers of one model share their shapes
        low, high = (_format_bytes(layer, f) for f in spec.formats)
        n_high = int(spec.value)
        return (shapes.layer_count - n_high) * low + n_high * high + bias
    if spec.unit == "bpw":
        return int(spec.value * shapes.linear_params / 8) + bias
    return int(spec.value * 1e6) - 2 * (shapes.embed_head_params + shapes.other_params)


def _format_bytes(linear_shapes: list[tuple[int, int]], format_name: str) -> int:
    from lowbit.formats import get_format

    fmt = get_format(format_name)
    return sum(fmt.stored_bytes(shape) for shape in linear_shapes)


def stored_bytes(shapes: ModelShapes, format_name: str | None) -> int:
    """The model as stored: what ``model_size(model).total_bytes`` reports after quantizing into the format."""
    return linear_bytes(shapes, format_name) + 2 * (shapes.embed_head_params + shapes.other_params)


def runtime_bytes(shapes: ModelShapes, context: int) -> int:
    """KV cache for ``context`` tokens in fp16 + float32 activations of one prefill chunk + one logits row."""
    chunk = min(context, ACT_CHUNK_TOKENS)
    return 2 * shapes.kv_per_token * context + 4 * (chunk * shapes.act_width + shapes.vocab)


# --- perplexity: measured rows, else the relative-increase curves ---------------------------------------------------

@dataclass
class Estimate:
    ppl: float | None  # None when the candidate's fp16 perplexity is unknown
    rel: float | None  # ppl / ppl_fp16 - 1
    how: str  # "measured (file)" or how it was estimated


class QualityModel:
    """Measured rows per model, and per method the relative increase vs bpw (log-log interpolation)."""

    def __init__(self, points_by_model: dict[str, list[Point]]):
        self.points_by_model = points_by_model
        self.fp16 = {m: p.ppl for m, pts in points_by_model.items() for p in pts if p.variant == "fp16"}
        self.curves: dict[str, list[tuple[float, float, str]]] = {}  # method -> [(bpw, rel, variant)]
        for model, pts in points_by_model.items():
            if model not in self.fp16:
                continue
            by_method: dict[str, list[Point]] = {}
            for p in pts:
                if p.series != "fp16" and " " not in p.series:  # weight-only rows (no +aN/+kvN simulation)
                    by_method.setdefault(p.series, []).append(p)
            for method, mpts in by_method.items():
                curve = [(p.bpw, max(p.ppl / self.fp16[model] - 1, _REL_FLOOR), f"{p.variant} on {model}")
                         for p in pareto_front(mpts)]
                self.curves.setdefault(method, []).extend(curve)
        for curve in self.curves.values():
            curve.sort()

    def estimate(self, model: str, variant: str, bpw: float, fp16_ppl: float | None) -> Estimate:
        from lowbit.eval.report import series_of

        for p in self.points_by_model.get(model, []):
            if p.variant == variant:
                base = self.fp16.get(model)
                return Estimate(p.ppl, p.ppl / base - 1 if base else None, f"measured ({p.source})")
        fp16_ppl = fp16_ppl if fp16_ppl is not None else self.fp16.get(model)
        if variant == "fp16":
            return Estimate(fp16_ppl, 0.0, "fp16 reference" + ("" if fp16_ppl else " (ppl unknown)"))
        method = series_of(variant)
        curve = self.curves.get(method) or self.curves.get("rtn")
        if not curve:
            return Estimate(None, None, f"no measured rows for method {method}")
        rel, how = _interpolate(curve, bpw)
        if method not in self.curves:
            how += f" (no {method} rows: rtn curve used)"
        return Estimate(fp16_ppl * (1 + rel) if fp16_ppl else None, rel, "estimated: " + how)


def _interpolate(curve: list[tuple[float, float, str]], bpw: float) -> tuple[float, str]:
    """Relative increase at ``bpw`` on a (bpw, rel) curve: log-log between neighbours, clamped at the ends."""
    lo = [c for c in curve if c[0] <= bpw]
    hi = [c for c in curve if c[0] >= bpw]
    if not lo:
        return hi[0][1], f"below the measured range, clamped to {hi[0][2]}"
    if not hi:
        return lo[-1][1], f"above the measured range, clamped to {lo[-1][2]} (pessimistic)"
    (b0, r0, v0), (b1, r1, v1) = lo[-1], hi[0]
    if b0 == b1:
        return min(r0, r1), f"same bpw as {v0}"
    t = (math.log(bpw) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0))), f"log-log between {v0} and {v1}"


def load_quality(files: list[str] | None) -> QualityModel:
    """Measured rows grouped by the model named in each file's header (no header: the bundled model)."""
    from lowbit.data.assets import DEFAULT_MODEL

    if files is None:
        files = sorted(glob.glob(str(Path(__file__).resolve().parents[3] / "benchmarks/results/quality-*.json")))
    if not files:
        return QualityModel({})
    points, meta = load_results(files)
    model_of = {}
    for m in meta:
        found = re.search(r"model: ([^\s;,]+)", m.get("header") or "")
        model_of[Path(m["file"]).stem] = found[1] if found else DEFAULT_MODEL
    grouped: dict[str, list[Point]] = {}
    for p in points:
        grouped.setdefault(model_of[p.source], []).append(p)
    return QualityModel(grouped)


# --- the plan ----------------------------------------------------------------------------------------------------

@dataclass
class Candidate:
    model: str
    variant: str
    bpw: float
    stored: int
    runtime: int
    params: int
    estimate: Estimate

    @property
    def total(self) -> int:
        return self.stored + self.runtime


def candidates(shapes: ModelShapes, variants: list[str], context: int, quality: QualityModel,
               fp16_ppl: float | None) -> list[Candidate]:
    from lowbit.recipe import Variant

    out = []
    runtime = runtime_bytes(shapes, context)
    params = shapes.linear_params + shapes.embed_head_params + shapes.other_params
    for v in variants:
        recipe = Variant.parse(v).recipe
        fmt = None if recipe is None else recipe.format
        lin = linear_bytes(shapes, fmt)
        bpw = 8 * (lin - 2 * shapes.linear_bias_params) / shapes.linear_params
        out.append(Candidate(shapes.name, v, bpw, stored_bytes(shapes, fmt),
                             runtime, params, quality.estimate(shapes.name, v, bpw, fp16_ppl)))
    return out


def recommend(fits: list[Candidate]) -> tuple[Candidate | None, str]:
    """The fitting candidate with the lowest estimated perplexity, and why."""
    if not fits:
        return None, "nothing fits: raise --memory, shorten --context or pick a smaller model"
    known = [c for c in fits if c.estimate.ppl is not None]
    if known:
        best = min(known, key=lambda c: c.estimate.ppl)
        return best, f"lowest estimated perplexity among the {len(fits)} candidates that fit"
    # No perplexity for any candidate's fp16 model: fall back to a stated rule of thumb.
    ok = [c for c in fits if c.estimate.rel is not None and c.estimate.rel <= 0.10]
    if ok:
        best = max(ok, key=lambda c: (c.params, -c.estimate.rel))
        return best, ("no fp16 perplexities known (pass --fp16-ppl MODEL=PPL), so assumed: the most parameters "
                      "among candidates estimated within 10% of their own fp16 model wins (larger models at "
                      "~4 bits usually beat smaller ones at 8 bits)")
    best = min((c for c in fits if c.estimate.rel is not None), key=lambda c: c.estimate.rel, default=fits[0])
    return best, "no fp16 perplexities known and nothing within 10% of fp16: smallest estimated relative loss"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _ppl(e: Estimate) -> str:
    if e.ppl is not None:
        return f"{e.ppl:.2f}"
    return f"fp16 {e.rel * 100:+.1f}%" if e.rel is not None else "?"


def parse_fp16_ppl(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[model_name(name) if sep else ""] = float(value)
        except ValueError:
            raise LowbitError(f"--fp16-ppl takes MODEL=PPL, got {item!r}") from None
        if not sep:
            raise LowbitError(f"--fp16-ppl takes MODEL=PPL, got {item!r}")
    return out


def run_plan(models: list[str | None], memory: str, context: int = 4096, formats: str | None = None,
             results: list[str] | None = None, fp16_ppl: list[str] | None = None, show_all: bool = False) -> str:
    """The text ``lowbit plan`` prints."""
    from lowbit.eval.report import markdown_table

    budget = parse_memory(memory)
    if context < 0:
        raise LowbitError(f"--context must be >= 0, got {context}")
    variants = [v.strip() for v in formats.split(",") if v.strip()] if formats else DEFAULT_VARIANTS
    known = parse_fp16_ppl(fp16_ppl or [])
    quality = load_quality(results)
    rows: list[Candidate] = []
    for m in models:
        shapes = read_shapes(m)
        rows += candidates(shapes, variants, context, quality, known.get(shapes.name))
    fits = [c for c in rows if c.total <= budget]
    best, why = recommend(fits)
    shown = sorted(rows if show_all else fits, key=lambda c: (c.model, -c.bpw))
    table = markdown_table(("model", "variant", "bpw", "weights MB", "KV+act MB", "total MB", "fits", "ppl",
                            "ppl source"),
                           [(c.model, c.variant, f"{c.bpw:.3f}", _mb(c.stored), _mb(c.runtime), _mb(c.total),
                             "yes" if c.total <= budget else "no", _ppl(c.estimate), c.estimate.how) for c in shown])
    lines = [f"budget {_mb(budget)} MB; context {context} tokens (KV cache fp16); "
             f"{len(fits)} of {len(rows)} candidates fit", "", table if shown else "(no rows)", ""]
    if best:
        lines.append(f"recommended: {best.model} {best.variant} ({best.bpw:.2f} bpw, {_mb(best.total)} MB, "
                     f"ppl {_ppl(best.estimate)}, {best.estimate.how}): {why}.")
        lines += _comparisons(fits, best)
    else:
        lines.append(f"recommended: none; {why}.")
    lines += ["", "notes: sizes are exact (stored bytes from each format's storage spec; embeddings/head/norms fp16, "
              "a tied head once) plus the runtime allowance; a bpw/MB mix counts at its budget. 'measured' = a row "
              "of the results files for this model and variant; 'estimated' = relative increase over fp16 "
              "interpolated log-log in bpw along the method's measured rows (see lowbit/eval/planner.py), "
              "applied to the candidate's fp16 perplexity - measured on a small model, so pessimistic for larger "
              "ones. On a GPU lowbit generate/serve decode from the packed weights in float16, as counted; on a "
              "CPU they compute in float32 and keep dequantized weights unless --no-weight-cache: budget for "
              "that, or run with the flag."]
    return "\n".join(lines)


def _comparisons(fits: list[Candidate], best: Candidate) -> list[str]:
    """One line per other model: its best fitting variant against the recommendation."""
    out = []
    for model in dict.fromkeys(c.model for c in fits):
        if model == best.model:
            continue
        own = [c for c in fits if c.model == model and c.estimate.ppl is not None]
        if own and best.estimate.ppl is not None:
            alt = min(own, key=lambda c: c.estimate.ppl)
            out.append(f"  vs {alt.model} {alt.variant} ({alt.bpw:.1f} bpw, {_mb(alt.total)} MB, ppl "
                       f"{_ppl(alt.estimate)}): {best.model} at {best.bpw:.1f} bpw is better in the same budget")
    return out
