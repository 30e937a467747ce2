"""Saving and loading quantized models: safetensors for tensors, JSON for what they mean.

A quantized model directory holds:
  model.safetensors   packed linears (codes, scales, ...) + every other parameter in float16
  config.json         the original Hugging Face config, plus ``quantization_config: {"quant_method": "lowbit"}`` so
                      ``transformers``' from_pretrained loads it after ``import lowbit`` (:mod:`lowbit.io.hf_quantizer`)
  lowbit.json         format per quantized linear, method, source, sizes
  tokenizer files     copied from the source model
Reloading rebuilds the architecture from config.json, swaps in QuantLinear modules of the recorded formats
and loads the tensors strictly, so it reproduces the in-memory quantized model bit for bit. transformers' loader
swaps in the same modules (:func:`install_quant_linears`) and reads the same files.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.atomic import atomic_dir
from lowbit.errors import BadFileError, LowbitError
from lowbit.formats import E8PFormat, e8p, get_format
from lowbit.io.validate import (
    check_checkpoint_files,
    check_finite,
    check_info,
    load_safetensors,
    load_tokenizer,
    read_json,
)
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import check_supported, empty_quant_linear, set_module
from lowbit.rotations.incoherence import Rotation

STORAGE_DTYPE = torch.float16
# 2: E8P codes in their stored order (lowbit.formats.e8p.to_stored); 1 held the codes themselves (upgrade_codes)
CHECKPOINT_VERSION = 2
QUANTIZED_MARKER = "lowbit.json"
HF_QUANT_METHOD = "lowbit"  # config.json's quantization_config.quant_method: routes from_pretrained to lowbit


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANTIZED_MARKER).exists()


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip random weight initialization when building a model that will be overwritten by a checkpoint."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def quantized_formats(model: nn.Module) -> dict[str, str]:
    return {name: m.format_name for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, tokenizer: object, out: str | Path, meta: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``model`` (with QuantLinear modules) to ``out`` atomically."""
    formats = quantized_formats(model)
    if not formats:
        raise LowbitError("model has no quantized layers; quantize it first")
    tensors, seen = {}, {}
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            continue
        seen[ptr] = key
        if t.is_floating_point() and t.dtype not in (torch.float16,) and not _is_packed(key, formats):
            t = t.to(STORAGE_DTYPE)
        tensors[key] = t.detach().cpu().contiguous()
    rotations = {name: m.rotation.to_json() for name, m in model.named_modules()
                 if isinstance(m, QuantLinear) and m.rotation}
    info = {"lowbit_version": __version__, "checkpoint_version": CHECKPOINT_VERSION,
            "storage_dtype": "float16", "formats": formats, "rotations": rotations, **(meta or {})}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _save_tensors(tensors, tmp / "model.safetensors")
        _save_config(model.config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / QUANTIZED_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def _save_config(config: object, out: Path) -> None:
    """config.json: the model's config plus the quantization_config transformers routes on (a copy: the model's
    own config is left as it was). The per-linear formats and rotations stay in lowbit.json, their one place."""
    config = copy.deepcopy(config)
    config.quantization_config = {"quant_method": HF_QUANT_METHOD, "checkpoint_version": CHECKPOINT_VERSION}
    config.save_pretrained(out)


def install_quant_linears(model: nn.Module, info: dict) -> None:
    """Swap an empty QuantLinear of the recorded format and rotation into ``model`` for every linear ``info``
    (a checked lowbit.json) names, on the device the replaced module was on (meta included), buffers to be loaded.
    Both loaders build a checkpoint's modules with this: lowbit's and transformers' from_pretrained."""
    rotations = info.get("rotations", {})
    for name, fmt in info["formats"].items():
        set_module(model, name, empty_quant_linear(model.get_submodule(name), fmt,
                                                   Rotation.from_json(rotations.get(name))))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": "pt", "lowbit": "1"})
    except SafetensorError as e:  # its I/O errors (disk full, ...) are not OSErrors: make atomic_dir see one
        raise OSError(f"{path.name}: {e}") from e


def _is_packed(key: str, formats: dict[str, str]) -> bool:
    return key.rpartition(".")[0] in formats and not key.endswith(".bias")


def read_info(path: str | Path) -> dict:
    """``lowbit.json`` of the checkpoint ``path``, parsed and schema-checked (BadFileError naming the field)."""
    f = Path(path) / QUANTIZED_MARKER
    if not f.is_file():
        raise LowbitError(f"{path} is not a lowbit quantized model (no {QUANTIZED_MARKER})")
    info = read_json(f)
    version = info.get("checkpoint_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadFileError(f"{f}: field checkpoint_version must be an integer, got {version!r}")
    if version > CHECKPOINT_VERSION:  # before the rest: a newer layout may have other fields
        raise LowbitError(f"{path} was written by a newer lowbit ({info.get('lowbit_version')}); upgrade lowbit")
    return check_info(info, f)


def describe(path: str | Path) -> str:
    """What ``lowbit info`` prints: the checkpoint's recorded settings, formats and file size."""
    info = read_info(path)
    counts: dict[str, int] = {}
    for f in info.pop("formats").values():
        counts[f] = counts.get(f, 0) + 1
    lines = [f"{k}: {v}" for k, v in info.items()]
    lines.append("quantized linears: " + ", ".join(f"{n} x {f}" for f, n in counts.items()))
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise BadFileError(f"{weights} is missing: {path} is not a complete lowbit checkpoint")
    lines.append(f"model.safetensors: {weights.stat().st_size / 1e6:.1f} MB")
    return "\n".join(lines)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) of the lowbit checkpoint ``path``, every file checked against the others before any
    weight is read (:mod:`lowbit.io.validate`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    info = read_info(path)
    config = check_checkpoint_files(path, info)
    check_supported(config.model_type)
    with skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_quant_linears(model, info)
    model.tie_weights()  # before loading: tied tensors were saved once
    tied = _tied_keys(model)
    state = load_safetensors(path / "model.safetensors")
    upgrade_codes(state, info)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:  # checked before loading; kept as the last guard
        raise BadFileError(f"{path}: checkpoint does not match the architecture "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    check_finite(model, path / "model.safetensors")
    tok = load_tokenizer(path)
    return model.to(device=device, dtype=dtype).eval(), tok


def upgrade_codes(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """The packed tensors of a checkpoint with lowbit.json ``info``, read as stored, put in place as this lowbit
    stores them: version 1's E8P codes into their stored order."""
    if info.get("checkpoint_version", 0) >= 2:
        return
    for name, fmt in info["formats"].items():
        if isinstance(get_format(fmt), E8PFormat) and f"{name}.codes" in tensors:
            tensors[f"{name}.codes"] = e8p.to_stored(tensors[f"{name}.codes"])


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with an earlier key (saved once)."""
    seen, tied = set(), set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            tied.add(key)
        seen.add(ptr)
    return tied
