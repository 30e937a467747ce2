"""Per-tensor GGUF types of an existing file, as a lowbit quantization plan ("quantize like this file").

llama.cpp's quantizer does not give every tensor the file type's format: it keeps some at higher precision
(e.g. attn_v, the first ffn_down layers, the output matrix) and falls back to other types for rows that do not
fill its blocks (SmolLM2's 576-wide rows cannot hold 256-weight IQ2_XXS superblocks, so llama.cpp writes IQ4_NL
there). Reading that choice back lets lowbit quantize with its own rounding into exactly the same types, so the two
files have the same size and differ only in how the blocks were rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
from torch import nn

from lowbit.errors import BadFileError, LowbitError, UnsupportedModelError, one_line
from lowbit.models.walker import decoder_linears, linear_weight

# ggml type -> the lowbit format that stores it bit for bit (io/gguf_blocks.py); F16/F32 stay float
LOWBIT_FORMAT = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "int5_g32_sym", "Q5_1": "int5_g32_asym",
                 "Q8_0": "q8_0", "IQ4_NL": "iq4_nl", "IQ2_XXS": "iq2_xxs",
                 "Q2_K": "q2_k", "Q3_K": "q3_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
# The same bytes with a searched fit. Q4_1 / Q5_1: each block's scale and min chosen by the (importance-weighted)
# error they give rather than by the block's range (under GPTQ act-order the bundled model's Q4_0 file went from
# 25.99 to 23.41 perplexity with that search, its IQ2_XXS-typed file from 35.91 to 33.55). Q4_0 / Q5_0: ggml's own
# least-squares search (make_qx_quants, fit "ls"), which beat that search on the bundled model's CPU recipe in and
# out of domain (Q4_0 SOTU / Factbook perplexity 25.64 / 18.52 -> 24.81 / 17.77, KL 0.074 / 0.106 -> 0.074 / 0.104;
# docs/gguf.md). For RTN, with no importance to weigh by, the search was worse (26.42 -> 26.84), so plan_like uses
# it only when asked (README, "lowbit vs llama.cpp").
SEARCHED = {"q4_0": "int4_g32_sym_ls", "q4_1": "int4_g32_asym_mse", "int5_g32_sym": "int5_g32_sym_ls",
            "int5_g32_asym": "int5_g32_asym_mse"}
FLOAT_TYPES = ("F16", "F32", "BF16")
# HF model_type -> GGUF architecture; Mistral is written as llama (as convert_hf_to_gguf does).
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


@dataclass
class GGUFTypePlan:
    plan: dict[str, str]  # decoder linear (HF module name) -> lowbit format
    embed_type: str  # token_embd's type as a lowbit format (or "f16")
    source: Path | str  # the GGUF file, or the llama.cpp preset name (io/gguf_presets.py)
    output_type: str | None = None  # an untied output.weight's type where known apart from token_embd's


def read_gguf(path: str | Path, config: object | None = None) -> gguf.GGUFReader:
    """A reader of the GGUF file ``path``, checked: it is a GGUF, its tensors lie inside the file, and (given the
    model's ``config``) it is of the model's architecture. Anything else is one BadFileError line."""
    path = Path(path)
    if not path.exists():
        raise BadFileError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise BadFileError(f"{path} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BadFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, struct or numpy errors on damaged files
        raise BadFileError(f"{path} is a damaged or truncated GGUF file ({one_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise BadFileError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                               f"the file has {size}")
    if config is not None:
        _check_arch(path, reader, config)
    return reader


def _check_arch(path: Path, reader: gguf.GGUFReader, config: object) -> None:
    want = gguf.MODEL_ARCH_NAMES[gguf_arch(config)]
    field = reader.fields.get("general.architecture")
    try:
        have = field.contents() if field is not None else None
    except (ValueError, IndexError, UnicodeDecodeError):
        have = None
    if have != want:
        raise BadFileError(f"{path} is a GGUF of a {have!r} model; this {config.model_type} model needs {want!r}")


def tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, for every tensor in the file."""
    return {t.name: t.tensor_type.name for t in read_gguf(path).tensors}


def gguf_name(model: nn.Module, key: str) -> str | None:
    """The GGUF tensor name llama.cpp uses for the Hugging Face parameter ``key`` (e.g. ...q_proj.weight)."""
    names = _name_map(gguf_arch(model.config), model.config.num_hidden_layers)
    return names.get_name(key, try_suffixes=(".weight", ".bias"))


def gguf_arch(config: object) -> gguf.MODEL_ARCH:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(ARCHS)} models, not {model_type!r}")
    return ARCHS[model_type]


@cache
def _name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_layers)


def plan_like(model: nn.Module, path: str | Path, searched: bool = False) -> GGUFTypePlan:
    """The lowbit plan that reproduces ``path``'s tensor types for ``model`` (same architecture and shapes).

    ``searched``: give the decoder linears the searched-fit variant of uniform types (:data:`SEARCHED`: same GGUF
    type and bytes), the better choice under calibrated rounding (GPTQ)."""
    tensors = {t.name: t for t in read_gguf(path, model.config).tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    plan = {}
    for name, module in decoder_linears(model).items():
        gname = gguf_name(model, f"{name}.weight")
        if gname not in types:
            raise BadFileError(f"{path} has no tensor {gname} for {name}: is it a GGUF of this model?")
        _check_shape(path, tensors[gname], tuple(linear_weight(module).shape))
        if types[gname] not in FLOAT_TYPES:  # a float tensor stays float
            fmt = _lowbit_format(types[gname], gname)
            plan[name] = SEARCHED.get(fmt, fmt) if searched else fmt
    embed, output = (_embed_format(types, name) for name in ("token_embd.weight", "output.weight"))
    return GGUFTypePlan(plan, embed or "f16", Path(path), output_type=output)


def _embed_format(types: dict[str, str], gname: str) -> str | None:
    """The lowbit format of the file's tensor ``gname`` (``f16`` for a float one), None if the file has none."""
    if gname not in types:
        return None
    return "f16" if types[gname] in FLOAT_TYPES else _lowbit_format(types[gname], gname)


def _check_shape(path: Path | str, t: gguf.ReaderTensor, shape: tuple[int, ...]) -> None:
    have = tuple(int(d) for d in reversed(t.shape))  # ggml lists dimensions innermost first
    if have != shape:
        raise BadFileError(f"{path}: tensor {t.name} has shape {list(have)}, this model's is {list(shape)}: is it a "
                           "GGUF of this model?")


def _lowbit_format(qtype: str, gname: str) -> str:
    if qtype not in LOWBIT_FORMAT:
        raise LowbitError(f"{gname} is {qtype}, which lowbit has no format for "
                          f"(it has {', '.join(LOWBIT_FORMAT)})")
    return LOWBIT_FORMAT[qtype]
