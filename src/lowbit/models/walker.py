"""Where the decoder layers and their linear layers live in each supported Hugging Face architecture."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.models.quant_linear import QuantLinear
from lowbit.rotations.incoherence import Rotation

# model_type -> dotted path of the ModuleList of decoder layers
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}
SUPPORTED = tuple(DECODER_LAYERS)


def check_supported(model_type: str) -> None:
    if model_type not in DECODER_LAYERS:
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}; lowbit supports {', '.join(SUPPORTED)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = model.config.model_type
    check_supported(model_type)
    return model.get_submodule(DECODER_LAYERS[model_type])


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D (a linear layer storing its weight as [in, out]), or a QuantLinear."""
    return isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever the module's own layout."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if isinstance(module, QuantLinear):
        return module.dequantize()
    return module.weight.data.t()


def empty_quant_linear(module: nn.Module, format_name: str, rotation: Rotation | None = None) -> QuantLinear:
    """A QuantLinear shaped like ``module`` (same features, bias, device), its buffers to be loaded."""
    out_f, in_f = linear_weight(module).shape
    return QuantLinear(in_f, out_f, format_name, bias=getattr(module, "bias", None) is not None,
                       device=module_device(module), rotation=rotation)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module for every linear layer inside the decoder layers, in execution order."""
    prefix = DECODER_LAYERS[model.config.model_type]
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if is_linear(module):
                out[f"{prefix}.{i}.{name}"] = module
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def round_to_storage(model: nn.Module) -> nn.Module:
    """Round unquantized float weights to float16, as they are stored, while computing in float32."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.half().to(p.dtype))
    return model
