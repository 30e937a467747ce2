"""Loading models: the bundled default, any local HF directory or cached hub id, or a lowbit checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.data.assets import DEFAULT_MODEL, default_model_dir
from lowbit.errors import BadFileError, LowbitError, one_line
from lowbit.io.checkpoint import is_quantized_dir, load_quantized, read_info
from lowbit.io.validate import (
    check_checkpoint_files,
    check_finite,
    check_float_dir,
    declared_dtype,
    load_tokenizer,
    read_config,
)
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
    if Path(src).is_dir():  # a local directory: config.json checked field by field, one line per problem
        return src, read_config(Path(src))
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except OSError as e:
        raise LowbitError(f"cannot load {name_or_path!r}: not a local model directory nor a hub id present in "
                          f"the local Hugging Face cache (lowbit never downloads models). ({e})") from None
    check_supported(config.model_type)
    return src, config


def check_source(name_or_path: str | Path | None) -> str:
    """Check a model source's files against each other without reading any weight (headers, shapes, JSON
    fields), so a job fails on a damaged model before it starts; returns the resolved source."""
    src = resolve(name_or_path)
    if is_quantized_dir(src):
        check_checkpoint_files(Path(src), read_info(src))
        return src
    src, config = load_config(src)
    if Path(src).is_dir():
        check_float_dir(Path(src), config)
    return src


def decode_dtype(config: object | None, device: str | torch.device) -> torch.dtype:
    """The dtype a model decodes fastest in on ``device`` (``dtype="auto"``): on CUDA float16 for a lowbit checkpoint
    (``config`` None: its float tensors are stored in float16, and lowbit's GEMVs take float16 activations) and a
    float model's own float16 or bfloat16 (else float16), as transformers would compute it; float32 on a CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    own = None if config is None else declared_dtype(config)
    return own if own in (torch.float16, torch.bfloat16) else torch.float16


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer), computing in ``dtype`` (``"auto"``: :func:`decode_dtype`). Quantized lowbit
    directories load through :mod:`lowbit.io`. A local directory's files are checked against each other first
    (:mod:`lowbit.io.validate`): a damaged one is one BadFileError line, not a traceback from deep inside
    transformers."""
    src = resolve(name_or_path)
    if is_quantized_dir(src):
        return load_quantized(src, dtype=decode_dtype(None, device) if dtype == "auto" else dtype, device=device)
    src, config = load_config(src)
    if dtype == "auto":
        dtype = decode_dtype(config, device)
    if Path(src).is_dir():
        check_float_dir(Path(src), config)
    tok = load_tokenizer(src)
    model = _from_pretrained(src, config, dtype)
    check_finite(model, src)
    return model.to(device).eval(), tok


def _from_pretrained(src: str, config: object, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # what the checks cannot see (.bin files)
        raise BadFileError(f"cannot load the weights of {src}: {one_line(e)}") from None

