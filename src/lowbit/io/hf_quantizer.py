"""Loading lowbit checkpoints with transformers: ``AutoModelForCausalLM.from_pretrained(dir)`` after ``import lowbit``.

A checkpoint's config.json carries ``"quantization_config": {"quant_method": "lowbit", ...}`` (written by
:func:`lowbit.io.checkpoint.save_quantized`); transformers hands such a directory to :class:`LowbitHfQuantizer`.
The quantizer reads the per-linear formats and rotations from the checkpoint's ``lowbit.json`` (their one place),
checks every file against the others before any weight is read (:func:`~lowbit.io.validate.check_checkpoint_files`:
a tensor whose shape or dtype its format does not give is named, and nothing is loaded), and swaps empty
QuantLinear modules into the model transformers built on the meta device with lowbit's own loader's code
(:func:`~lowbit.io.checkpoint.install_quant_linears`). transformers then loads the packed buffers like any others.

This module imports transformers; :mod:`lowbit.io.hf_register` imports it only once transformers' quantizer
registry is imported, so ``import lowbit`` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.errors import LowbitError
from lowbit.io.checkpoint import (
    CHECKPOINT_VERSION,
    HF_QUANT_METHOD,
    QUANTIZED_MARKER,
    install_quant_linears,
    read_info,
    upgrade_codes,
)
from lowbit.io.validate import check_checkpoint_files, check_finite
from lowbit.models.quant_linear import QuantLinear


class LowbitConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a lowbit checkpoint. It only routes loading to lowbit: the formats
    and rotations of the linears are read from the checkpoint's lowbit.json. Pass ``LowbitConfig()`` as
    ``from_pretrained(..., quantization_config=...)`` to load a checkpoint saved before config.json carried it."""

    def __init__(self, checkpoint_version: int = CHECKPOINT_VERSION, **kwargs: Any):
        self.quant_method = HF_QUANT_METHOD
        self.checkpoint_version = checkpoint_version
        kwargs.pop("quant_method", None)
        self.__dict__.update(kwargs)  # fields of a newer lowbit are kept (and checked by lowbit.json's version)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "quant_method": HF_QUANT_METHOD}


class LowbitHfQuantizer(HfQuantizer):
    """Builds the checkpoint's QuantLinear modules before transformers loads the weights (nothing is quantized)."""

    requires_calibration = False
    requires_parameters_quantization = False  # transformers 4.x reads it

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        # Weights are always stored packed, also when the config came from the caller (checkpoints saved before
        # config.json held a quantization_config): never quantize on load, load the stored tensors as they are.
        self.pre_quantized = True
        self.checkpoint: Path | None = None
        self.info: dict = {}  # the checkpoint's lowbit.json, read before the weights

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise LowbitError("a lowbit checkpoint cannot be offloaded to disk (device_map has 'disk'); load it on "
                              "one device or CPU")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        # transformers 5 passes the weight files; 4.x only the model, whose config names the directory
        path = Path(checkpoint_files[0]).parent if checkpoint_files else Path(model.config.name_or_path)
        if not (path / QUANTIZED_MARKER).is_file():
            raise LowbitError(f"{path}: config.json says quant_method 'lowbit' but there is no {QUANTIZED_MARKER} "
                              "beside the weights; load the whole directory lowbit.save wrote (from a hub: "
                              "snapshot_download it first)")
        info = read_info(path)
        check_checkpoint_files(path, info)  # headers and shapes only: a disagreement names the tensor, loads nothing
        install_quant_linears(model, info)  # on meta, as transformers built the model; it loads the buffers
        self.checkpoint, self.info = path, info
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                # transformers 4.x casts float buffers to the model dtype: back to the stored ones
                for key, (_, dtype) in m.fmt.storage_spec((m.out_features, m.in_features)).items():
                    if getattr(m, key).dtype != dtype:
                        setattr(m, key, getattr(m, key).to(dtype))
                packed = {f"{name}.{k}": getattr(m, k) for k in m._keys}
                upgrade_codes(packed, self.info)  # an older checkpoint's codes, as this lowbit stores them
                for k in m._keys:
                    setattr(m, k, packed[f"{name}.{k}"])
        check_finite(model, self.checkpoint / "model.safetensors")
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False  # save_pretrained would drop lowbit.json: lowbit.save(model, tokenizer, out) writes all files

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers route ``quant_method: lowbit`` here (idempotent; run when this module is imported)."""
    auto = importlib.import_module("transformers.quantizers.auto")  # also while its package is still importing
    if auto.AUTO_QUANTIZER_MAPPING.get(HF_QUANT_METHOD) is not LowbitHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(HF_QUANT_METHOD, None)
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(HF_QUANT_METHOD, None)
        auto.register_quantization_config(HF_QUANT_METHOD)(LowbitConfig)
        auto.register_quantizer(HF_QUANT_METHOD)(LowbitHfQuantizer)


register()
