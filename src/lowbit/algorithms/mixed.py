"""Mixed precision: per decoder layer, pick one of several formats under a size budget.

A mix is written ``LOW/.../HIGH@BUDGET`` (formats from fewest to most bits):

  ``nz2_ch/int4_g128_sym@12L``                  the 12 most sensitive layers in int4, the rest in nz2
  ``nz2_ch/int3_g128_sym/int4_g128_sym@2.5bpw`` average 2.5 bits per weight over the decoder linears
  ``nz2_ch/int4_g128_sym@60MB``                 whole model (embeddings, head and norms included) <= 60 MB

Sensitivity is measured, not guessed: for every layer and candidate format, that layer alone is rounded (RTN, with
the same rotation the method will use) and the increase of the mean next-token NLL on calibration text is
recorded (text disjoint from the evaluation split). Treating those increases as additive, a multiple-choice
knapsack (dynamic programming over byte buckets, costs rounded up so the budget always holds) chooses the
formats; bytes come from each format's exact storage spec, so the size reported after quantizing is the true one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import quantize_rtn
from lowbit.calibration.samples import calibration_samples
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import choose_seqlen
from lowbit.eval.sizes import model_size
from lowbit.formats import get_format
from lowbit.models.walker import DECODER_LAYERS, decoder_layers, decoder_linears, linear_weight, set_module

_BUDGET = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>L|bpw|MB)$", re.IGNORECASE)
_BUCKETS = 4000  # DP resolution: the budget is split into this many byte buckets


@dataclass(frozen=True)
class MixSpec:
    formats: tuple[str, ...]  # candidates, cheapest first
    value: float
    unit: str  # "L" (layers at the last format), "bpw" (decoder linears) or "MB" (whole model)

    def __str__(self) -> str:
        return f"{'/'.join(self.formats)}@{self.value:g}{self.unit}"


def is_mix(spec: str) -> bool:
    return "@" in spec or "/" in spec


def parse_mix(spec: str) -> MixSpec:
    fmts, at, budget = spec.partition("@")
    names = tuple(f.strip() for f in fmts.split("/") if f.strip())
    m = _BUDGET.match(budget.strip())
    if not at or not m or len(names) < 2:
        raise LowbitError(f"bad mixed-precision spec {spec!r}; expected LOW/HIGH[/...]@<n>L|<x>bpw|<x>MB, "
                          "e.g. nz2_ch/int4_g128_sym@12L")
    for n in names:
        get_format(n)
    unit = {"l": "L", "bpw": "bpw", "mb": "MB"}[m["unit"].lower()]
    if unit == "L" and len(names) != 2:
        raise LowbitError(f"{spec!r}: a layer count (@<n>L) needs exactly two formats")
    return MixSpec(names, float(m["value"]), unit)


def layer_linears(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Per decoder layer: full linear name -> module."""
    linears = decoder_linears(model)
    path = DECODER_LAYERS[model.config.model_type]
    return [{n: m for n, m in linears.items() if n.startswith(f"{path}.{i}.")}
            for i in range(len(decoder_layers(model)))]


def layer_bytes(model: nn.Module, formats: tuple[str, ...]) -> list[list[int]]:
    """Stored bytes of each layer's linears in each format (exact: from the formats' storage specs)."""
    out = []
    for lin in layer_linears(model):
        row = []
        for f in formats:
            fmt = get_format(f)
            row.append(sum(fmt.stored_bytes(tuple(linear_weight(m).shape)) for m in lin.values()))
        out.append(row)
    return out


@torch.no_grad()
def mean_nll(model: nn.Module, samples: torch.Tensor, batch: int = 4) -> float:
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch):
        ids = samples[i : i + batch].to(dev)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def layer_sensitivity(model: nn.Module, samples: torch.Tensor, formats: tuple[str, ...], rotate: bool = False,
                      progress: bool = True) -> list[list[float]]:
    """NLL increase when only layer i is rounded (RTN) to format j; [n_layers][n_formats]. Model is restored."""
    base = mean_nll(model, samples)
    layers = layer_linears(model)
    out = []
    bar = tqdm(total=len(layers) * len(formats), desc="sensitivity", unit="eval", disable=not progress)
    for lin in layers:
        row = []
        for f in formats:
            quantize_rtn(model, dict.fromkeys(lin, f), progress=False, rotate=rotate)
            row.append(mean_nll(model, samples) - base)
            for name, module in lin.items():  # put the float layer back
                set_module(model, name, module)
            bar.update()
        out.append(row)
    bar.close()
    return out


def choose_formats(costs: list[list[int]], losses: list[list[float]], budget: int) -> list[int]:
    """Multiple-choice knapsack: one option per layer, total cost <= budget, least total loss (exact DP)."""
    n = len(costs)
    unit = max(1, math.ceil(budget / _BUCKETS))
    cap = budget // unit
    ucost = [[math.ceil(c / unit) for c in row] for row in costs]
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[b]: least loss of the layers so far using exactly b buckets
    picks: list[list[int]] = []
    for i in range(n):
        new = [inf] * (cap + 1)
        pick = [-1] * (cap + 1)
        for b, val in enumerate(best):
            if val == inf:
                continue
            for j, c in enumerate(ucost[i]):
                nb = b + c
                if nb <= cap and val + losses[i][j] < new[nb]:
                    new[nb], pick[nb] = val + losses[i][j], j
        best = new
        picks.append(pick)
    end = min(range(cap + 1), key=lambda b: best[b])
    if best[end] == inf:
        cheapest = sum(min(r) for r in costs)
        raise LowbitError(f"budget of {budget} bytes is below the smallest possible size ({cheapest} bytes)")
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        j = picks[i][end]
        choice[i] = j
        end -= ucost[i][j]
    return choice


def top_layers(losses: list[list[float]], count: int) -> list[int]:
    """The ``count`` layers that gain most from the second format (by measured sensitivity)."""
    if not 0 <= count <= len(losses):
        raise LowbitError(f"cannot keep {count} of {len(losses)} layers at higher precision")
    gain = sorted(range(len(losses)), key=lambda i: losses[i][0] - losses[i][1], reverse=True)
    keep = set(gain[:count])
    return [1 if i in keep else 0 for i in range(len(losses))]


@dataclass
class MixPlan:
    plan: dict[str, str]  # linear name -> format
    layer_formats: list[str]
    sensitivity: list[list[float]]
    estimated_linear_bytes: int
    estimated_loss: float


def mixed_plan(model: nn.Module, tokenizer: object, spec: MixSpec | str, rotate: bool = False,
               nsamples: int = 16, seqlen: int = 512, seed: int = 0, text_path: str | None = None,
               progress: bool = True) -> MixPlan:
    """Measure per-layer sensitivity on calibration text and pick one format per decoder layer under the budget."""
    spec = parse_mix(spec) if isinstance(spec, str) else spec
    samples = calibration_samples(tokenizer, nsamples, choose_seqlen(model, seqlen), seed=seed, text_path=text_path)
    sens = layer_sensitivity(model, samples, spec.formats, rotate=rotate, progress=progress)
    costs = layer_bytes(model, spec.formats)
    if spec.unit == "L":
        choice = top_layers(sens, int(spec.value))
    else:
        choice = choose_formats(costs, sens, _linear_budget(model, spec))
    layers = layer_linears(model)
    plan = {name: spec.formats[j] for lin, j in zip(layers, choice, strict=True) for name in lin}
    return MixPlan(plan, [spec.formats[j] for j in choice], sens,
                   sum(costs[i][j] for i, j in enumerate(choice)), sum(sens[i][j] for i, j in enumerate(choice)))


def _linear_budget(model: nn.Module, spec: MixSpec) -> int:
    """Bytes available to the decoder linears (biases included) under a bpw or whole-model MB budget."""
    size = model_size(model)
    n_weights = sum(linear_weight(m).numel() for m in decoder_linears(model).values())
    biases = size.linear_bytes - 2 * n_weights  # float model: linears are 16-bit weights + biases
    if spec.unit == "bpw":
        return int(spec.value * n_weights / 8)
    rest = size.embed_head_bytes + size.other_bytes + biases
    budget = int(spec.value * 1e6) - rest
    if budget <= 0:
        raise LowbitError(f"{spec.value:g} MB is less than the unquantized parts alone ({rest / 1e6:.2f} MB)")
    return budget
