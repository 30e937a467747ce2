"""Whole jobs from a model source to a file, one per CLI command that writes one: they check the destination and
the arguments before minutes of work, load the model where the recipe wants it, quantize, and write atomically.

>>> lowbit.convert(None, "gptq_act:q4_0", "smol-q4_0")               # bundled model -> lowbit checkpoint
>>> lowbit.convert_gguf(None, "smol-iq2.gguf", "gptq+ft:iq2_xxs")      # -> GGUF for llama.cpp
>>> lowbit.convert_gguf(None, "smol.gguf", "gptq_act:q4_0", like="llama-Q4_K_M.gguf")  # another file's types
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lowbit.api import QuantizeResult, export_gguf, load, quantize, save
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import is_quantized_dir
from lowbit.io.gguf_export import ExportReport
from lowbit.io.gguf_types import plan_like
from lowbit.io.loader import resolve
from lowbit.models.fused_rotation import fuse_rotation
from lowbit.models.walker import default_device
from lowbit.recipe import Recipe


def convert(source: str | Path | None, recipe: Recipe | str, out: str | Path, *, device: str | None = None,
            checkpoint_dir: str | Path | None = None, overwrite: bool = False,
            progress: bool = True) -> QuantizeResult:
    """Quantize the model at ``source`` (``None``: the bundled one) and save it to the directory ``out``.

    Calibrated recipes resume from ``checkpoint_dir`` (default ``OUT.partial``) after a crash.

    >>> lowbit.convert("path/to/llama-dir", "gptq_act:q4_0", "llama-q4_0").summary()
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    _check_out(out, overwrite)
    compute = device or default_device()
    # calibrated methods keep the model in CPU memory and move one decoder layer at a time to the device
    model, tok = load(source, device="cpu" if recipe.needs_calibration else compute)
    result = quantize(model, recipe, tok, device=compute, progress=progress,
                      checkpoint_dir=(checkpoint_dir or f"{out}.partial") if recipe.needs_calibration else None)
    save(model, tok, out, result=result, source=resolve(source), overwrite=overwrite)
    return result


def convert_gguf(source: str | Path | None, out: str | Path, recipe: Recipe | str | None = None, *,
                 like: str | Path | None = None, embed_type: str | None = None, fallback: str | None = None,
                 fuse_rotation_only: bool = False, tokenizer_pre: str | None = None, device: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> ExportReport:
    """Write the model at ``source`` as a GGUF file for llama.cpp.

    * a lowbit checkpoint is exported as stored (no ``recipe`` or ``like``);
    * a float model with no ``recipe`` and no ``like`` is exported in float16 (``fuse_rotation_only`` folds the
      norms and a residual rotation in first);
    * otherwise it is quantized first with ``recipe``; ``like`` (a GGUF of the same model, e.g. from llama.cpp's
      quantizer) replaces the recipe's format with that file's per-tensor types, so the two files compare at equal
      size (``recipe`` then only chooses the method; default ``rtn``).

    >>> print(lowbit.convert_gguf(None, "smol-q4_0.gguf", "gptq_act:q4_0").summary())
    """
    _check_out(out, overwrite)
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    src = resolve(source)
    if is_quantized_dir(src):
        if recipe or like or fuse_rotation_only:
            raise LowbitError(f"{src} is already a quantized lowbit checkpoint: export it as is (no recipe, like "
                              "or rotation)")
        model, tok = load(src, device="cpu")
    elif recipe is None and like is None:
        model, tok = load(src, device="cpu")
        if fuse_rotation_only:
            fuse_rotation(model)
    else:
        model, tok, embed_type = _quantize_for_gguf(src, recipe, like, embed_type, device, progress)
    return export_gguf(model, tok, out, embed_type=embed_type or "f16", fallback=fallback,
                       tokenizer_pre=tokenizer_pre, overwrite=overwrite)


def _quantize_for_gguf(src: str, recipe: Recipe | None, like: str | Path | None, embed_type: str | None,
                       device: str | None, progress: bool) -> tuple:
    recipe = recipe or Recipe("q8_0")
    compute = device or default_device()
    model, tok = load(src, device="cpu" if recipe.needs_calibration else compute)
    if like:
        # calibrated rounding gets the searched-fit variant of each type (same GGUF type and bytes)
        types = plan_like(model, like, searched=recipe.method != "rtn")
        recipe, embed_type = replace(recipe, format=types.plan), embed_type or types.embed_type
    quantize(model, recipe, tok, device=compute, progress=progress)
    return model, tok, embed_type


def _check_out(out: str | Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
