"""Round-to-nearest: every decoder linear layer replaced by its format's nearest-level quantization."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.plans import check_finite, validate_plan
from lowbit.errors import LowbitError, one_line
from lowbit.formats import get_format, row_format
from lowbit.models.fused_linears import layer_rotation
from lowbit.models.fused_rotation import untie_head
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import linear_weight, set_module


def quantize_rtn(model: nn.Module, plan: dict[str, str], progress: bool = True,
                 rotate: bool = False, seed: int = 0) -> dict[str, float]:
    """Quantize in place the linears named in ``plan`` (name -> format); returns name -> relative error.

    ``rotate``: incoherence processing, rounding W V^T with randomized Hadamards V (:func:`layer_rotation`, undone
    online).
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
        errors[name] = _relative_error(q, w)
        set_module(model, name, q)
    return errors


def _relative_error(q: QuantLinear, w: torch.Tensor) -> float:
    return ((q.dequantize() - w).norm() / w.norm().clamp_min(1e-12)).item()


def quantize_head(model: nn.Module, format_name: str) -> tuple[str, float]:
    """Round the LM head to nearest in ``format_name`` in place (llama.cpp's fallback type where a k-quant's
    superblocks do not divide its rows, as ``formats.row_format`` says); returns (format used, relative error).
    A head tied to the input embeddings is untied first: the embeddings stay 16-bit."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise LowbitError(f"the LM head is {type(head).__name__}, not a float linear layer: nothing to quantize")
    w = head.weight.detach().float()
    check_finite("LM head", w)
    fmt = row_format(format_name, w.shape[1])
    if fmt is None:
        raise LowbitError(f"LM head: {format_name} and its fallback cannot hold rows of {w.shape[1]} weights")
    try:
        qt = get_format(fmt).quantize(w)
    except ValueError as e:
        raise LowbitError(f"LM head [{w.shape[0]}, {w.shape[1]}] in {fmt}: {one_line(e)}") from None
    untie_head(model)
    q = QuantLinear.from_quantized(qt, None if head.bias is None else head.bias.data)
    model.set_output_embeddings(q)
    return fmt, _relative_error(q, w)
