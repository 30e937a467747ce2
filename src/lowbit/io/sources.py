"""Weight sources for streamed quantization: a model's config and stored tensors, read a few at a time, never the
whole model at once.

* :class:`CheckpointSource`: a Hugging Face directory of safetensors (one file, or shards and their index). Every
  file is checked against the others before any work (:mod:`lowbit.io.validate`: a missing or truncated shard, an
  index naming a missing file, a tensor absent or of the wrong shape) and, for streaming, every float tensor must
  have the dtype config.json declares; each read memory-maps the shards it needs and closes them again.
* :class:`SyntheticSource`: a synthetic model of a real shape (:mod:`lowbit.io.synthetic`), generated on demand;
  ``synthetic:<shape>`` names one wherever a model path is taken.

A model built with :func:`skeleton` has its parameters on the meta device (shapes, no memory) and its buffers
computed on the CPU (rotary tables); :func:`load_tensors` materializes the parameters a step needs and
:func:`release` returns them to the meta device.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import BadFileError, LowbitError, one_line
from lowbit.io.checkpoint import is_quantized_dir
from lowbit.io.loader import resolve
from lowbit.io.synthetic import SHAPES, byte_tokenizer, synthetic_config, synthetic_tensor, tensor_shapes
from lowbit.io.validate import (
    TensorInfo,
    check_float_dir,
    declared_dtype,
    load_tokenizer,
    read_config,
    read_weight_headers,
)

SYNTHETIC = "synthetic:"
STORAGE_DTYPE = torch.float16  # float weights are rounded to it when loaded, as lowbit.load does


class WeightSource:
    """A model's ``config`` and its stored tensors by state-dict name; ``name`` is what results record."""

    config: Any
    name: str

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` as stored (CPU, stored dtype)."""
        raise NotImplementedError

    def read_rows(self, key: str, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of tensor ``key`` (its first dimension), without reading the rest."""
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Stored dtype and shape of every tensor the source holds, in state-dict order (a tied tensor once)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self.shapes())

    def tokenizer(self) -> Any:
        raise NotImplementedError

    def skeleton(self) -> nn.Module:
        return skeleton(self.config)


class CheckpointSource(WeightSource):
    """A Hugging Face safetensors directory, checked whole before any work, read a layer at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)
        self.config = read_config(self.path)
        header = read_weight_headers(self.path)
        if not header:
            raise BadFileError(f"{self.path} has only pickled (.bin) weights; streaming reads safetensors files "
                               "(load and save the model once with transformers to convert it)")
        check_float_dir(self.path, self.config)  # shards present and whole, every tensor there with its shape
        self._where: dict[str, TensorInfo] = {}
        self._file_key: dict[str, str] = {}
        prefix = self.skeleton().base_model_prefix
        for key in tensor_shapes(self.config):
            found = key if key in header else key.removeprefix(f"{prefix}.")
            if found in header:  # absent: a tied tensor or a buffer the model computes (check_float_dir allows both)
                self._where[key], self._file_key[key] = header[found], found
        self._check_dtypes()

    def _check_dtypes(self) -> None:
        want = declared_dtype(self.config)
        if want is None:
            return
        for key, info in self._where.items():
            if info.torch_dtype.is_floating_point and info.torch_dtype != want:
                raise BadFileError(f"{info.file}: tensor {self._file_key[key]} is {info.dtype}, but "
                                   f"{self.path / 'config.json'} declares dtype {str(want).removeprefix('torch.')}")

    def shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (info.torch_dtype, info.shape) for k, info in self._where.items()}

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self._where:
                raise LowbitError(f"{self.path}: no tensor {key}")
            by_file.setdefault(self._where[key].file, []).append(key)
        out = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:  # mapped now, unmapped on close
                    for key in names:
                        out[key] = f.get_tensor(self._file_key[key])
            except Exception as e:  # changed on disk since the checks
                raise BadFileError(f"cannot read {file}: {one_line(e)}") from None
        return out

    def read_rows(self, key: str, rows: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key].file), framework="pt", device="cpu") as f:
            return f.get_slice(self._file_key[key])[:rows]

    def tokenizer(self) -> Any:
        return load_tokenizer(self.path)


class SyntheticSource(WeightSource):
    """The synthetic model ``shape`` (:mod:`lowbit.io.synthetic`), each tensor generated when read."""

    def __init__(self, shape: str, seed: int = 0, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float16):
        self.config = synthetic_config(shape, num_layers, dtype)
        self.shape, self.seed, self.dtype = shape, seed, dtype
        self.name = SYNTHETIC + shape + (f" (seed {seed})" if seed else "")
        self._sizes = tensor_shapes(self.config)

    def shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (self.dtype, size) for k, size in self._sizes.items()}

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: synthetic_tensor(self.shape, self.seed, k, self._sizes[k], self.dtype) for k in keys}

    def read_rows(self, key: str, rows: int) -> torch.Tensor:
        return synthetic_tensor(self.shape, self.seed, key, self._sizes[key], self.dtype, rows=rows)

    def tokenizer(self) -> Any:
        return byte_tokenizer()


def is_synthetic(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(SYNTHETIC)


def open_source(spec: str | Path | WeightSource | None) -> WeightSource:
    """A source from ``synthetic:<shape>``, a model directory or the bundled model (``None``), checked now; or a
    source as is."""
    if isinstance(spec, WeightSource):
        return spec
    if is_synthetic(spec):
        shape = str(spec)[len(SYNTHETIC):]
        if shape not in SHAPES:
            raise LowbitError(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")
        return SyntheticSource(shape)
    path = Path(resolve(spec))
    if not path.is_dir():
        raise LowbitError(f"streaming reads a local model directory (config.json + safetensors); {spec} is not one")
    if is_quantized_dir(path):
        raise LowbitError(f"{path} is already a quantized lowbit checkpoint")
    return CheckpointSource(path)


# ------------------------------------------------------------------------------------------------ the model skeleton


def skeleton(config: Any) -> nn.Module:
    """The model ``config`` describes with every parameter on the meta device and its buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # a tied head is then the embeddings' parameter, as in a loaded model
    except Exception as e:  # any field transformers rejects while building
        raise BadFileError(f"cannot build a {config.model_type} model from its config ({one_line(e)})") from None
    return model.eval()


def load_tensors(model: nn.Module, keys: Iterable[str], source: WeightSource, device: torch.device | str,
                 stored: dict[str, torch.Tensor] | None = None) -> None:
    """Materialize the parameters/buffers ``keys`` of ``model`` from ``source`` on ``device``: float tensors
    rounded to float16 storage and computed in float32, exactly as ``lowbit.load`` leaves a model. ``stored``:
    those tensors already read from ``source`` (a prefetch); the dict is emptied as they are moved."""
    stored, tensors = stored if stored is not None else source.read(list(keys)), {}
    for key in list(stored):  # each stored copy freed as soon as its compute copy exists
        t = stored.pop(key).to(device)
        tensors[key] = t.to(STORAGE_DTYPE).to(torch.float32) if t.is_floating_point() else t
    unknown = _unexpected(model, tensors)
    if unknown:
        raise LowbitError(f"{source.name}: tensors not in the model: {unknown[:3]}")
    model.load_state_dict(tensors, strict=False, assign=True)


def _unexpected(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    state = model.state_dict(keep_vars=True)
    return [k for k, t in tensors.items() if k not in state or tuple(state[k].shape) != tuple(t.shape)]


def release(model: nn.Module, keys: Iterable[str]) -> None:
    """Send the parameters ``keys`` of ``model`` back to the meta device, freeing their memory."""
    state = model.state_dict(keep_vars=True)
    model.load_state_dict({k: torch.empty_like(state[k], device="meta") for k in keys}, strict=False, assign=True)
