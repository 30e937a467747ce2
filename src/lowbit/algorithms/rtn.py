"""Round-to-nearest: every decoder linear layer replaced by its format's nearest-level quantization."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import BadWeightsError, LowbitError
from lowbit.formats import get_format
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, linear_weight, set_module
from lowbit.rotations.incoherence import Rotation


def check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise BadWeightsError(f"{name}: weight has {bad} NaN/Inf values; refusing to quantize")


def validate_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, nn.Module]:
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


def quantize_rtn(model: nn.Module, plan: dict[str, str], progress: bool = True,
                 rotate: bool = False, seed: int = 0) -> dict[str, float]:
    """Quantize in place the linears named in ``plan`` (name -> format); returns name -> relative error.

    ``rotate``: incoherence processing, rounding U W V^T with randomized Hadamard U, V (undone online).
    """
    linears = validate_plan(model, plan)
    errors = {}
    for name in tqdm(plan, desc="rtn", unit="linear", disable=not progress):
        module = linears[name]
        w = linear_weight(module).float()
        rotation = Rotation.for_layer(name, seed) if rotate else None
        qt = get_format(plan[name]).quantize(rotation.rotate_weight(w) if rotation else w)
        bias = getattr(module, "bias", None)
        q = QuantLinear.from_quantized(qt, None if bias is None else bias.data, rotation)
        errors[name] = ((q.dequantize() - w).norm() / w.norm().clamp_min(1e-12)).item()
        set_module(model, name, q)
    return errors


def uniform_plan(model: nn.Module, format_name: str) -> dict[str, str]:
    """Every decoder linear in ``format_name`` (embeddings and LM head stay in 16-bit)."""
    get_format(format_name)
    return {name: format_name for name in decoder_linears(model)}
