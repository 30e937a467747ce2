"""Plans: which format each decoder linear gets (``{linear name: format name}``), the form every algorithm takes.

A uniform format, a measured mixed-precision choice (algorithms.mixed) and another file's types (io.gguf_types)
all resolve to a plan; the helpers here build and check one.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import BadWeightsError, LowbitError
from lowbit.formats import get_format, row_format
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, linear_weight

Plan = dict[str, str]


def check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise BadWeightsError(f"{name}: weight has {bad} NaN/Inf values; refusing to quantize")


def validate_plan(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """Check a plan before anything is touched: known formats, float decoder linears, finite weights.

    Returns name -> module for every decoder linear.
    """
    linears = decoder_linears(model)
    unknown = set(plan) - set(linears)
    if unknown:
        raise LowbitError(f"not linear layers inside decoder layers: {sorted(unknown)[:5]}")
    for name, fmt in plan.items():
        get_format(fmt)
        if isinstance(linears[name], QuantLinear):
            raise LowbitError(f"{name} is already quantized ({linears[name].format_name})")
        check_finite(name, linear_weight(linears[name]))
    return linears


def uniform_plan(model: nn.Module, format_name: str) -> Plan:
    """Every decoder linear in ``format_name`` (embeddings and LM head stay in 16-bit). A k-quant's linears whose
    rows do not fill 256-weight superblocks get llama.cpp's fallback type instead, or stay 16-bit where that does
    not fit either (``formats.row_format``), so the plan is what llama-quantize would write."""
    get_format(format_name)
    plan = {}
    for name, module in decoder_linears(model).items():
        fmt = row_format(format_name, linear_weight(module).shape[1])
        if fmt is not None:
            plan[name] = fmt
    return plan


def plan_by_layer(plan: Plan, prefix: str, n_layers: int) -> list[list[str]]:
    """The plan's linear names grouped by decoder layer index (``prefix.<i>.``...)."""
    by_layer: list[list[str]] = [[] for _ in range(n_layers)]
    for name in plan:
        by_layer[int(name[len(prefix) + 1 :].split(".")[0])].append(name)
    return by_layer
