"""Another tool's quantized checkpoint (GPTQ, AWQ, compressed-tensors) as a model whose quantized linears are
ggml-typed lowbit tensors, so the GGUF export (``io/gguf_export.py``) writes them as they are:
``lowbit export-gguf GPTQ_DIR --out model.gguf [--fallback q4_k]``.

Every quantized linear is read into the integer form of ``io/hf_quant.py`` (``w = (q - z) * s`` per group) and then
either **copied** (re-laid out as the ggml type holding the very same numbers) or **re-quantized** (dequantized
exactly to float32 and rounded into the ``fallback`` format). A linear is copied only when all of these hold:

* its groups are 32 consecutive columns (group size 32, no act-order ``g_idx`` permutation), rows whole blocks;
* its scales are float16 numbers (bfloat16 and float32 scales qualify when float16 holds them exactly);
* the numbers fit a ggml type with one float16 scale per 32 weights, checked over the whole tensor:

  - ``Q4_0`` (``x = (c - 8) d``): 4-bit codes whose every ``q - z`` lies in [-8, 7] (every symmetric file, z = 8),
    stored as ``c = q - z + 8``, ``d = s``;
  - ``Q4_1`` (``x = c d + m``): any other 4-bit tensor where every group's ``-z s`` is a float16 number, stored as
    ``c = q``, ``d = s``, ``m = -z s`` (``q s - z s`` is then exactly ``(q - z) s`` in float32);
  - ``Q5_0`` / ``Q5_1`` likewise for 5-bit codes (compressed-tensors can hold them);
  - ``Q8_0`` (``x = c d``, int8 ``c``): 8-bit codes whose every ``q - z`` lies in [-128, 127] (every symmetric file).

Each copy is then verified: gguf's reference dequantizer on the blocks to be written gives the checkpoint's
weights ``(q - z) * s`` bit for bit, or the linear is re-quantized after all. Everything else (group size 128, the
usual case; act-order; 2-, 3-bit codes; float32 scales; ``-z s`` that float16 cannot hold) needs ``fallback``; without
it the import fails before anything is written, listing those linears and why. Tensors that were never quantized
(embeddings, norms, an LM head) are loaded as they are and exported as for a float model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from lowbit.errors import BadFileError, BadWeightsError, LowbitError
from lowbit.formats import QuantizedTensor, get_format, row_format
from lowbit.io.checkpoint import _tied_keys, skip_init
from lowbit.io.gguf_blocks import QK, gguf_type, to_ggml_blocks, unsupported_reason
from lowbit.io.gguf_export import ExportReport
from lowbit.io.gguf_types import gguf_arch, gguf_name
from lowbit.io.hf_quant import IntLinear, read_hf_quantized
from lowbit.io.validate import check_finite, load_tokenizer, read_config
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import set_module

# code width -> (format for "q - z + 2^(b-1) fits b bits", format with a float16 offset m = -z s)
_COPY_FORMATS = {4: ("q4_0", "q4_1"), 5: ("int5_g32_sym", "int5_g32_asym"), 8: ("q8_0", None)}
_LISTED = 10  # linears named per reason in the "needs --fallback" error


@dataclass
class LinearImport:
    """What became of one quantized linear of the checkpoint."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    scheme: str  # the checkpoint's scheme, e.g. "gptq 4-bit g128 sym"
    qtype: str  # the ggml type written
    reason: str = ""  # why it was re-quantized ("" when copied)

    @property
    def copied(self) -> bool:
        return not self.reason


@dataclass
class HFImport:
    """A GPTQ / AWQ / compressed-tensors checkpoint as a lowbit model ready for :func:`export_gguf`."""

    path: Path
    method: str
    model: nn.Module
    tokenizer: object
    linears: dict[str, LinearImport]

    def annotate(self, report: ExportReport) -> ExportReport:
        """Mark the GGUF export report's records of quantized linears with their scheme and fate."""
        records = {t.name: t for t in report.tensors}
        for name, li in self.linears.items():
            record = records.get(gguf_name(self.model, f"{name}.weight") or "")
            if record is not None:
                record.source, record.note = li.scheme, li.reason
        report.imported_from = self.method
        return report


# ------------------------------------------------------------------------------------------------ one linear
def scheme_label(method: str, il: IntLinear) -> str:
    groups = "per-channel" if il.group_size is None else f"g{il.group_size}"
    act = " act-order" if il.g_idx is not None else ""
    return f"{method} {il.bits}-bit {groups}{act} {'sym' if il.symmetric else 'asym'}"


def ggml_copy(il: IntLinear) -> tuple[QuantizedTensor | None, str]:
    """(the lowbit tensor in a ggml-typed format holding exactly ``il``'s weights, "") or (None, why there is none)."""
    cols = il.shape[1]
    if il.g_idx is not None:
        return None, f"act-order groups (permuted g_idx); a ggml block is {QK} consecutive columns"
    if il.group_size != QK:
        groups = "one scale per row" if il.group_size is None else f"groups of {il.group_size}"
        return None, f"{groups}; ggml's float16-scaled blocks hold {QK} weights"
    if cols % QK:
        return None, f"rows of {cols} weights are not whole blocks of {QK}"
    if il.bits not in _COPY_FORMATS:
        return None, f"{il.bits}-bit codes; ggml's float16-scaled blocks hold 4, 5 or 8 bits"
    scale = il.scale.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.equal(scale.to(il.scale.dtype), il.scale)):
        return None, f"{str(il.scale.dtype).removeprefix('torch.')} scales that float16 cannot hold exactly"
    sym_name, asym_name = _COPY_FORMATS[il.bits]
    offset = 1 << (il.bits - 1)
    centered = il.codes - il.zero[:, il.groups()]  # q - z, per weight
    if int(centered.min()) >= -offset and int(centered.max()) < offset:
        qt = get_format(sym_name).pack(centered + offset, {"scale": scale}, il.shape)
    elif asym_name is None:
        return None, "q - z leaves int8's range in some group (Q8_0 stores it as int8)"
    else:
        m = -il.zero.double() * scale.double()  # exact: a float16 times an integer below 2^9
        m16 = m.to(torch.float16)
        inexact = int((m16.double() != m).sum())
        if inexact:
            return None, f"-z*s is not a float16 number in {inexact} of {m.numel()} groups, so not {_qtype(asym_name)}"
        qt = get_format(asym_name).pack(il.codes, {"scale": scale, "min": m16}, il.shape)
    qtype, blocks = to_ggml_blocks(qt)
    if not np.array_equal(dequantize(blocks, qtype), il.dequantize().numpy()):  # the rules above, checked
        return None, f"ggml's {qtype.name} dequantization differs from the checkpoint's weights"
    return qt, ""


def _qtype(fmt: str) -> str:
    return gguf_type(get_format(fmt)).name  # type: ignore[union-attr] - only formats with a GGUF type come here


def _requantize(il: IntLinear, fallback: str) -> tuple[QuantizedTensor | None, str]:
    """(``il`` dequantized and rounded into ``fallback``, the format used: a k-quant's narrow-row fallback where
    llama.cpp takes one) or (None, why the fallback does not fit)."""
    name = row_format(fallback, il.shape[1])
    why = unsupported_reason(get_format(name), il.shape) if name else f"no block type of {fallback} fits"
    if why:
        return None, why
    return get_format(name).quantize(il.dequantize()), name


# ------------------------------------------------------------------------------------------------ the checkpoint
def import_hf_quantized(path: str | Path, fallback: str | None = None) -> HFImport:
    """Read the GPTQ / AWQ / compressed-tensors checkpoint directory ``path`` into a model whose quantized linears
    are ggml-typed: copies where a ggml type holds them exactly, else re-quantized into ``fallback`` (a format with
    a GGUF type, e.g. ``q4_k``). Raises LowbitError, naming the linears, when some need a fallback and none is
    given, and BadFileError when the checkpoint's tensors and its quantization_config disagree."""
    path = Path(path)
    config = read_config(path)  # field by field, before any weight is read
    gguf_arch(config)  # an architecture GGUF export cannot write is refused before the weights are read
    if fallback is not None and gguf_type(get_format(fallback)) is None:
        raise LowbitError(f"fallback {fallback!r} has no GGUF type; use q4_k, q5_k, q6_k, q8_0, q4_0, q4_1, "
                          "int5_g32_sym (Q5_0) or iq4_nl")
    hq = read_hf_quantized(path, lazy=True)  # every tensor checked against quantization_config from the headers
    schemes, copies, needs = {}, {}, {}  # one decoded linear at a time: codes are int64, 8 bytes a weight
    for name in hq.linears:
        il = hq.linears[name]
        if not torch.isfinite(il.scale).all():
            raise BadWeightsError(f"{path}: the scales of {name} have NaN/Inf values (damaged weights?)")
        schemes[name] = scheme_label(hq.method, il)
        qt, why = ggml_copy(il)
        if qt is None:
            needs[name] = why
        else:
            copies[name] = qt
    if needs and fallback is None:
        raise LowbitError(_needs_fallback(schemes, needs))
    tensors, linears, problems = {}, {}, []
    for name, scheme in schemes.items():
        qt, why = copies.get(name), needs.get(name, "")
        if qt is None:
            il = hq.linears[name]
            qt, fmt = _requantize(il, fallback)  # type: ignore[arg-type] - fallback is set when needed
            if qt is None:  # fmt: why the fallback does not fit
                problems.append(f"{name} ({scheme}, {il.shape[0]}x{il.shape[1]}): {why}, and the fallback {fallback} "
                                f"does not fit either: {fmt}")
                continue
            if fmt != fallback:
                why += f"; {fallback} rows need multiples of 256 weights, so {_qtype(fmt)} as llama.cpp does"
        tensors[name] = qt
        linears[name] = LinearImport(name, scheme, _qtype(qt.format), why)
    if problems:
        raise LowbitError("; ".join(problems) + "; nothing was written")
    model = _build(path, config, tensors, hq.tensors)
    return HFImport(path, hq.method, model, load_tokenizer(path), linears)


def _needs_fallback(schemes: dict[str, str], needs: dict[str, str]) -> str:
    by_reason: dict[tuple[str, str], list[str]] = {}
    for name, why in needs.items():
        by_reason.setdefault((schemes[name], why), []).append(name)
    parts = []
    for (scheme, why), names in by_reason.items():
        more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
        parts.append(f"{', '.join(names[:_LISTED])}{more} ({scheme}: {why})")
    return (f"{len(needs)} of {len(schemes)} quantized linears have no exact ggml type and need a fallback to be "
            f"re-quantized into (--fallback q4_k, q4_0, q8_0, ...): " + "; ".join(parts) + "; nothing was written")


def _build(path: Path, config: object, quantized: dict[str, QuantizedTensor],
           tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture of ``config`` with QuantLinear modules holding ``quantized`` and every other tensor loaded."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model built here is lowbit's, not transformers' quantized one
    with skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, qt in quantized.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise BadFileError(f"{path}: the checkpoint quantizes {name}, which a {config.model_type} model of this "
                               "config does not have") from None
        shape = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None
        if shape != tuple(qt.shape):
            raise BadFileError(f"{path}: the tensors of {name} hold a {qt.shape[0]}x{qt.shape[1]} linear, the model's "
                               f"{name} is {'not a linear' if shape is None else f'{shape[0]}x{shape[1]}'}")
        bias = tensors.get(f"{name}.bias")
        set_module(model, name, QuantLinear.from_quantized(qt, bias=bias))
    model.tie_weights()
    rest = {k: v for k, v in tensors.items() if not (k.rpartition(".")[0] in quantized and k.endswith(".bias"))}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    tied, buffers = _tied_keys(model), {k for k, _ in model.named_buffers()}  # non-persistent ones: inv_freq
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized and k not in tied]
    unexpected = [k for k in unexpected if k not in buffers]
    if missing or unexpected:
        raise BadFileError(f"{path}: the checkpoint's tensors do not match the architecture (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.tie_weights()
    check_finite(model, path)
    return model.eval()

