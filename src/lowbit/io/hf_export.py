"""Write a quantized lowbit model as a GPTQ or compressed-tensors checkpoint that transformers and vLLM load.

The quantized linears' codes and float16 scales are copied into the target layout (``io/hf_quant.py``), never
re-rounded, so the export dequantizes to exactly the weights lowbit computes with. Everything else (embeddings,
norms, an untied LM head, biases) is written in float16, as lowbit stores it; ``config.json`` gets the
``quantization_config`` (GPTQ also gets ``quantize_config.json``), and the tokenizer is copied.

Every linear is checked before anything is written: a format with no integer-grid layout (E8P, IQ2_XXS,
k-quants, level sets, lowbit's float-min asymmetric grids), a ``+rht`` rotation, a bit width or group shape the
layout cannot hold, or (GPTQ) a plan mixing bit widths or group sizes is one LowbitError naming the linears,
their formats and why; the output directory appears complete or not at all.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.formats import ZeroPointFormat, get_format
from lowbit.io.hf_quant import (
    TARGETS,
    IntLinear,
    ct_config,
    ct_tensors,
    ct_weights_args,
    from_lowbit,
    gptq_config,
    gptq_tensors,
    inexpressible,
    layout_problem,
)
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears

Scheme = tuple[int, int | None, bool]  # bits, group size (None: per channel), symmetric


@dataclass
class HFExportReport:
    path: Path
    target: str
    schemes: dict[str, int] = field(default_factory=dict)  # "4-bit g32 sym" -> number of linears
    act_order: bool = False
    file_bytes: int = 0

    def summary(self) -> str:
        schemes = ", ".join(f"{n} x {s}" for s, n in self.schemes.items())
        return (f"wrote {self.path}: {self.target} checkpoint, {self.file_bytes / 1e6:.1f} MB, quantized linears "
                f"{schemes}{' (act-order)' if self.act_order else ''}; load it with transformers' "
                f"AutoModelForCausalLM.from_pretrained or `vllm serve {self.path}`")


def check_target(to: str) -> str:
    if to not in TARGETS:
        raise LowbitError(f"unknown export target {to!r}; choose {' or '.join(TARGETS)}")
    return to


def check_format(to: str, fmt_name: str, shapes: Iterable[tuple[int, int]]) -> None:
    """Before quantizing: LowbitError if linears of ``shapes`` in format ``fmt_name`` could not be exported."""
    fmt = get_format(fmt_name)
    reason = inexpressible(fmt)
    if reason is None:
        reason = next((p for s in shapes if (p := layout_problem(to, fmt.bits, fmt.group_size, s))), None)
    if reason:
        raise LowbitError(f"format {fmt_name} cannot be exported to {to}: {reason}")


def export_hf(model: nn.Module, tokenizer: object, out: str | Path, to: str, act_order: bool = False,
              overwrite: bool = False) -> HFExportReport:
    """Write ``model`` (with QuantLinear modules) to the directory ``out`` in layout ``to`` (gptq or
    compressed-tensors). ``act_order`` records that GPTQ ran in activation order (static groups either way)."""
    check_target(to)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    _check_exportable(model, linears, to)
    ints = {name: from_lowbit(m.quantized().to("cpu")) for name, m in linears.items()}
    schemes = {name: (ints[name].bits, ints[name].group_size, _is_sym(m)) for name, m in linears.items()}
    if to == "gptq":
        qconfig, packed = _gptq(ints, schemes, act_order)
    else:
        qconfig, packed = _ct(model, ints, schemes, act_order)
    tensors = _float_tensors(model, linears) | packed
    report = HFExportReport(Path(out), to, dict(Counter(_label(s) for s in schemes.values())), act_order)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _save(tensors, tmp / "model.safetensors")
        _write_config(model, qconfig, tmp)
        if to == "gptq":  # AutoGPTQ-era loaders read this file instead of config.json
            (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    report.file_bytes = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    return report


def _is_sym(m: QuantLinear) -> bool:
    return not isinstance(get_format(m.format_name), ZeroPointFormat)  # the other exportable formats are symmetric


def _label(s: Scheme) -> str:
    return f"{s[0]}-bit {'per-channel' if s[1] is None else f'g{s[1]}'} {'sym' if s[2] else 'asym'}"


# ------------------------------------------------------------------------------------------------------ checks
def _check_exportable(model: nn.Module, linears: dict[str, QuantLinear], to: str) -> None:
    if not linears:
        raise LowbitError("the model has no quantized linears: quantize it first (--format)")
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        raise LowbitError(f"cannot export to {to}: the LM head is quantized ({head.format_name}) and these exports "
                          "keep it 16-bit; quantize without --head (export-gguf writes a quantized head); nothing "
                          "was written")
    _check_architecture(model, linears)
    problems = [(m.format_name, why, name) for name, m in linears.items() if (why := _problem(m, to))]
    if to == "gptq":
        bad = {name for _, _, name in problems}
        problems += _gptq_problems(model, {n: m for n, m in linears.items() if n not in bad})
    if problems:
        raise LowbitError(f"cannot export to {to}: " + "; ".join(_summarize(problems)) + "; nothing was written")


def _problem(m: QuantLinear, to: str) -> str | None:
    if m.rotation is not None:
        return ("it carries a +rht rotation that lowbit undoes at run time and these loaders cannot (quantize "
                "without +rht, or with --fuse-rotation, which keeps the model an ordinary one)")
    fmt = get_format(m.format_name)
    return inexpressible(fmt) or layout_problem(to, fmt.bits, fmt.group_size, (m.out_features, m.in_features))


def _gptq_problems(model: nn.Module, linears: dict[str, QuantLinear]) -> list[tuple[str, str, str]]:
    """GPTQ has one bits / group_size for the whole model and quantizes every decoder linear."""
    out = [("float16", "GPTQ quantizes every decoder linear; use --to compressed-tensors, which lists float "
            "linears in its ignore list", name) for name, m in decoder_linears(model).items()
           if not isinstance(m, QuantLinear)]
    kinds = Counter((get_format(m.format_name).bits, get_format(m.format_name).group_size) for m in linears.values())
    if len(kinds) > 1:
        mix = ", ".join(f"{n} x {b}-bit {'per-channel' if g is None else f'g{g}'}" for (b, g), n in kinds.items())
        out.append(("mixed plan", f"GPTQ holds one bit width and group size per model, this one has {mix}; use "
                    "--to compressed-tensors, which takes one config group per scheme", "the model"))
    return out


def _summarize(problems: list[tuple[str, str, str]]) -> list[str]:
    """One line per (format, reason), naming the first linear and counting the rest."""
    by_kind: dict[tuple[str, str], list[str]] = {}
    for fmt, why, name in problems:
        by_kind.setdefault((fmt, why), []).append(name)
    return [f"{names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} ({fmt}): {why}"
            for (fmt, why), names in by_kind.items()]


def _check_architecture(model: nn.Module, linears: dict[str, QuantLinear]) -> None:
    """These loaders quantize nn.Linear modules only (GPT-2's Conv1D is not one)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    other = [n for n in linears if not isinstance(skeleton.get_submodule(n), nn.Linear)]
    if other:
        kind = type(skeleton.get_submodule(other[0])).__name__
        raise UnsupportedModelError(f"{other[0]} is a {kind} in {model.config.model_type}, not an nn.Linear: GPTQ and "
                                    "compressed-tensors loaders do not quantize it; nothing was written")


# ----------------------------------------------------------------------------------------------------- layouts
def _gptq(ints: dict[str, IntLinear], schemes: dict[str, Scheme], act_order: bool) -> tuple[dict, dict]:
    bits, group, _ = next(iter(schemes.values()))
    # one sym flag for the model: a symmetric linear is the asymmetric grid with z = 2^(b-1), so a mix is exact
    sym = all(s[2] for s in schemes.values())
    packed = {f"{name}.{k}": t for name, il in ints.items() for k, t in gptq_tensors(il).items()}
    return gptq_config(bits, group, sym, act_order, __version__), packed


def _ct(model: nn.Module, ints: dict[str, IntLinear], schemes: dict[str, Scheme], act_order: bool) -> tuple[dict, dict]:
    members: dict[Scheme, list[str]] = {}
    for name, s in schemes.items():
        members.setdefault(s, []).append(name)
    # one scheme: the usual ["Linear"] target; several: each group lists its modules by exact name
    groups = [(ct_weights_args(*s, act_order), ["Linear"] if len(members) == 1 else names)
              for s, names in members.items()]
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # float linears: the LM head, ...
    packed = {f"{name}.{k}": t for name, il in ints.items() for k, t in ct_tensors(il, schemes[name][2]).items()}
    return ct_config(groups, ignore), packed


def _float_tensors(model: nn.Module, linears: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor but the packed buffers, in float16; a tied tensor once (as save_pretrained)."""
    packed = {f"{name}.{k}" for name, m in linears.items() for k in m.quantized().data}
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in packed or ptr in seen:
            continue
        seen.add(ptr)
        out[key] = (t.to(torch.float16) if t.is_floating_point() else t).detach().cpu().contiguous()
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors are not OSErrors: make atomic_dir see one
        raise OSError(f"{path.name}: {e}") from e


def _write_config(model: nn.Module, qconfig: dict[str, Any], tmp: Path) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.dtype = torch.float16  # what every float tensor is stored as; GPTQ kernels compute in float16
    if not getattr(config, "architectures", None):  # vLLM picks the model class from this field
        config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
