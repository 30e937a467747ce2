"""Whole jobs from a model source to a file, one per CLI command that writes one: they check the destination and
the arguments before minutes of work, load the model where the recipe wants it, quantize, and write atomically.

>>> lowbit.convert(None, "gptq_act:q4_0", "smol-q4_0")               # bundled model -> lowbit checkpoint
>>> lowbit.convert_gguf(None, "smol-iq2.gguf", "gptq+ft:iq2_xxs")      # -> GGUF for llama.cpp
>>> lowbit.convert_gguf(None, "smol.gguf", "gptq_act:q4_0", like="llama-Q4_K_M.gguf")  # another file's types
>>> lowbit.convert_hf(None, "smol-gptq", "gptq_act:q4_0", to="gptq")  # -> GPTQ for transformers / vLLM
>>> lowbit.convert_gguf("Llama-3-8B-GPTQ", "llama.gguf", fallback="q4_k")  # a GPTQ/AWQ/compressed-tensors dir
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from lowbit.algorithms import distributed
from lowbit.algorithms.mixed import is_mix, parse_mix
from lowbit.api import QuantizeResult, export_gguf, export_hf, load, quantize, save
from lowbit.atomic import check_destination
from lowbit.data.corpus import read_text_file
from lowbit.errors import LowbitError
from lowbit.formats import ALIASES, get_format
from lowbit.io.checkpoint import is_quantized_dir, read_info
from lowbit.io.gguf_export import ExportReport
from lowbit.io.gguf_presets import check_preset, preset_plan
from lowbit.io.gguf_types import SEARCHED, plan_like, read_gguf
from lowbit.io.hf_export import HFExportReport, check_format, check_target
from lowbit.io.hf_import import import_hf_quantized
from lowbit.io.hf_quant import READ_METHODS, checkpoint_method
from lowbit.io.loader import check_source, load_config, resolve
from lowbit.models.fused_rotation import fuse_rotation
from lowbit.models.walker import default_device
from lowbit.planner import linear_bytes, read_shapes, stored_bytes
from lowbit.recipe import Recipe
from lowbit.streaming import convert_streamed, should_stream


def convert(source: str | Path | None, recipe: Recipe | str, out: str | Path, *, device: str | None = None,
            checkpoint_dir: str | Path | None = None, overwrite: bool = False,
            progress: bool = True, stream: bool | None = None, offload: str = "auto") -> QuantizeResult:
    """Quantize the model at ``source`` (``None``: the bundled one) and save it to the directory ``out``.

    Calibrated recipes resume from ``checkpoint_dir`` (default ``OUT.partial``) after a crash. ``stream`` reads
    the weights one decoder layer at a time instead of loading the model (``None``: when it would not fit in
    memory, or for ``synthetic:<shape>`` sources; lowbit/streaming.py), with the same result bit for bit.

    >>> lowbit.convert("path/to/llama-dir", "gptq_act:q4_0", "llama-q4_0").summary()
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    if stream or (stream is None and should_stream(source, recipe)):
        return convert_streamed(source, recipe, out, device=device, checkpoint_dir=checkpoint_dir,
                                overwrite=overwrite, progress=progress, offload=offload)
    _check_inputs(source, recipe, out, overwrite)
    compute = device or default_device()
    # calibrated methods keep the model in CPU memory and move one decoder layer at a time to the device
    model, tok = load(source, device="cpu" if recipe.needs_calibration else compute)
    result = quantize(model, recipe, tok, device=compute, progress=progress,
                      checkpoint_dir=(checkpoint_dir or f"{out}.partial") if recipe.needs_calibration else None)
    ranks = distributed.current()
    if ranks is None or ranks.lead:  # several processes (distributed.py): each holds the same model; one saves it
        save(model, tok, out, result=result, source=resolve(source), overwrite=overwrite)
    return result


def convert_gguf(source: str | Path | None, out: str | Path, recipe: Recipe | str | None = None, *,
                 like: str | Path | None = None, embed_type: str | None = None, fallback: str | None = None,
                 fuse_rotation_only: bool = False, tokenizer_pre: str | None = None, device: str | None = None,
                 overwrite: bool = False, progress: bool = True, preset: str | None = None) -> ExportReport:
    """Write the model at ``source`` as a GGUF file for llama.cpp.

    * a lowbit checkpoint is exported as stored (no ``recipe`` or ``like``);
    * a GPTQ, AWQ or compressed-tensors checkpoint too (io/hf_import.py): linears a ggml type holds exactly are
      copied, the others re-quantized into ``fallback`` from their dequantized weights (required when there are
      any); ``recipe``, ``like``, ``preset`` and ``fuse_rotation_only`` are refused;
    * a float model with no ``recipe`` and no ``like`` is exported in float16 (``fuse_rotation_only`` folds the
      norms and a residual rotation in first);
    * otherwise it is quantized first with ``recipe``; ``like`` (a GGUF of the same model, e.g. from llama.cpp's
      quantizer) replaces the recipe's format with that file's per-tensor types, so the two files compare at equal
      size (``recipe`` then only chooses the method; default ``rtn``); ``preset`` (e.g. ``Q4_K_M``) does the
      same with the types llama.cpp's quantizer would choose for that preset (io/gguf_presets.py), no file needed.

    >>> print(lowbit.convert_gguf(None, "smol-q4_0.gguf", "gptq_act:q4_0").summary())
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    method = checkpoint_method(resolve(source))
    if method is not None:  # another tool's quantized checkpoint: converted as stored
        if recipe or like or preset or fuse_rotation_only:
            raise LowbitError(f"{resolve(source)} is already quantized ({method}): it is converted as stored, and "
                              "--fallback re-quantizes the linears no ggml type holds exactly; drop --format, "
                              "--like, --preset and --fuse-rotation")
        return _checkpoint_to_gguf(resolve(source), method, out, embed_type=embed_type, fallback=fallback,
                                   tokenizer_pre=tokenizer_pre, overwrite=overwrite)
    if preset is not None:
        if like is not None:
            raise LowbitError("give --like or --preset, not both: each sets every tensor's type")
        check_preset(preset)  # an unknown name is refused before anything is read or written
    src = _check_inputs(source, recipe, out, overwrite, like=like, preset=preset)
    output_type = None  # an untied output matrix's own type, where a preset or the like file gives one
    if is_quantized_dir(src):
        if recipe or like or preset or fuse_rotation_only:
            raise LowbitError(f"{src} is already a quantized lowbit checkpoint: export it as is (no recipe, like "
                              "or rotation)")
        model, tok = load(src, device="cpu")
    elif recipe is None and like is None and preset is None:
        model, tok = load(src, device="cpu")
        if fuse_rotation_only:
            fuse_rotation(model)
    else:
        model, tok, embed_type, output_type = _quantize_for_gguf(src, recipe, like or preset, embed_type, device,
                                                                 progress, is_preset=preset is not None)
    return export_gguf(model, tok, out, embed_type=embed_type or "f16", fallback=fallback,
                       tokenizer_pre=tokenizer_pre, overwrite=overwrite, output_type=output_type)


def _checkpoint_to_gguf(src: str, method: str, out: str | Path, *, embed_type: str | None, fallback: str | None,
                        tokenizer_pre: str | None, overwrite: bool) -> ExportReport:
    if method not in READ_METHODS:
        raise LowbitError(f"{src} is a {method} checkpoint; lowbit converts {', '.join(READ_METHODS)} checkpoints")
    check_destination(out, overwrite=overwrite)  # an existing output is refused before any weight is read
    imported = import_hf_quantized(src, fallback)  # refuses, naming the linears, before anything is written
    report = export_gguf(imported.model, imported.tokenizer, out, embed_type=embed_type or "f16",
                         tokenizer_pre=tokenizer_pre, overwrite=overwrite)
    return imported.annotate(report)


def _quantize_for_gguf(src: str, recipe: Recipe | None, like: str | Path | None, embed_type: str | None,
                       device: str | None, progress: bool, is_preset: bool = False) -> tuple:
    recipe = recipe or Recipe("q8_0")
    output_type = None
    compute = device or default_device()
    model, tok = load(src, device="cpu" if recipe.needs_calibration else compute)
    if like:
        # calibrated rounding gets the searched-fit variant of each type (same GGUF type and bytes)
        searched = recipe.method != "rtn"
        types = preset_plan(model, str(like), searched) if is_preset else plan_like(model, like, searched)
        recipe = replace(recipe, format=types.plan)
        if embed_type is None:  # an explicit --embed-type sets token_embd and the output matrix alike
            embed_type, output_type = types.embed_type, types.output_type
    else:
        recipe = searched_fit(recipe)
    quantize(model, recipe, tok, device=compute, progress=progress)
    return model, tok, embed_type, output_type


def searched_fit(recipe: Recipe) -> Recipe:
    """``export-gguf --format``'s recipe: a calibrated method on a GGUF type's format (``q4_0``) gets that type's
    searched-fit variant (:data:`lowbit.io.gguf_types.SEARCHED`: same GGUF type and bytes), as ``--preset`` and
    ``--like`` give it; round-to-nearest, with no importance to weigh the search by, keeps ggml's own fit."""
    if recipe.method == "rtn" or not isinstance(recipe.format, str):
        return recipe
    name = recipe.format.strip().lower()
    searched = SEARCHED.get(name) or SEARCHED.get(ALIASES.get(name, ""))  # q5_0: SEARCHED names it int5_g32_sym
    return replace(recipe, format=searched) if searched else recipe


def convert_hf(source: str | Path | None, out: str | Path, recipe: Recipe | str | None = None, *, to: str,
               device: str | None = None, overwrite: bool = False, progress: bool = True) -> HFExportReport:
    """Write the model at ``source`` as a GPTQ or compressed-tensors checkpoint directory (``to``) for transformers
    and vLLM.

    * a lowbit checkpoint is exported as stored (no ``recipe``); its lowbit.json says whether GPTQ ran in act-order;
    * a float model is quantized first with ``recipe``, whose format is checked against ``to`` before any work.

    >>> print(lowbit.convert_hf(None, "smol-gptq", "gptq_act:q4_0", to="gptq").summary())
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    check_target(to)
    src = _check_inputs(source, recipe, out, overwrite)
    if is_quantized_dir(src):
        if recipe is not None:
            raise LowbitError(f"{src} is already a quantized lowbit checkpoint: export it as is (no recipe)")
        act_order = str(read_info(src).get("method", "")).split("+")[0] == "gptq_act"
        model, tok = load(src, device="cpu")
    else:
        if recipe is None:
            raise LowbitError(f"{src} is a float model: give a recipe (--format) to quantize it before the export")
        _check_recipe_for_hf(src, recipe, to)
        compute = device or default_device()
        model, tok = load(src, device="cpu" if recipe.needs_calibration else compute)
        quantize(model, recipe, tok, device=compute, progress=progress)
        act_order = recipe.method == "gptq_act"
    return export_hf(model, tok, out, to=to, act_order=act_order, overwrite=overwrite)


def _check_recipe_for_hf(src: str, recipe: Recipe, to: str) -> None:
    """Refuse, before minutes of quantization, a recipe whose output the target cannot hold."""
    if recipe.rotate:
        raise LowbitError(f"{recipe}: lowbit undoes +rht rotations at run time, GPTQ / compressed-tensors loaders "
                          "cannot; drop +rht (--fuse-rotation keeps the model an ordinary one)")
    if isinstance(recipe.format, Mapping):
        formats = set(recipe.format.values())
    else:
        formats = set(parse_mix(recipe.format).formats) if is_mix(recipe.format) else {recipe.format}
    shapes = read_shapes(src).linear_shapes if len(formats) == 1 else []  # a plan's shapes are checked at export
    for fmt in sorted(formats):
        check_format(to, fmt, shapes)
    kinds = {(get_format(f).bits, get_format(f).group_size) for f in formats}
    if to == "gptq" and len(kinds) > 1:
        raise LowbitError(f"{recipe}: GPTQ holds one bit width and group size per model, this recipe mixes "
                          f"{', '.join(sorted(formats))}; use --to compressed-tensors (one config group per format)")


def _check_inputs(source: str | Path | None, recipe: Recipe | None, out: str | Path, overwrite: bool,
                  like: str | Path | None = None, preset: str | None = None) -> str:
    """Everything a job reads and writes, checked before minutes of work: the source's files, the calibration
    text, the ``like`` GGUF (its architecture included), and room for the output. Returns the resolved source."""
    check_destination(out, overwrite=overwrite)  # an existing output is refused before anything is read
    src = check_source(source)  # before the estimate below builds the model's shapes from its config
    if recipe is not None and recipe.needs_calibration and recipe.calib.text_path is not None:
        read_text_file(recipe.calib.text_path)
    if like is not None and not is_quantized_dir(src):
        read_gguf(like, load_config(src)[1])
    check_destination(out, _output_bytes(src, recipe, like or preset), overwrite)
    return src


def _output_bytes(src: str, recipe: Recipe | None, like: str | Path | None) -> int:
    """About what the output will take: exact for one format, a 2-bit lower bound for plans decided later."""
    if is_quantized_dir(src):
        weights = Path(src) / "model.safetensors"
        return weights.stat().st_size if weights.is_file() else 0
    shapes = read_shapes(src)
    fmt = None if recipe is None else recipe.format
    if isinstance(fmt, Mapping) or like is not None:
        return stored_bytes(shapes, None) - linear_bytes(shapes, None) + shapes.linear_params // 4
    return stored_bytes(shapes, fmt)
