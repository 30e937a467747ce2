"""Round-to-nearest: every decoder linear layer replaced by its format's nearest-level quantization."""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.plans import validate_plan
from lowbit.formats import get_format
from lowbit.models.fused_linears import layer_rotation
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import linear_weight, set_module


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
        rotation = layer_rotation(name, seed) if rotate else None
        qt = get_format(plan[name]).quantize(rotation.rotate_weight(w) if rotation else w)
        bias = getattr(module, "bias", None)
        q = QuantLinear.from_quantized(qt, None if bias is None else bias.data, rotation)
        errors[name] = ((q.dequantize() - w).norm() / w.norm().clamp_min(1e-12)).item()
        set_module(model, name, q)
    return errors

