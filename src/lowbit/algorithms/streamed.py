"""Streamed quantization: a model quantized one decoder layer at a time straight from its weight files, never
whole in host or device memory.

Only what the current step needs is materialized (:mod:`lowbit.io.sources`): the modules before the first decoder
layer (embeddings, rotary tables; the final norm too, being tiny) while layer 0's calibration inputs are captured,
then one decoder layer at a time, read from the source onto the compute device, rounded to float16 storage and
computed in float32, quantized by the very functions :func:`~lowbit.algorithms.sequential.quantize_sequential` uses
(``_quantize_layer``, ``_run_layer``), and sent back to the meta device. The result is bit-identical to loading the
whole model and quantizing it in memory.

Output: each finished layer is committed at once by the crash-safe checkpoint of sequential.py (``step-<i>/``:
the layer's packed tensors, the next layer's inputs, state; one rename each), so the checkpoint is also the work
area the output is assembled from: :func:`save_streamed` writes the final lowbit checkpoint (an ordinary one,
``lowbit.load`` reads it) one tensor at a time from the step files and the source's embeddings, norm and head. A
kill at any point resumes bit-identically; the checkpoint is removed only once the output is committed.

Activations (``offload``): the inputs of the layer being processed, [nsamples, seqlen, hidden] float32 (A bytes),
stay on the compute device when 2A (inputs and outputs) plus the layer in float32, its Hessians and GPTQ's
workspace fit in 90% of the device's free memory ("device"); otherwise they stay in host memory ("host") and reach
the device one sample at a time, so the device holds the layer and its Hessians only. On a CPU the two are the
same memory ("device"). The placement does not change any number, so a run may resume with another one.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import distributed
from lowbit.algorithms.finetune import (
    FinetuneConfig,
    FinetuneReport,
    find_final_norm,
    tune_layer,
    tune_tail,
    warn_if_reverted,
)
from lowbit.algorithms.plans import Plan, check_finite, plan_by_layer
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.algorithms.sequential import (
    ROUNDINGS,
    CalibConfig,
    GPTQConfig,
    LinearStats,
    _Checkpoint,
    _fingerprint,
    _quantize_layer,
    _run_layer,
    calibration_set,
    layer_state,
)
from lowbit.atomic import atomic_file
from lowbit.calibration.capture import capture_layer_inputs, cuda_tf32
from lowbit.errors import BadFileError, LowbitError
from lowbit.eval.sizes import SizeReport, model_size
from lowbit.formats import get_format
from lowbit.io.checkpoint import install_quant_linears
from lowbit.io.sources import STORAGE_DTYPE, WeightSource, load_tensors, release, skeleton
from lowbit.io.stream_writer import PendingTensor, save_quantized_streamed
from lowbit.io.validate import safetensors_header
from lowbit.models.walker import DECODER_LAYERS, decoder_layers, decoder_linears, linear_weight

OFFLOADS = ("auto", "device", "host")
FINAL_NORM_FILE = "final-norm.safetensors"  # in the work checkpoint: +ft's tuned final norm, the tail stage's commit
TAIL_INPUTS_FILE = "tail-inputs.safetensors"  # +ft: the quantized hidden states entering the tail stage's layers
DEVICE_SHARE = 0.9  # of the free device memory the activation rule may plan for
_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


@dataclass
class StreamReport:
    """What :func:`quantize_streamed` did. ``layer_files`` (all ``layers_total`` of them once ``complete``) hold
    the quantized layers :func:`save_streamed` assembles."""

    linears: dict[str, LinearStats] = field(default_factory=dict)
    layers_total: int = 0
    layers_done: int = 0
    resumed_from_layer: int = 0
    offload: str = "device"
    seconds: float = 0.0
    capture_seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)  # the layers this call quantized, in order
    peak_host_gb: float | None = None
    peak_gpu_gb: float | None = None
    layer_files: list[Path] = field(default_factory=list)
    finetune: FinetuneReport | None = None  # +ft: the layers this call tuned (block_losses: one per layer)
    tuned_file: Path | None = None  # +ft: the tuned final norm, written in place of the source's
    # (layer_files: +ft's tail stage replaces the last layers' step files with its own, tail-<i>.safetensors)

    @property
    def complete(self) -> bool:
        return self.layers_done == self.layers_total


def quantize_streamed(source: WeightSource, plan: Plan, work_dir: str | Path, *, rounding: str = "gptq",
                      calib: CalibConfig | None = None, gptq: GPTQConfig | None = None,
                      device: str | torch.device | None = None, samples: torch.Tensor | None = None,
                      rotation_seed: int | None = None, offload: str = "auto", progress: bool = True,
                      on_layer_done: Callable[[int], None] | None = None,
                      max_layers: int | None = None, finetune: FinetuneConfig | None = None) -> StreamReport:
    """Quantize the decoder linears ``plan`` names (name -> format), reading ``source`` one layer at a time, into
    the checkpoint ``work_dir`` (resumed when it holds this run's committed layers).

    ``rounding``: ``rtn`` (no calibration) or one of sequential.py's (``gptq``, ``gptq_act``, ``imatrix``);
    ``samples`` ([n, seqlen] token ids) replaces the calibration text; ``offload``: ``auto``, ``device`` or
    ``host`` (see the module docstring); ``max_layers`` stops after that many layers (benchmarks: the output then
    cannot be assembled). ``finetune``: after each layer's rounding, tune its stored float scales and norms so
    that, fed the quantized model's hidden states, it outputs the float model's (``+ft`` in blocks of one layer; the
    float model's hidden states ride along with the quantized ones), and after the last layer the last
    ``finetune.tail_layers`` layers again with the final norm, by KL on the LM head's logits (``_tail_stage``;
    ``StreamReport.tuned_file`` holds the norm for the output, ``layer_files`` the retuned layers).
    """
    if rounding not in ("rtn", *ROUNDINGS):
        raise LowbitError(f"unknown rounding {rounding!r}; known: rtn, {', '.join(ROUNDINGS)}")
    if offload not in OFFLOADS:
        raise LowbitError(f"offload must be one of {', '.join(OFFLOADS)}, not {offload!r}")
    calib, gptq = calib or CalibConfig(), gptq or GPTQConfig()
    if finetune and (rounding == "rtn" or distributed.current()):
        raise LowbitError("streamed +ft tunes after GPTQ/imatrix rounding, in one process")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = source.skeleton()
    layers = decoder_layers(model)
    prefix, n = DECODER_LAYERS[model.config.model_type], len(layers)
    check_stream_plan(model, plan)
    by_layer = plan_by_layer(plan, prefix, n)
    stop = n if max_layers is None else max(0, min(n, max_layers))
    ckpt = _Checkpoint(work_dir, _fingerprint(_FirstValues(source, model), plan, calib, gptq, rounding,
                                              rotation_seed, finetune))
    found = ckpt.committed(n)
    start, inps, stats = (found.next_layer, found.inputs, found.stats) if found else (0, None, {})
    targets = None  # +ft: the float model's hidden states entering the next layer
    if inps is not None and finetune:  # +ft snapshots every layer (its float states cannot be replayed cheaply)
        inps, targets = inps[0], inps[1]
    report = StreamReport(linears=dict(stats), layers_total=n, layers_done=start, resumed_from_layer=start)
    calibrated = rounding != "rtn"
    kwargs: dict[str, Any] = {}
    tail_from = _tail_from(n, finetune)
    # a run resumed with every layer done and the tail stage not committed still needs the layers' kwargs
    tail_pending = tail_from is not None and stop == n and not (Path(work_dir) / FINAL_NORM_FILE).is_file()
    if calibrated and (start < stop or tail_pending):
        if samples is None:
            samples = calibration_set(model, source.tokenizer(), calib)
        if ranks := distributed.current():
            samples = ranks.shard(samples)
        # +ft keeps two sets of activations (the quantized and the float model's hidden states)
        shape = torch.Size([samples.shape[0] * (2 if finetune else 1), *samples.shape[1:]])
        report.offload = _placement(offload, device, model, by_layer[0], shape)
        if finetune and report.offload == "host":
            raise LowbitError("streamed +ft keeps both sets of calibration activations on the device, which they do "
                              "not fit: use fewer calibration samples")
        store = device if report.offload == "device" else torch.device("cpu")
        t0 = time.perf_counter()
        try:
            captured, kwargs = _capture(model, source, samples[:1] if inps is not None else samples, device, store)
        except _OOM as e:
            raise LowbitError(f"out of {_memory_kind(e, device)} memory while capturing the calibration inputs of "
                              "layer 0 (nothing is saved yet): use --offload host or fewer calibration samples") from e
        inps = inps.to(store) if inps is not None else captured
        if finetune:
            targets = targets.to(store) if targets is not None else captured.clone()
        report.capture_seconds = time.perf_counter() - t0
        if found:
            inps = _replay(ckpt, layers, range(found.replay_from, start), inps, kwargs, device, gptq.tf32,
                           report.offload == "host")
    keys = source.keys()
    layer_keys = {i: [k for k in keys if k.startswith(f"{prefix}.{i}.")] for i in range(start, stop)}
    bar = tqdm(range(start, stop), desc="stream", unit="layer", disable=not progress, initial=start, total=n)
    prefetch = _Prefetch(source, layer_keys)
    try:
        for i in bar:
            t0 = time.perf_counter()
            layer = layers[i]
            try:
                load_tensors(model, layer_keys[i], source, device, stored=prefetch.take(i))
                layer.to(device)  # buffers the files do not hold
                for name in by_layer[i]:
                    check_finite(name, linear_weight(model.get_submodule(name)))
                if i == tail_from:
                    _save_tail_inputs(Path(work_dir), inps)
                with cuda_tf32(gptq.tf32):  # calibration passes and +ft steps; GPTQ's arithmetic stays exact
                    if finetune:
                        stats, inps, targets = _tuned_layer(layer, by_layer[i], plan, prefix, i, inps, targets, kwargs,
                                                            gptq, rounding, rotation_seed, finetune, device, report)
                    elif calibrated:
                        stats, inps = _calibrated_layer(layer, by_layer[i], plan, prefix, i, inps, kwargs, gptq,
                                                        rounding, rotation_seed, report.offload == "host")
                    else:
                        stats = _rtn_layer(model, by_layer[i], plan, rotation_seed)
                report.linears.update(stats)
                # +ft: both sets in one tensor, stacked in host memory (where the checkpoint goes) so the device never
                # holds a third copy
                acts = torch.stack([inps.cpu(), targets.cpu()]) if finetune else inps if calibrated else torch.empty(0)
                ckpt.save(i, layer, acts, report.linears, snapshot=finetune is not None)
            except _OOM as e:
                saved = f"layers 0..{i - 1} are saved in {work_dir}" if i else "no layer is saved yet"
                raise LowbitError(f"out of {_memory_kind(e, device)} memory at decoder layer {i}: {saved}; rerun the "
                                  "same command to resume (--offload host keeps the calibration activations in host "
                                  "memory)") from e
            finally:
                layer.to("meta")
            report.layers_done = i + 1
            report.layer_seconds.append(time.perf_counter() - t0)
            report.peak_host_gb, report.peak_gpu_gb = peak_host_gb(), peak_gpu_gb(device)
            bar.set_postfix_str(_memory_str(report))
            if on_layer_done:
                on_layer_done(i)
    finally:
        prefetch.close()
        ckpt.flush()  # a finished layer is committed even when a later one fails
    report.layer_files = [ckpt.layer_file(i) for i in range(report.layers_done)]
    if tail_from is not None and report.complete and inps is not None:
        report.tuned_file = _tail_stage(model, source, ckpt, tail_from, inps, targets, kwargs, finetune, device,
                                        Path(work_dir), report)
    if report.finetune is not None:
        warn_if_reverted(report.finetune)
    report.peak_host_gb, report.peak_gpu_gb = peak_host_gb(), peak_gpu_gb(device)
    report.seconds = time.perf_counter() - t_start
    return report


def check_stream_plan(model: nn.Module, plan: Plan) -> None:
    """A plan's names are decoder linears of ``model`` and its formats exist (weights are checked as read)."""
    unknown = sorted(set(plan) - set(decoder_linears(model)))
    if unknown:
        raise LowbitError(f"not linear layers inside decoder layers: {unknown[:5]}")
    for fmt in set(plan.values()):
        get_format(fmt)


def discard_work(work_dir: str | Path) -> None:
    """Remove a streamed run's checkpoint (once its output is committed), as sequential.py retires one."""
    _Checkpoint(work_dir, "").remove()


# --------------------------------------------------------------------------------------------------- the steps


def _capture(model: nn.Module, source: WeightSource, samples: torch.Tensor, device: torch.device,
             store: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer 0's inputs and the per-layer kwargs, with only the modules outside the decoder stack materialized."""
    rest = _outside_layers(model, source)
    load_tensors(model, rest, source, "cpu")  # capture_layer_inputs moves them to the device and back
    try:
        return capture_layer_inputs(model, samples, device, store_device=store)
    finally:
        release(model, rest)


def _outside_layers(model: nn.Module, source: WeightSource) -> list[str]:
    """The source's tensors outside the decoder layers and the LM head."""
    prefix = DECODER_LAYERS[model.config.model_type] + "."
    head = model.get_output_embeddings()
    head_keys = {f"{name}.{k}" for name, m in model.named_modules() if m is head for k in m.state_dict()}
    return [k for k in source.keys() if not k.startswith(prefix) and k not in head_keys]


def _calibrated_layer(layer: nn.Module, names: list[str], plan: Plan, prefix: str, index: int, inps: torch.Tensor,
                      kwargs: dict[str, Any], gptq: GPTQConfig, rounding: str, rotation_seed: int | None,
                      host: bool) -> tuple[dict[str, LinearStats], torch.Tensor]:
    if not host:
        stats = _quantize_layer(layer, names, plan, prefix, index, inps, kwargs, gptq, rounding, rotation_seed)
        return stats, _run_layer(layer, inps, kwargs)
    with _HostFeed(layer, inps) as feed:
        stats = _quantize_layer(layer, names, plan, prefix, index, feed.index, kwargs, gptq, rounding, rotation_seed)
        return stats, feed.run(kwargs)


def _replay(ckpt: _Checkpoint, layers: nn.ModuleList, indices: range, inps: torch.Tensor, kwargs: dict[str, Any],
            device: torch.device, tf32: bool, host: bool) -> torch.Tensor:
    """Run the committed quantized layers ``indices`` (read back from the checkpoint) on ``inps``: the inputs of the
    layer after them, as the run that committed them computed them."""
    for i in indices:
        layer = layers[i]
        ckpt.restore_layer(i, layer, assign=True)
        try:
            layer.to(device)
            with cuda_tf32(tf32):
                if host:
                    with _HostFeed(layer, inps) as feed:
                        inps = feed.run(kwargs)
                else:
                    inps = _run_layer(layer, inps, kwargs)
        finally:
            layer.to("meta")
    return inps


def _tuned_layer(layer: nn.Module, names: list[str], plan: Plan, prefix: str, index: int, inps: torch.Tensor,
                 targets: torch.Tensor, kwargs: dict[str, Any], gptq: GPTQConfig, rounding: str,
                 rotation_seed: int | None, cfg: FinetuneConfig, device: torch.device,
                 report: StreamReport) -> tuple[dict[str, LinearStats], torch.Tensor, torch.Tensor]:
    """Round one layer, then tune it: fed the quantized model's hidden states ``inps``, it should output what the
    float layer outputs on the float model's ``targets`` (finetune_blocks' ``compensate`` chain, one layer a
    block). Returns the stats and the next layer's (quantized, float) hidden states."""
    t0 = time.perf_counter()
    nxt = _run_layer(layer, targets, kwargs)  # the float layer: its weights are not rounded yet
    stats = _quantize_layer(layer, names, plan, prefix, index, inps, kwargs, gptq, rounding, rotation_seed)
    first, last, steps, tensors, values, kept = tune_layer(layer, inps, nxt, kwargs, cfg, device, cfg.seed + index)
    ft = report.finetune or FinetuneReport(0, 0, 0, math.nan, math.nan, 0.0, mode="stream")
    report.finetune = replace(ft, steps=ft.steps + steps, tuned_tensors=ft.tuned_tensors + tensors,
                              tuned_values=ft.tuned_values + values, seconds=ft.seconds + time.perf_counter() - t0,
                              reverted_blocks=ft.reverted_blocks + (not kept),
                              block_losses=[*ft.block_losses, [first, last]])
    return stats, _run_layer(layer, inps, kwargs), nxt


def _tail_from(n: int, cfg: FinetuneConfig | None) -> int | None:
    """The first layer +ft's tail stage tunes again (``n``: none, the final norm alone); None: no tail stage."""
    if cfg is None or not cfg.norms:
        return None
    return max(0, n - cfg.tail_layers)


def _save_tail_inputs(work_dir: Path, inps: torch.Tensor) -> None:
    """Keep the quantized hidden states entering the tail stage's first layer (the stage runs after the last layer,
    when the stream has moved past them); written before that layer is committed, so every resumed run finds
    them. A run resumed at this very layer has the same inputs (its snapshot) and the file may already be there."""
    path = work_dir / TAIL_INPUTS_FILE
    if not path.is_file():
        with atomic_file(path) as tmp:
            save_file({"inputs": inps.detach().cpu().contiguous()}, str(tmp))


def _tail_stage(model: nn.Module, source: WeightSource, ckpt: _Checkpoint, first: int, xs: torch.Tensor,
                xt: torch.Tensor, kwargs: dict[str, Any], cfg: FinetuneConfig, device: torch.device, work_dir: Path,
                report: StreamReport) -> Path | None:
    """+ft's last step, as the in-memory blocks mode ends: layers ``first``.. (read back from the checkpoint) and
    the final norm tuned together by KL on the LM head's logits (:func:`tune_tail`), the float norm and head on the
    float model's last hidden states ``xt`` as the teacher, the quantized hidden states entering layer ``first``
    as the input (``TAIL_INPUTS_FILE``; ``xs``, the last ones, when no layer is retuned): the one step that sees
    the logits, which the layer-wise objective cannot. Memory: those layers, the head in float32 and one window's
    logits. The retuned layers go to ``tail-<i>.safetensors``, then the norm to ``FINAL_NORM_FILE``, whose rename
    commits the stage: a run killed before it redoes the stage from the step files (never rewritten) to the same
    bytes, one killed after it keeps it. Returns the norm's file."""
    path = work_dir / FINAL_NORM_FILE
    layers = decoder_layers(model)
    files = [work_dir / f"tail-{i}.safetensors" for i in range(first, len(layers))]
    norm = find_final_norm(model)
    if norm is None:
        return None
    if not path.is_file():
        inputs = xs if first == len(layers) else _tail_inputs(work_dir)
        _run_tail_stage(model, source, ckpt, first, norm, inputs, xt, kwargs, cfg, device, files, path, report)
    report.layer_files[first:] = files
    return path


def _tail_inputs(work_dir: Path) -> torch.Tensor:
    path = work_dir / TAIL_INPUTS_FILE
    if not path.is_file():
        raise LowbitError(f"checkpoint {work_dir} has no {TAIL_INPUTS_FILE}; delete it to start over")
    return load_file(str(path))["inputs"]


def _run_tail_stage(model: nn.Module, source: WeightSource, ckpt: _Checkpoint, first: int, norm: nn.Module,
                    inputs: torch.Tensor, xt: torch.Tensor, kwargs: dict[str, Any], cfg: FinetuneConfig,
                    device: torch.device, files: list[Path], path: Path, report: StreamReport) -> None:
    """:func:`_tail_stage`'s work: tune, write the layers, then commit with the norm; the report counts it."""
    key = f"{_module_name(model, norm)}.weight"
    tail = list(decoder_layers(model))[first:]
    t0 = time.perf_counter()
    load_tensors(model, [key], source, "cpu")
    try:
        for i, layer in enumerate(tail, start=first):
            ckpt.restore_layer(i, layer, assign=True)
        teacher, head = copy.deepcopy(norm), _float_head(model, source)
        kl_first, kl_last, steps, _, _, kept = tune_tail(tail, norm, teacher, head, head, inputs, xt, kwargs, cfg,
                                                         device)
        for layer, f in zip(tail, files, strict=True):
            tensors, formats = layer_state(layer)
            with atomic_file(f) as tmp:
                save_file(tensors, str(tmp), metadata={"formats": json.dumps(formats)})
        with atomic_file(path) as tmp:  # last: the stage's commit
            save_file({key: norm.weight.detach().to(STORAGE_DTYPE).cpu().contiguous()}, str(tmp))
    finally:
        release(model, [key])
        for layer in tail:
            layer.to("meta")
    # the tail layers' tensors were counted when first tuned: only the final norm is new
    ft = report.finetune or FinetuneReport(0, 0, 0, math.nan, math.nan, 0.0, mode="stream")
    report.finetune = replace(ft, steps=ft.steps + steps, tuned_tensors=ft.tuned_tensors + 1,
                              tuned_values=ft.tuned_values + norm.weight.numel(), kl_first=kl_first, kl_last=kl_last,
                              reverted_blocks=ft.reverted_blocks + (not kept),
                              seconds=ft.seconds + time.perf_counter() - t0)


def _float_head(model: nn.Module, source: WeightSource) -> nn.Module:
    """A float32 copy of the LM head, read from the source (the input embeddings' weight when they are tied), frozen."""
    head = copy.deepcopy(model.get_output_embeddings())
    prefix = _module_name(model, model.get_output_embeddings()) + "."
    keys = {k: k.removeprefix(prefix) for k in _head_keys(model, source)}
    if not keys:  # tied to the input embeddings, whose weight the source stores
        keys = {f"{_module_name(model, model.get_input_embeddings())}.weight": "weight"}
    read = source.read(list(keys))
    head.load_state_dict({k: read[key].to(STORAGE_DTYPE).float() for key, k in keys.items()}, assign=True)
    return head.requires_grad_(False)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _rtn_layer(model: nn.Module, names: list[str], plan: Plan, rotation_seed: int | None) -> dict[str, LinearStats]:
    """Round-to-nearest of one layer's linears; the stats' ``proxy_loss`` holds the relative weight error."""
    t0 = time.perf_counter()
    errors = quantize_rtn(model, {n: plan[n] for n in names}, progress=False, rotate=rotation_seed is not None,
                          seed=rotation_seed or 0)
    seconds = (time.perf_counter() - t0) / max(1, len(names))
    return {n: LinearStats(e, e, 0.0, 0, seconds) for n, e in errors.items()}


class _Prefetch:
    """Reads layer i+1's tensors from the source on a thread while layer i is computed (file reads for a
    checkpoint, generation for a synthetic shape: 0.4 GB or ~1.4 s per 7B layer), so the GPU does not wait for
    them; host memory holds one layer more."""

    def __init__(self, source: WeightSource, layer_keys: dict[int, list[str]]):
        self.source, self.layer_keys = source, layer_keys
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-prefetch")
        self._ahead: dict[int, Future] = {}

    def take(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors (read now unless prefetched); starts reading layer i+1."""
        pending = self._ahead.pop(i, None) or self._pool.submit(self.source.read, self.layer_keys[i])
        if i + 1 in self.layer_keys:
            self._ahead[i + 1] = self._pool.submit(self.source.read, self.layer_keys[i + 1])
        return pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()


class _HostFeed:
    """Host-resident activations fed to a layer on the device one sample at a time.

    ``_quantize_layer`` and ``_run_layer`` take the activations as one tensor on the compute device (the Hessians
    go where it is); they get a [n, 1, 1] tensor of sample indices there instead, and hooks on the layer swap each
    index for its sample on the way in and, on the way out, keep the real output (in host memory, during
    :meth:`run`) and return a placeholder of the index's shape. The layer computes exactly what it would have.
    """

    def __init__(self, layer: nn.Module, acts: torch.Tensor):
        self.layer, self.acts = layer, acts
        device = next(layer.parameters()).device
        self.index = torch.arange(acts.shape[0], dtype=torch.float32, device=device).view(-1, 1, 1)
        self.sink: torch.Tensor | None = None
        self._rows = torch.empty(0, dtype=torch.long)

    def __enter__(self) -> _HostFeed:
        self._handles = [self.layer.register_forward_pre_hook(self._feed, with_kwargs=True),
                         self.layer.register_forward_hook(self._keep)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _feed(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        idx = args[0] if args else kwargs["hidden_states"]
        self._rows = idx.reshape(-1).long().cpu()
        hidden = self.acts[self._rows].to(self.index.device)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _keep(self, _module: nn.Module, _args: tuple, output: Any) -> torch.Tensor:
        if self.sink is not None:
            real = output[0] if isinstance(output, tuple) else output
            self.sink[self._rows] = real.float().to(self.sink.device)
        return self.index.new_zeros(len(self._rows), 1, 1)

    def run(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The layer's outputs for every sample, in host memory."""
        self.sink = torch.empty_like(self.acts)
        _run_layer(self.layer, self.index, kwargs)
        out, self.sink = self.sink, None
        return out


class _FirstValues:
    """What ``_fingerprint`` reads of a model (its config, the first values of its first parameters), read from a
    source without materializing anything."""

    def __init__(self, source: WeightSource, model: nn.Module):
        self.source, self.config = source, model.config
        self._params = [(k, tuple(p.shape)) for k, p in model.named_parameters()][:4]

    def parameters(self) -> list[torch.Tensor]:
        out = []
        for key, shape in self._params:
            rows = math.ceil(4096 / max(1, math.prod(shape[1:])))
            out.append(self.source.read_rows(key, rows).to(STORAGE_DTYPE).float())
        return out


# ------------------------------------------------------------------------------------------------------ memory


def _placement(offload: str, device: torch.device, model: nn.Module, names: list[str],
               samples_shape: torch.Size) -> str:
    """Where the calibration activations live (the module docstring's rule); refuses a layer that cannot fit."""
    if device.type != "cuda":
        return "device" if offload == "auto" else offload
    acts = activation_bytes(model.config, samples_shape[0], samples_shape[1])
    layer = decoder_layers(model)[0]
    linears = [linear_weight(model.get_submodule(n)).shape for n in names]
    need = 4 * sum(p.numel() for p in layer.parameters())  # the layer in float32
    need += 4 * sum(i * i for _, i in linears)  # every linear's Hessian
    need += 12 * max((i * i + o * i for o, i in linears), default=0)  # GPTQ: H, its inverse, W copies
    free = torch.cuda.mem_get_info(device)[0] * DEVICE_SHARE
    if offload == "auto":
        offload = "device" if 2 * acts + need <= free else "host"
    if offload == "host" and need + 2 * acts // samples_shape[0] > free:
        raise LowbitError(f"one decoder layer needs about {need / 1e9:.1f} GB on {device} to be quantized, "
                          f"{free / 1e9:.1f} GB is free: use a device with more memory")
    return offload


def activation_bytes(config: Any, nsamples: int, seqlen: int) -> int:
    """Bytes of one copy of the calibration activations (float32 hidden states of every sample)."""
    seqlen = min(seqlen, getattr(config, "max_position_embeddings", None) or seqlen)
    return nsamples * seqlen * config.hidden_size * 4


def _memory_kind(e: BaseException, device: torch.device) -> str:
    return "host" if isinstance(e, MemoryError) or device.type == "cpu" else device.type


def peak_host_gb() -> float | None:
    """Peak resident memory of this process so far (GB), None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def peak_gpu_gb(device: torch.device | str) -> float | None:
    """Peak memory torch has allocated on a CUDA ``device`` since the run started (GB); None elsewhere."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _memory_str(report: StreamReport) -> str:
    parts = [f"host {report.peak_host_gb:.1f}GB" if report.peak_host_gb is not None else ""]
    if report.peak_gpu_gb is not None:
        parts.append(f"gpu {report.peak_gpu_gb:.1f}GB")
    return " ".join(p for p in parts if p) + " peak"


# ------------------------------------------------------------------------------------------------------ output


def save_streamed(source: WeightSource, layer_files: list[Path], out: str | Path, *, meta: dict | None = None,
                  overwrite: bool = False, progress: bool = True, tuned_file: Path | None = None) -> Path:
    """Write the lowbit checkpoint ``out`` (atomically) from the quantized layers' step files and the source's
    other tensors, one tensor at a time; ``lowbit.load(out)`` reads it like any other. ``tuned_file``: tensors
    that replace the source's of the same names (+ft's final norm)."""
    model = source.skeleton()
    prefix, n = DECODER_LAYERS[model.config.model_type], len(decoder_layers(model))
    if len(layer_files) != n:
        raise LowbitError(f"{len(layer_files)} of {n} decoder layers are quantized: finish the run first")
    formats, rotations, pending = {}, {}, []
    for i, f in enumerate(layer_files):
        header = safetensors_header(f)  # a damaged step file is named here, before the output is started
        layer_formats = _step_formats(f)
        for sub, (fmt, rot) in layer_formats.items():
            formats[f"{prefix}.{i}.{sub}"] = fmt
            if rot:
                rotations[f"{prefix}.{i}.{sub}"] = rot
        for key, info in header.items():  # float tensors that are not packed become float16 when written
            pending.append(PendingTensor(f"{prefix}.{i}.{key}", info.torch_dtype, info.shape,
                                         _step_reader(f, key)))
    sizes = source.shapes()
    tuned = set(safetensors_header(tuned_file)) if tuned_file else set()
    for key in _outside_layers(model, source) + _head_keys(model, source):
        dtype, shape = sizes[key]
        if key in tuned:  # stored float16, as the writer stores every float outside the packed linears
            pending.append(PendingTensor(key, STORAGE_DTYPE, shape, _step_reader(tuned_file, key)))
        else:
            pending.append(PendingTensor(key, dtype, shape, _source_reader(source, key)))
    bar = tqdm(total=len(pending), desc="write", unit="tensor", disable=not progress)
    for i, p in enumerate(pending):
        pending[i] = PendingTensor(p.name, p.dtype, p.shape, _counted(p.produce, bar))
    try:
        return save_quantized_streamed(out, model.config, source.tokenizer(), formats, rotations, pending,
                                       meta=meta, overwrite=overwrite)
    finally:
        bar.close()


def streamed_size(config: Any, plan: Plan) -> SizeReport:
    """The stored size of the model ``config`` describes quantized as ``plan``, from shapes alone (what
    ``model_size`` reports for the model in memory)."""
    model = skeleton(config)
    install_quant_linears(model, {"formats": dict(plan)})
    # model_size tells tensors apart by storage, which meta tensors do not have: give the small rest (norms) some
    big_modules = [*decoder_linears(model).values(), model.get_input_embeddings(), model.get_output_embeddings()]
    big = {id(t) for m in big_modules if m is not None for t in m.state_dict(keep_vars=True).values()}
    rest = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in model.state_dict(keep_vars=True).items()
            if t.is_meta and id(t) not in big}
    model.load_state_dict(rest, strict=False, assign=True)
    return model_size(model)


def _head_keys(model: nn.Module, source: WeightSource) -> list[str]:
    prefix = DECODER_LAYERS[model.config.model_type] + "."
    outside = set(_outside_layers(model, source))
    return [k for k in source.keys() if not k.startswith(prefix) and k not in outside]


def _step_formats(path: Path) -> dict[str, list]:
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["formats"])
    except Exception as e:  # noqa: BLE001 - any damage to a step file is one line naming it
        raise BadFileError(f"{path}: unreadable layer step ({e}); delete the checkpoint to start over") from None


def _step_reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)

    return read


def _source_reader(source: WeightSource, key: str) -> Callable[[], torch.Tensor]:
    return lambda: source.read([key])[key]


def _counted(produce: Callable[[], torch.Tensor], bar: tqdm) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        t = produce()
        bar.update()
        return t

    return run
