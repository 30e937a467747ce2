"""Writing safetensors files one tensor at a time, for models that never exist whole in memory (streamed
quantization, synthetic checkpoints).

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the tensors'
bytes back to back. Every tensor's dtype and shape is known before its data (from a config or another file's
header), so the header is written first and each tensor's bytes follow as the tensor is produced: memory holds one
tensor, never the file. The layout is the one ``safetensors.torch.save_file`` writes (header padded to 8 bytes,
wider dtypes first so every tensor is aligned), so every reader, lowbit's file checks included, reads it as is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__
from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import CHECKPOINT_VERSION, QUANTIZED_MARKER, STORAGE_DTYPE, _is_packed, _save_config
from lowbit.io.validate import DTYPES

_NAMES = {dtype: name for name, (dtype, _size) in DTYPES.items()}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to be written: its header entry now, its data from ``produce()`` when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[_NAMES[self.dtype]][1]


def write_safetensors(path: str | Path, tensors: Sequence[PendingTensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to the safetensors file ``path``, producing and freeing one at a time; returns the bytes
    written. A produced tensor whose dtype or shape differs from its entry is an error (the header is already out)."""
    order = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.name))
    if len({t.name for t in order}) != len(order):
        raise LowbitError(f"{path}: duplicate tensor names")
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors pads it: the data then starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in order:
            value = t.produce()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise LowbitError(f"{path}: tensor {t.name} came as {value.dtype} {list(value.shape)}, its header "
                                  f"says {t.dtype} {list(t.shape)}")
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            del value, data
    return 8 + len(raw) + offset


def save_quantized_streamed(out: str | Path, config: Any, tokenizer: Any, formats: dict[str, str],
                            rotations: dict[str, list], tensors: Sequence[PendingTensor], *, meta: dict | None = None,
                            overwrite: bool = False) -> Path:
    """Write a lowbit checkpoint (:mod:`lowbit.io.checkpoint`'s layout and storage rules: packed tensors as they
    are, other floats in float16) atomically, its ``model.safetensors`` one tensor at a time."""
    if not formats:
        raise LowbitError("model has no quantized layers; quantize it first")
    stored = []
    for t in tensors:
        if t.dtype.is_floating_point and t.dtype != STORAGE_DTYPE and not _is_packed(t.name, formats):
            t = replace(t, dtype=STORAGE_DTYPE, produce=_cast(t.produce, STORAGE_DTYPE))
        stored.append(t)
    info = {"lowbit_version": __version__, "checkpoint_version": CHECKPOINT_VERSION, "storage_dtype": "float16",
            "formats": formats, "rotations": rotations, **(meta or {})}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", stored, {"format": "pt", "lowbit": "1"})
        _save_config(config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / QUANTIZED_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def _cast(produce: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: produce().to(dtype)
