"""Loading models: the bundled default, any local HF directory or cached hub id, or a lowbit checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.data.assets import DEFAULT_MODEL, default_model_dir
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import is_quantized_dir, load_quantized
from lowbit.models.walker import check_supported


def resolve(name_or_path: str | Path | None) -> str:
    """The bundled default (``None`` or its alias), a local directory, or a hub id as given."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(default_model_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LowbitError(f"{p} is a file; pass a model directory (config.json + weights)")
        if not (p / "config.json").exists():
            raise LowbitError(f"{p} has no config.json: not a Hugging Face model directory")
        return str(p)
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise LowbitError(f"model path not found: {name_or_path}")
    return str(name_or_path)  # a hub id: only the local cache is consulted


def load_config(name_or_path: str | Path | None) -> tuple[str, object]:
    """(resolved source, config) of a supported float model, read from local files only."""
    from transformers import AutoConfig

    src = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except OSError as e:
        raise LowbitError(f"cannot load {name_or_path!r}: not a local model directory nor a hub id present in "
                          f"the local Hugging Face cache (lowbit never downloads models). ({e})") from None
    check_supported(config.model_type)
    return src, config


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer). Quantized lowbit directories load through :mod:`lowbit.io`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(name_or_path)
    if is_quantized_dir(src):
        return load_quantized(src, dtype=dtype, device=device)
    src, _ = load_config(src)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tok

