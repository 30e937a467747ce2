"""Checks of the files lowbit reads, run before any long work: every damaged or inconsistent input becomes one
:class:`~lowbit.errors.BadFileError` line naming the file and, where one is at fault, the tensor or field.

What is checked, cheaply (headers and shapes, no weights read): JSON files parse into objects with fields of the
right types; a safetensors file's header is readable and its tensors fill the file exactly; ``config.json`` builds
a model (on the meta device, so a damaged size allocates nothing) whose parameters have the shapes the weights
have; a lowbit checkpoint's packed tensors have the names, shapes and dtypes its formats' storage specs give.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import BadFileError, BadWeightsError, LowbitError, one_line
from lowbit.formats import get_format
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import DECODER_LAYERS, check_supported, is_linear, linear_weight
from lowbit.rotations.hadamard import LAYOUTS

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8), "U32": (torch.uint32, 4), "U16": (torch.uint16, 2), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_LAYERS = 100_000  # real models have a few hundred at most
# config fields a model cannot run without: null is refused for these (elsewhere null usually means "default")
REQUIRED_FIELDS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                   "max_position_embeddings", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "n_embd",
                   "n_layer", "n_head", "n_positions", "ffn_dim", "word_embed_proj_dim", "rope_theta"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


# ------------------------------------------------------------------------------------------------------ JSON files


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; BadFileError if it is missing, unreadable, not UTF-8, not JSON or not an object."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BadFileError(f"{path} is missing") from None
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path} is not UTF-8 text (byte {e.start}): damaged?") from None
    except OSError as e:
        raise BadFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}): truncated or "
                           "damaged?") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, absurd nesting
        raise BadFileError(f"{path} is not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_info(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """``lowbit.json``'s schema: ``formats`` maps linear names to known format names, ``rotations`` (optional)
    maps some of them to two seeds (or nulls). Returns ``info``."""
    formats = info.get("formats")
    if not isinstance(formats, dict) or not formats:
        raise BadFileError(f"{path}: field formats must be a non-empty object (linear name -> format), "
                           f"got {_short(formats)}")
    for name, fmt in formats.items():
        if not isinstance(fmt, str):
            raise BadFileError(f"{path}: formats[{name!r}] must be a format name, got {_short(fmt)}")
        try:
            get_format(fmt)
        except (LowbitError, ValueError) as e:
            raise BadFileError(f"{path}: formats[{name!r}]: {one_line(e).partition(': ')[2]}") from None
    rotations = info.get("rotations", {})
    if not isinstance(rotations, dict):
        raise BadFileError(f"{path}: field rotations must be an object, got {_short(rotations)}")
    for name, seeds in rotations.items():
        if name not in formats:
            raise BadFileError(f"{path}: rotations names {name!r}, which is not in formats")
        if seeds is not None and not _seed_pair(seeds):
            raise BadFileError(f"{path}: rotations[{name!r}] must be two seeds (integers >= 0 or null) and "
                               f"optionally a layout in {list(LAYOUTS)}, got {_short(seeds)}")
    return info


def _seed_pair(v: object) -> bool:
    """[seed_in, seed_out] (layout 1) or [seed_in, seed_out, layout] (:class:`Rotation.to_json`)."""
    return (isinstance(v, list) and len(v) in (2, 3) and all(s is None or (_is_int(s) and 0 <= s < 2**63)
                                                              for s in v[:2])
            and (len(v) == 2 or (_is_int(v[2]) and v[2] in LAYOUTS)))


def _short(v: object) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------------ config.json


def declared_dtype(config: object) -> torch.dtype | None:
    """The dtype a model's config declares (``dtype``, or older transformers' ``torch_dtype``; a name or a dtype),
    None where it declares none or "auto"."""
    want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(want, str):
        want = getattr(torch, want, None) if want != "auto" else None
    return want if isinstance(want, torch.dtype) else None


def read_config(src: Path) -> Any:
    """The transformers config of the model directory ``src``, after checking ``config.json`` field by field
    against the architecture's defaults (a wrong type there would only fail later, inside a forward pass)."""
    from transformers import AutoConfig

    path = src / "config.json"
    data = read_json(path)
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise BadFileError(f"{path}: field model_type is missing or not a string ({_short(model_type)})")
    check_supported(model_type)
    _check_field_types(path, data, model_type)
    try:
        return AutoConfig.from_pretrained(src, local_files_only=True)
    except Exception as e:  # transformers validates with any exception type; each is one bad field
        raise BadFileError(f"{path}: {one_line(e)}") from None


def _check_field_types(path: Path, data: dict[str, Any], model_type: str) -> None:
    from transformers import CONFIG_MAPPING

    _check_dtype_fields(path, data)
    defaults = CONFIG_MAPPING[model_type]()
    for key, value in data.items():
        want = getattr(defaults, key, None)
        if want is None or (value is None and key not in REQUIRED_FIELDS):
            continue
        if not _same_kind(key, value, want):
            raise BadFileError(f"{path}: field {key} is {_short(value)}; a {model_type} config wants "
                               f"{_kind(want)}")
        if key in ("num_hidden_layers", "n_layer") and value > MAX_LAYERS:  # configs build per-layer lists
            raise BadFileError(f"{path}: field {key} is {_short(value)}, not a plausible number of layers")


def _check_dtype_fields(path: Path, data: dict[str, Any]) -> None:
    # default None, so the check by type below skips them; a bad name fails deep inside transformers otherwise
    for key in ("dtype", "torch_dtype"):
        value = data.get(key)
        if value is None or value == "auto" or isinstance(getattr(torch, str(value), None), torch.dtype):
            continue
        raise BadFileError(f"{path}: field {key} is {_short(value)}, not a torch dtype name such as \"float16\"")


def _same_kind(key: str, value: object, want: object) -> bool:
    if key.endswith("_token_id") and (value is None or isinstance(value, list)):
        return value is None or all(_is_int(v) for v in value)
    if isinstance(want, bool):
        return isinstance(value, (bool, int))
    if isinstance(want, int):  # 2.0 is accepted (some writers emit floats); 2.5 fails when the model is built
        return _is_int(value) or (isinstance(value, float) and value.is_integer())
    if isinstance(want, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in (str, dict, list):
        if isinstance(want, kind):
            return isinstance(value, kind)
    return True


def _kind(want: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
             list: "a list"}
    return next((n for t, n in names.items() if isinstance(want, t)), type(want).__name__)


def meta_model(config: Any, path: Path) -> nn.Module:
    """The architecture ``config`` describes, on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()
    except Exception as e:  # any field transformers rejects while building
        raise BadFileError(f"{path}: cannot build a {config.model_type} model from it ({one_line(e)})") from None
    return model


# ------------------------------------------------------------------------------------------------ safetensors files


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, checked: the header parses, every entry is well formed, and the
    tensors' bytes fill the file exactly (a truncated or padded file fails here, not in the middle of a load)."""
    size = _file_size(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFileError(f"{path} is truncated ({size} bytes): no safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise BadFileError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a file of "
                               f"{size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadFileError(f"{path}: the safetensors header is not valid JSON: damaged?") from None
    if not isinstance(header, dict):
        raise BadFileError(f"{path}: the safetensors header is not a JSON object: damaged?")
    _check_metadata(path, header.pop("__metadata__", {}))
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - 8 - n)
    return tensors


def _file_size(path: Path) -> int:
    if not path.exists():
        raise BadFileError(f"{path} is missing")
    if not path.is_file():
        raise BadFileError(f"{path} is not a file")
    return path.stat().st_size


def _check_metadata(path: Path, meta: object) -> None:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadFileError(f"{path}: the safetensors __metadata__ must map names to strings: damaged?")


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    bad = f"{path}: tensor {name}: damaged header entry {_short(entry)}"
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise BadFileError(bad)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadFileError(bad)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise BadFileError(bad)
    info = TensorInfo(path, entry["dtype"], tuple(shape), offsets[0], offsets[1])
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= info.begin <= info.end or info.end - info.begin != numel * DTYPES[info.dtype][1]:
        raise BadFileError(f"{path}: tensor {name}: its byte range {offsets} does not hold a {info.dtype} "
                           f"tensor of shape {list(shape)}: damaged header")
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    end = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != end:
            raise BadFileError(f"{path}: tensor {name} starts at data byte {t.begin}, expected {end}: damaged header")
        end = t.end
    if end > data_bytes:
        raise BadFileError(f"{path} is truncated: its tensors need {end} bytes of data, the file holds {data_bytes}")
    if end < data_bytes:
        raise BadFileError(f"{path} has {data_bytes - end} bytes after its last tensor: damaged?")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with its errors (damaged file, unreadable) as one BadFileError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadFileError(f"cannot read {path}: {one_line(e)}") from None


# ---------------------------------------------------------------------------------------- tensors vs config/formats


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: any floating dtype (float weights are cast when loaded)
    source: str  # what says so, for the error message


def expected_tensors(model: nn.Module, formats: dict[str, str], config_path: Path,
                     info_path: Path | None = None) -> tuple[dict[str, Expected], set[str]]:
    """(state-dict key -> what it must be, keys that may be absent because they are tied to an earlier key) for
    ``model`` (meta) with the linears in ``formats`` replaced by packed tensors as their formats store them."""
    expected, tied, seen = {}, set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(key)
        seen.add(id(t))
        expected[key] = Expected(tuple(t.shape), None if t.is_floating_point() else t.dtype, config_path.name)
    # ties transformers >= 5 declares: inside its from_pretrained (lowbit.io.hf_quantizer) tie_weights does nothing
    tied |= set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, fmt in formats.items():
        expected.pop(f"{name}.weight", None)
        shape = _linear_shape(model, name, info_path or config_path)
        spec = _storage_spec(fmt, shape, name, info_path or config_path)
        for key, (size, dtype) in spec.items():
            expected[f"{name}.{key}"] = Expected(tuple(size), dtype, f"{fmt} ({(info_path or config_path).name}) for a "
                                                 f"{list(shape)} linear ({config_path.name})")
    return expected, tied


def _linear_shape(model: nn.Module, name: str, path: Path) -> tuple[int, int]:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not is_linear(module) or isinstance(module, QuantLinear):
        raise BadFileError(f"{path}: formats names {name!r}, which is not a linear layer of this "
                           f"{model.config.model_type} model")
    return tuple(linear_weight(module).shape)


def _storage_spec(fmt: str, shape: tuple[int, int], name: str, path: Path) -> dict:
    try:
        return get_format(fmt).storage_spec(shape)
    except (LowbitError, ValueError) as e:
        raise BadFileError(f"{path}: {name} cannot be stored as {fmt} ({one_line(e)})") from None


def decoder_layer_count(model_type: str, keys: Iterable[str]) -> int:
    """How many decoder layers the tensor names mention (``...layers.N.`` / ``...h.N.``)."""
    part = re.escape(DECODER_LAYERS[model_type].rsplit(".", 1)[-1])
    pattern = re.compile(rf"(?:^|\.){part}\.(\d+)\.")
    found = [int(m[1]) for k in keys if (m := pattern.search(k))]
    return max(found) + 1 if found else 0


def check_layer_count(config: Any, header: dict[str, TensorInfo], config_path: Path, what: str) -> None:
    """config.json's layer count against the weights' before any model is built: an absurd count would otherwise
    build (even on the meta device) for minutes."""
    want = getattr(config, "num_hidden_layers", None)
    have = decoder_layer_count(config.model_type, header)
    if want != have:
        raise BadFileError(f"{config_path}: num_hidden_layers is {_short(want)}, but there are {have} decoder "
                           f"layers in {what}")


def compare_tensors(header: dict[str, TensorInfo], expected: dict[str, Expected], optional: set[str], *,
                    strict: bool, prefix: str = "", where: Path | None = None) -> None:
    """Every expected tensor is in ``header`` (under its key, or without the base model's ``prefix.``) with the
    expected shape and dtype; with ``strict``, the header holds nothing else."""
    used = set()
    for key, want in expected.items():
        found = key if key in header else key.removeprefix(f"{prefix}.") if prefix else key
        if found not in header:
            if key in optional:
                continue
            raise BadFileError(f"{where or 'the weights'}: no tensor {key} (missing, renamed, or the weights of "
                               "another model)")
        used.add(found)
        _check_tensor(found, header[found], want)
    extra = sorted(set(header) - used)
    if strict and extra:
        raise BadFileError(f"{header[extra[0]].file}: tensor {extra[0]} is not part of the model the config and "
                           "formats describe")


def _check_tensor(name: str, have: TensorInfo, want: Expected) -> None:
    if have.shape != want.shape:
        raise BadFileError(f"{have.file}: tensor {name} has shape {list(have.shape)}, but {want.source} gives "
                           f"{list(want.shape)}")
    if want.dtype is None and not have.torch_dtype.is_floating_point:
        raise BadFileError(f"{have.file}: tensor {name} is {have.dtype}, expected a float type")
    if want.dtype is not None and have.torch_dtype != want.dtype:
        raise BadFileError(f"{have.file}: tensor {name} is {have.dtype}, but {want.source} stores "
                           f"{str(want.dtype).removeprefix('torch.')}")


# -------------------------------------------------------------------------------------------------- whole directories


def check_checkpoint_files(path: Path, info: dict[str, Any]) -> Any:
    """A lowbit checkpoint's files agree: returns its config. ``info`` is its (schema-checked) lowbit.json."""
    config = read_config(path)
    weights = path / "model.safetensors"
    header = safetensors_header(weights)
    check_layer_count(config, header, path / "config.json", weights.name)
    model = meta_model(config, path / "config.json")
    expected, tied = expected_tensors(model, info["formats"], path / "config.json", path / "lowbit.json")
    compare_tensors(header, expected, tied, strict=True, where=weights)
    return config


def check_float_dir(path: Path, config: Any) -> None:
    """A Hugging Face directory's safetensors weights are readable and have the shapes ``config`` gives.
    Directories with only pickled (.bin) weights are left to transformers."""
    header = read_weight_headers(path)
    if not header:
        return
    config_path, index = path / "config.json", path / "model.safetensors.index.json"
    where = index if index.exists() else path / "model.safetensors"
    check_layer_count(config, header, config_path, where.name)
    model = meta_model(config, config_path)
    expected, tied = expected_tensors(model, {}, config_path)
    buffers = {k for k, _ in model.named_buffers()}  # older checkpoints may lack a buffer; the model's own is used
    compare_tensors(header, expected, tied | buffers, strict=False, prefix=model.base_model_prefix, where=where)


def read_weight_headers(path: Path) -> dict[str, TensorInfo]:
    """The safetensors headers of a model directory (single file or shards listed by an index), merged."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _sharded_headers(index)
    single = path / "model.safetensors"
    if single.exists():
        return safetensors_header(single)
    if any(path.glob("*.bin")) or any(path.glob("*.safetensors")):
        return {}
    raise BadFileError(f"{path} has no model weights (model.safetensors)")


def _sharded_headers(index: Path) -> dict[str, TensorInfo]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadFileError(f"{index}: field weight_map must map tensor names to shard files")
    header: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        header.update(safetensors_header(index.parent / shard))
    for key, shard in weight_map.items():
        if key not in header:
            raise BadFileError(f"{index.parent / shard} has no tensor {key}, which {index.name} lists")
    return header


# ------------------------------------------------------------------------------------------------------- after load


def check_finite(model: nn.Module, path: Path | str) -> None:
    """BadWeightsError naming the first stored float tensor with NaN/Inf values (a damaged file's usual sign)."""
    for name, t in _stored_floats(model):
        bad = sum(int((~torch.isfinite(c)).sum()) for c in t.detach().reshape(-1).split(1 << 24))
        if bad:
            raise BadWeightsError(f"{path}: tensor {name} has {bad} NaN/Inf values (damaged weights?)")


def _stored_floats(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        yield name, p
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for key, t in m.quantized().data.items():
                if t.is_floating_point():
                    yield f"{name}.{key}", t


def load_tokenizer(src: str | Path) -> Any:
    """The tokenizer of a model directory (or cached hub id); a damaged tokenizer file is one BadFileError line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as e:  # tokenizers raises plain Exception for a damaged tokenizer.json
        raise BadFileError(f"cannot load the tokenizer in {src}: {one_line(e)}") from None
