"""Streamed jobs: quantize a model that is never loaded whole (algorithms/streamed.py), and write synthetic
checkpoints of real model shapes for scale tests (io/synthetic.py).

>>> lowbit.convert("path/to/Llama-2-7b-hf", "gptq_act:q4_0", "llama-q4_0", stream=True)
>>> lowbit.convert("synthetic:llama-3-8b", "rtn:q4_0", "synth-q4_0")      # a synthetic source, no files
>>> lowbit.write_synthetic("llama-2-7b", "synth-llama-2-7b")               # or its HF checkpoint on disk

``lowbit.convert`` streams when asked (``stream=True``), for synthetic sources, and on its own when the float
model in float32 would take more than half of this machine's physical memory (:func:`should_stream`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from lowbit.algorithms import distributed
from lowbit.algorithms.mixed import is_mix
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.streamed import (
    activation_bytes,
    discard_work,
    quantize_streamed,
    save_streamed,
    streamed_size,
)
from lowbit.api import QuantizeResult
from lowbit.atomic import check_destination
from lowbit.data.corpus import read_text_file
from lowbit.errors import LowbitError
from lowbit.io.checkpoint import is_quantized_dir
from lowbit.io.loader import resolve
from lowbit.io.sources import WeightSource, is_synthetic, open_source
from lowbit.models.walker import default_device
from lowbit.recipe import Recipe


def convert_streamed(source: str | Path | WeightSource, recipe: Recipe | str, out: str | Path, *,
                     device: str | None = None, checkpoint_dir: str | Path | None = None, overwrite: bool = False,
                     progress: bool = True, offload: str = "auto") -> QuantizeResult:
    """Quantize ``source`` (a safetensors model directory, ``synthetic:<shape>`` or a
    :class:`~lowbit.io.sources.WeightSource`) one decoder layer at a time and write the lowbit checkpoint ``out``.

    Every input is checked before any work (shards, tensors, dtypes, the destination and its free space); finished
    layers are committed to ``checkpoint_dir`` (default ``OUT.partial``) at once, so a rerun after a kill or an
    out-of-memory error resumes bit-identically; ``offload`` places the calibration activations (auto, device,
    host). The result equals ``convert`` without streaming bit for bit.

    >>> lowbit.convert_streamed("synthetic:tiny", "gptq_act:q4_0", "tiny-q4_0").summary()
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    check_streamable(recipe)
    check_destination(out, overwrite=overwrite)  # an existing output is refused before anything is read
    src = open_source(source)  # every file checked against the others
    if recipe.needs_calibration and recipe.calib.text_path is not None:
        read_text_file(recipe.calib.text_path)
    plan = dict(recipe.format) if isinstance(recipe.format, Mapping) else uniform_plan(src.skeleton(), recipe.format)
    size = streamed_size(src.config, plan)
    check_destination(out, size.total_bytes, overwrite)
    work = checkpoint_dir or f"{out}.partial"
    # the work checkpoint: every quantized layer, and a step's inputs twice while the next step is written
    acts = activation_bytes(src.config, recipe.calib.nsamples, recipe.calib.seqlen) if recipe.needs_calibration else 0
    check_destination(work, size.total_bytes + 2 * acts, overwrite=True)
    t0 = time.perf_counter()
    report = quantize_streamed(src, plan, work, rounding=recipe.method, calib=recipe.calib, gptq=recipe.gptq,
                               device=device or default_device(), offload=offload, progress=progress,
                               rotation_seed=recipe.rotation_seed if recipe.rotate else None,
                               finetune=recipe.finetune)
    linears = ({n: s.proxy_loss for n, s in report.linears.items()} if recipe.method == "rtn" else report.linears)
    streamed = {"offload": report.offload, "peak_host_gb": _gb(report.peak_host_gb),
                "peak_gpu_gb": _gb(report.peak_gpu_gb)}
    result = QuantizeResult(recipe, linears, time.perf_counter() - t0, size, finetune=report.finetune,
                            extra={"streamed": streamed})
    ranks = distributed.current()
    if ranks is None or ranks.lead:  # several processes (distributed.py): rank 0 holds every layer file
        save_streamed(src, report.layer_files, out, meta={**result.to_json(), "source": src.name,
                      "streamed": streamed}, overwrite=overwrite, progress=progress, tuned_file=report.tuned_file)
    discard_work(work)  # only now: a kill before the output's commit resumes from the finished layers
    return result


def _gb(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def check_streamable(recipe: Recipe) -> None:
    """Refuse recipes that need the whole model at once: mixed precision (measured sensitivity) and ``+fused``
    (rotates every layer together); ``+ft`` streams by tuning one layer at a time, after GPTQ or imatrix."""
    if isinstance(recipe.format, str) and is_mix(recipe.format):
        why = "a mixed-precision spec measures every layer first"
    elif recipe.fuse_rotation:
        why = "+fused rotates the whole model at once"
    elif recipe.finetune and recipe.method == "rtn":
        why = "streamed +ft tunes layers against the activations GPTQ/imatrix calibration brings (use gptq_act+ft)"
    elif recipe.finetune and recipe.finetune.mode == "model":
        why = "+ft in model mode trains through the whole network (streaming tunes one layer at a time)"
    elif recipe.head:
        why = "a quantized LM head (--head) is not written by the streamed checkpoint (it copies the head as read)"
    else:
        return
    raise LowbitError(f"{recipe} cannot be streamed: {why}; load the model instead (--no-stream)")


def should_stream(source: str | Path | WeightSource | None, recipe: Recipe) -> bool:
    """Whether ``convert`` streams by itself: for synthetic sources, and for a float model directory whose float32
    weights would take more than half of the physical memory (when the recipe can be streamed)."""
    if isinstance(source, WeightSource) or is_synthetic(source):
        return True
    try:
        check_streamable(recipe)
    except LowbitError:
        return False
    from lowbit.planner import read_shapes

    try:
        src = resolve(source)
        if not Path(src).is_dir() or is_quantized_dir(src):
            return False
        shapes = read_shapes(src)
    except Exception:  # noqa: BLE001 - a bad source (any error): the loading path says what is wrong, in its order
        return False
    params = sum(o * i for o, i in shapes.linear_shapes) + shapes.embed_head_params + shapes.other_params
    memory = physical_memory()
    return memory is not None and 4 * params > memory // 2


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
