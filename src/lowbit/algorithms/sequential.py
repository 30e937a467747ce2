"""Layer-by-layer Hessian-aware quantization with crash-safe resume.

For decoder layer i: run the calibration activations through it while hooks accumulate each linear's input
Hessian H = 2/N X^T X, quantize its linears (GPTQ/LDLQ), then run the *quantized* layer to produce the inputs
of layer i+1. Only the layer being processed is on the compute device. After every layer a checkpoint step is
committed atomically: layer i's quantized tensors, the inputs of layer i+1 and the state describing them (written
last) go into a fresh ``step-<i>.tmp`` directory that one rename turns into ``step-<i>``, so a kill at any point
leaves either the previous step or this one, never a mix (see ``_Checkpoint``). A rerun with the same settings
resumes after the last committed layer and ends bit-identical to an uninterrupted run; a checkpoint made with
other settings (or in the older, non-atomic layout) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import distributed
from lowbit.algorithms.gptq import IMPLEMENTATION as GPTQ_IMPLEMENTATION
from lowbit.algorithms.gptq import GPTQResult, factor_hessian, gptq_quantize_shared, proxy_loss
from lowbit.algorithms.plans import plan_by_layer, validate_plan
from lowbit.calibration.capture import HessianAccumulator, SharedHessians, capture_layer_inputs, cuda_tf32
from lowbit.calibration.samples import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, calibration_samples
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import model_max_length
from lowbit.formats import Format, get_format
from lowbit.formats.e8p import E8PFormat
from lowbit.models.fused_linears import layer_rotation
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import (
    DECODER_LAYERS,
    decoder_layers,
    empty_quant_linear,
    linear_weight,
    module_device,
    set_module,
)
from lowbit.rotations.incoherence import Rotation

ROUNDINGS = ("gptq", "gptq_act", "imatrix")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text: ``nsamples`` windows of ``seqlen`` tokens from the calib split (or ``text_path``)."""

    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    text_path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise LowbitError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {self}")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ/LDLQ settings; which rounding (plain, act-order, imatrix) is the recipe's method, not a setting."""

    blocksize: int = 128
    percdamp: float = 0.01  # damping: fraction of mean diag(H) added to the diagonal
    static_groups: bool = False  # group parameters fitted on the original weights (see gptq_quantize)
    rtn_baseline: bool = False  # also measure each linear's round-to-nearest proxy loss (one more fit per linear)
    shrink: float = 0.0  # H -> (1 - shrink) H + shrink diag(H) before factoring (gptq.factor_hessian)
    tf32: bool = True  # CUDA: the calibration passes' matmuls in TF32 (capture.cuda_tf32); GPTQ itself stays exact

    def __post_init__(self) -> None:
        if self.blocksize < 1 or not 0 <= self.percdamp < 1 or not 0 <= self.shrink <= 1:
            raise LowbitError(f"GPTQ needs blocksize >= 1, 0 <= damp < 1 and 0 <= shrink <= 1, got {self}")


@dataclass
class LinearStats:
    proxy_loss: float
    rtn_proxy_loss: float | None  # None unless GPTQConfig.rtn_baseline
    damp: float
    retries: int
    seconds: float  # this linear's share (by rows) of the rounding call it was part of, plus its own baseline


@dataclass
class SequentialReport:
    linears: dict[str, LinearStats] = field(default_factory=dict)
    resumed_from_layer: int = 0
    seconds: float = 0.0


def quantize_sequential(model: nn.Module, tokenizer: object, plan: dict[str, str],
                        calib: CalibConfig | None = None, gptq: GPTQConfig | None = None,
                        device: str | torch.device | None = None, checkpoint_dir: str | Path | None = None,
                        progress: bool = True, on_layer_done: Callable[[int], None] | None = None,
                        samples: torch.Tensor | None = None, rounding: str = "gptq",
                        rotation_seed: int | None = None) -> SequentialReport:
    """GPTQ-quantize in place the decoder linears named in ``plan`` (name -> format), layer by layer.

    ``rounding``: ``gptq`` (GPTQ/LDLQ error feedback), ``gptq_act`` (the same in act-order, for scalar formats) or
    ``imatrix`` (nearest rounding weighted by diag(H), llama.cpp's importance matrix). ``rotation_seed``: round
    W V^T against V H V^T with seeded randomized Hadamards V (:func:`layer_rotation`, undone online). ``samples``
    ([n, seqlen] token ids) replaces the calibration text when given.
    """
    if rounding not in ROUNDINGS:
        raise LowbitError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")
    calib = calib or CalibConfig()
    gptq = gptq or GPTQConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = decoder_layers(model)
    prefix = DECODER_LAYERS[model.config.model_type]
    validate_plan(model, plan)
    by_layer = plan_by_layer(plan, prefix, len(layers))
    if samples is None:
        samples = calibration_set(model, tokenizer, calib)
    if ranks := distributed.current():
        samples = ranks.shard(samples)

    fingerprint = _fingerprint(model, plan, calib, gptq, rounding, rotation_seed)
    ckpt = _Checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
    start = 0
    report = SequentialReport()
    t_start = time.perf_counter()
    resumed = ckpt.load(layers) if ckpt else None
    if resumed and resumed.inputs is not None:
        _, kwargs = capture_layer_inputs(model, samples[:1], device)
        inps = resumed.inputs.to(device)
    else:
        inps, kwargs = capture_layer_inputs(model, samples, device)
    if resumed:
        start = report.resumed_from_layer = resumed.next_layer
        report.linears.update(resumed.stats)
        for i in range(resumed.replay_from, start):
            layer, home = layers[i], module_device(layers[i])
            with cuda_tf32(gptq.tf32):
                inps = _run_layer(layer.to(device), inps, kwargs)
            layer.to(home)

    bar = tqdm(range(start, len(layers)), desc="gptq", unit="layer", disable=not progress,
               initial=start, total=len(layers))
    try:
        for i in bar:
            layer = layers[i]
            home = module_device(layer)
            layer.to(device)
            names = by_layer[i]
            with cuda_tf32(gptq.tf32):
                stats = _quantize_layer(layer, names, plan, prefix, i, inps, kwargs, gptq, rounding, rotation_seed)
                report.linears.update(stats)
                inps = _run_layer(layer, inps, kwargs)
            layer.to(home)
            if ckpt:
                ckpt.save(i, layer, inps, report.linears)
            if stats:
                rtn = [s.rtn_proxy_loss for s in stats.values()]
                bar.set_postfix(loss=f"{sum(s.proxy_loss for s in stats.values()):.4g}",
                                **({"rtn": f"{sum(rtn):.4g}"} if None not in rtn else {}))
            if on_layer_done:
                on_layer_done(i)
    finally:
        if ckpt:
            ckpt.flush()  # a finished layer is committed even when a later one fails
    if ckpt:
        ckpt.remove()
    report.seconds = time.perf_counter() - t_start
    return report


def calibration_set(model: nn.Module, tokenizer: object, calib: CalibConfig) -> torch.Tensor:
    """The [nsamples, seqlen] calibration windows, seqlen capped at the model's context."""
    seqlen = min(calib.seqlen, model_max_length(model) or calib.seqlen)
    return calibration_samples(tokenizer, calib.nsamples, seqlen, calib.text_path, calib.seed)


@torch.no_grad()
def _run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    outs = torch.empty_like(inps)
    # Every sample runs through the same quantized weights: dequantize each once for the pass and multiply densely
    # (on a CPU exactly what the reference path computes per call; on a GPU a full-rate matmul instead of a
    # decode kernel built for a few rows, with the same weights).
    once = [m for m in layer.modules() if isinstance(m, QuantLinear) and not m.weight_cached]
    try:
        for m in once:
            m.cache_weight(True)
        for j in range(inps.shape[0]):
            out = layer(inps[j : j + 1], **kwargs)
            outs[j] = (out[0] if isinstance(out, tuple) else out)[0].float()
    finally:
        for m in once:
            m.cache_weight(False)
    return outs


def _quantize_layer(layer: nn.Module, names: list[str], plan: dict[str, str], prefix: str, index: int,
                    inps: torch.Tensor, kwargs: dict[str, Any], cfg: GPTQConfig, rounding: str,
                    rotation_seed: int | None) -> dict[str, LinearStats]:
    local = {n: n[len(f"{prefix}.{index}.") :] for n in names}
    counted = _layer_hessians(layer, local, inps, kwargs)
    ranks = distributed.current()
    groups = ranks.all_reduce_hessians(counted) if ranks else [(g, H) for g, H, _ in counted]
    stats = {}
    owners = ranks.assign([_rounding_cost(layer, local, g, H) for g, H in groups]) if ranks else None
    for job, (group, H) in enumerate(groups):
        if ranks is None or owners[job] == ranks.rank:  # several processes: each rounds its share of the groups
            stats.update(_round_group(layer, local, group, H, plan, cfg, rounding, rotation_seed))
    if ranks:
        mine = {n: (layer.get_submodule(local[n]), s) for n, s in stats.items()}
        for n, (module, s) in ranks.exchange_modules(mine, inps.device).items():
            set_module(layer, local[n], module)
            stats[n] = s
    return {n: stats[n] for n in names}


def _rounding_cost(layer: nn.Module, local: dict[str, str], group: tuple[str, ...], H: torch.Tensor) -> float:
    """Estimated time to round ``group``: GPTQ's column loop launches a few small kernels per column whatever the
    rows, so its time grows with the columns far more than with the rows."""
    rows = sum(linear_weight(layer.get_submodule(local[n])).shape[0] for n in group)
    return H.shape[0] * (1 + rows / 65536)


def _layer_hessians(layer: nn.Module, local: dict[str, str], inps: torch.Tensor,
                    kwargs: dict[str, Any]) -> list[tuple[tuple[str, ...], torch.Tensor, int]]:
    """One calibration pass: [(linears that read the same input tensor, their H, its rows)], one H per distinct
    input."""
    modules = {n: layer.get_submodule(sub) for n, sub in local.items()}
    shared = SharedHessians(modules, inps.device)
    try:
        _calibration_pass(layer, list(modules.values()), inps, kwargs)
    finally:
        groups = shared.remove()
    if groups is not None:
        return [(g, H, shared.rows[g]) for g, H in groups]
    # the inputs were shared in some forwards only: a second pass with one H per linear
    accs = {n: HessianAccumulator(m, linear_weight(m).shape[1], inps.device) for n, m in modules.items()}
    try:
        _run_layer(layer, inps, kwargs)
    finally:
        hessians = {n: a.remove() for n, a in accs.items()}
    return [((n,), H, accs[n].rows) for n, H in hessians.items()]


class _Stop(Exception):
    pass


@torch.no_grad()
def _calibration_pass(layer: nn.Module, linears: list[nn.Module], inps: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Run every sample through ``layer`` for the hooks on ``linears``; the outputs are not needed, so from the
    second sample on the forward stops at the last linear's input (down_proj's: a quarter of the layer's products)
    once every other linear has had its input. Hooks registered earlier (the Hessians) still see that input."""
    order: list[int] = []  # ids of the linears in the order the first sample called them
    seen: list[int] = []

    def note(module, _args):  # noqa: ANN001, ANN202
        seen.append(id(module))
        if order and id(module) == order[-1] and len(seen) == len(order) and sorted(seen) == sorted(order):
            raise _Stop

    handles = [m.register_forward_pre_hook(note) for m in linears]
    try:
        for j in range(inps.shape[0]):
            seen.clear()
            try:
                layer(inps[j : j + 1], **kwargs)
            except _Stop:
                continue
            if j == 0 and seen and seen.count(seen[-1]) == 1:  # a linear called twice may not be cut short
                order.extend(seen)
    finally:
        for h in handles:
            h.remove()


def _round_group(layer: nn.Module, local: dict[str, str], group: tuple[str, ...], H: torch.Tensor,
                 plan: dict[str, str], cfg: GPTQConfig, rounding: str,
                 rotation_seed: int | None) -> dict[str, LinearStats]:
    """Round the linears of ``group``, which share ``H``. Those with the same format, ordering and input-side
    rotation are one GPTQ problem (their rows stacked: one factorization, one column loop); each (rotated H,
    ordering) is damped and factored once."""
    jobs: dict[tuple, list[tuple[str, torch.Tensor, Rotation | None]]] = {}
    for name in group:
        fmt = get_format(plan[name])
        w = linear_weight(layer.get_submodule(local[name])).float()
        rotation = None if rotation_seed is None else layer_rotation(name, rotation_seed)
        if rotation:
            w = rotation.rotate_weight(w)
        # act-order where the format allows it (scalar grids); vector codebooks in a mixed plan (IQ2_XXS beside
        # IQ4_NL fallbacks) keep natural order rather than failing the whole plan
        act = rounding == "gptq_act" and fmt.vector_dim == 1
        jobs.setdefault((rotation.input_side if rotation else None, act, fmt.name), []).append((name, w, rotation))
    rotated: dict[tuple | None, torch.Tensor] = {}
    factors = {}
    stats = {}
    for (side, act, fmt_name), items in jobs.items():
        t0 = time.perf_counter()
        fmt = get_format(fmt_name)
        if side not in rotated:
            rotated[side] = items[0][2].rotate_hessian(H) if items[0][2] else H
        Hr = rotated[side]
        ws = [w for _, w, _ in items]
        if rounding == "imatrix":
            qts = [fmt.quantize(w, importance=Hr.diagonal().clamp_min(0)) for w in ws]
            results = [GPTQResult(qt, proxy_loss(w, fmt.dequantize(qt), Hr), 0.0, 0) for w, qt in zip(ws, qts,
                                                                                                      strict=True)]
        else:
            if (side, act) not in factors:
                factors[side, act] = factor_hessian(Hr, cfg.percdamp, act, cfg.shrink)
            results = gptq_quantize_shared(ws, factors[side, act], fmt, cfg.blocksize, cfg.static_groups,
                                           weighted_search=side is None)
        share = (time.perf_counter() - t0) / sum(w.shape[0] for w in ws)
        for (name, w, rotation), res in zip(items, results, strict=True):
            t1 = time.perf_counter()
            rtn = _rtn_loss(w, fmt, Hr) if cfg.rtn_baseline else None
            module = layer.get_submodule(local[name])
            bias = getattr(module, "bias", None)
            set_module(layer, local[name], QuantLinear.from_quantized(res.qt, None if bias is None else bias.data,
                                                                      rotation))
            seconds = share * w.shape[0] + time.perf_counter() - t1
            stats[name] = LinearStats(res.proxy_loss, rtn, res.damp, res.retries, seconds)
            if res.retries:
                tqdm.write(f"lowbit: {name}: Cholesky failed {res.retries}x; damping raised to {res.damp:g}")
    return stats


def _rtn_loss(w: torch.Tensor, fmt: Format, H: torch.Tensor) -> float:
    return proxy_loss(w, fmt.dequantize(fmt.quantize(w)), H)


def _fingerprint(model: nn.Module, plan: dict[str, str], calib: CalibConfig, gptq: GPTQConfig, rounding: str,
                 rotation_seed: int | None, finetune: Any = None) -> str:
    """What a checkpoint must have been made with to be resumed; ``finetune`` (streamed +ft, whose checkpoint also
    holds the float model's hidden states) is a FinetuneConfig or None."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string().encode())
    # a rotation's sides and layout as lowbit draws them now (a checkpoint rotated otherwise is not resumed)
    rotation = None if rotation_seed is None else [rotation_seed, layer_rotation("", rotation_seed).to_json()]
    settings = [sorted(plan.items()), asdict(calib), asdict(gptq), rounding, rotation, GPTQ_IMPLEMENTATION]
    if any(isinstance(get_format(f), E8PFormat) for f in plan.values()):
        settings.append("e8p codes in their stored order")  # step files of earlier runs hold the codes themselves
    if finetune is not None:
        settings.append(["finetune", asdict(finetune)])
    if ranks := distributed.current():  # the activations in a checkpoint are sharded by rank
        settings.append(["processes", ranks.world])
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p in list(model.parameters())[:4]:  # cheap guard against resuming onto different weights
        h.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()


def layer_state(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """A layer as a step file holds it: its tensors on the host, and {linear: [format, rotation]} (the metadata
    :meth:`_Checkpoint.restore_layer` rebuilds its QuantLinears from)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
    formats = {n: [m.format_name, m.rotation.to_json() if m.rotation else None]
               for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    return tensors, formats


CHECKPOINT_LAYOUT = 2  # stored in every state.json; layout 1 (flat files, non-atomic commit) is refused
SNAPSHOT_SECONDS = 120.0  # an activation snapshot at most this often (see _Checkpoint); 0: every layer


@dataclass
class Resume:
    """Where a checkpointed run resumes: ``next_layer`` is the first layer to quantize; ``inputs`` are the inputs of
    layer ``replay_from`` (None: layer 0's, captured again), which running the committed layers ``replay_from`` ..
    ``next_layer - 1`` on them turns into the inputs of ``next_layer`` (quantize_sequential, streamed._replay)."""

    next_layer: int
    inputs: torch.Tensor | None
    replay_from: int
    stats: dict[str, LinearStats]


class _Checkpoint:
    """Crash-safe GPTQ checkpoint: one directory per finished layer, each committed by a single atomic rename.

    ``step-<i>/`` holds layer i's quantized tensors (``layer.safetensors``, formats in its metadata), the inputs of
    layer i+1 (``inputs.safetensors``) and ``state.json`` (layout, fingerprint, ``next_layer`` = i+1, stats so far).
    All three are written into ``step-<i>.tmp/`` (state last), flushed, and the directory is renamed to ``step-<i>``:
    that rename is the commit. The newest ``step-<i>`` is the checkpoint; it names every layer that counts (0..i),
    whose tensors stay in their own, never rewritten, ``step-<j>/layer.safetensors``. Once a step is committed the
    older steps' inputs are deleted. ``*.tmp`` directories are a killed run's leftovers: ignored and removed.

    Activation snapshots: the inputs of layer i+1 are stored with step i only when ``SNAPSHOT_SECONDS`` have passed
    since the last snapshot (a 7B model's are 4 GB per layer: written every layer, the disk set the pace). Every
    step's ``state.json`` names the newest snapshot (``inputs_from``); a resume loads it and recomputes the inputs of
    the next layer by running the committed quantized layers after it (``replay``: the same kernels on the same
    inputs, so the same bits). Older snapshots are deleted once a newer one is committed.

    Commits are written in the background: :meth:`save` copies the layer and the activations to host memory and
    returns, and one writer thread writes and commits them while the next layer is computed (an activation
    snapshot of a 7B model is 4 GB: written in line it was a third of the time per layer). One commit is in flight
    at most: the next :meth:`save`, :meth:`flush` or :meth:`remove` waits for it and raises its error. The
    quantizers flush in a ``finally``, so a layer that finished before an error or Ctrl-C is committed; a kill
    loses at most the commit in flight, which a rerun recomputes.
    """

    _STEP = re.compile(r"step-(\d+)")

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.ranks = distributed.current()  # several processes: see _write()
        self.lead = self.ranks is None or self.ranks.lead
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._snapshot_at = time.monotonic()  # when the newest snapshot (or the run) started
        self._inputs_from = -1  # the step holding the newest snapshot; -1: none, replay from layer 0's capture

    def _step(self, index: int) -> Path:
        return self.path / f"step-{index}"

    def _committed(self) -> dict[int, Path]:
        if not self.path.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.path.iterdir() if (m := self._STEP.fullmatch(p.name)) and p.is_dir()}

    def _prune(self, current: int, leftovers: bool = True) -> None:
        """Remove the inputs of steps older than ``current`` and, with ``leftovers``, ``*.tmp`` steps (at start
        only: with several processes another rank may already be writing the next step)."""
        for p in self.path.iterdir():
            if p.name.endswith(".tmp") and self._STEP.fullmatch(p.name[: -len(".tmp")]):
                if leftovers:
                    shutil.rmtree(p, ignore_errors=True)
            elif (m := self._STEP.fullmatch(p.name)) and int(m.group(1)) < current:
                for f in p.glob("inputs*.safetensors"):
                    f.unlink(missing_ok=True)

    def _inputs_name(self) -> str:
        """Several processes: each keeps its own shard of the activations (see distributed.py)."""
        r = self.ranks
        return "inputs.safetensors" if r is None else f"inputs-{r.rank}-of-{r.world}.safetensors"

    def _barrier(self) -> None:
        if self.ranks:
            self.ranks.barrier()

    def save(self, index: int, layer: nn.Module, inps: torch.Tensor, stats: dict[str, LinearStats],
             snapshot: bool = False) -> None:
        """Commit layer ``index`` in the background, with ``inps`` (the next layer's inputs) when ``snapshot`` or
        when a snapshot is due (see the class docstring). Device tensors are copied to host memory first; host
        tensors are written as they are, so the caller must not change them in place afterwards (the quantizers
        replace ``inps`` and the layer's tensors, never modify them)."""
        self.flush()
        now = time.monotonic()
        snapshot = snapshot or now - self._snapshot_at >= SNAPSHOT_SECONDS
        if self.ranks:  # every rank writes its shard of a snapshot or none does: rank 0's clock decides
            snapshot = bool(self.ranks.from_lead(snapshot))
        if snapshot:
            self._snapshot_at, self._inputs_from = now, index
        tensors = formats = None
        if self.lead:
            tensors, formats = layer_state(layer)
        state = {"layout": CHECKPOINT_LAYOUT, "fingerprint": self.fingerprint, "next_layer": index + 1,
                 "inputs_from": self._inputs_from, "stats": {k: asdict(v) for k, v in stats.items()}}
        acts = inps.detach().cpu().contiguous() if snapshot else None
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-checkpoint")
        self._pending = self._writer.submit(self._write, index, tensors, formats, acts, state)

    def flush(self) -> None:
        """Wait for the commit in flight, if any; its error, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, index: int, tensors: dict[str, torch.Tensor] | None, formats: dict | None,
               acts: torch.Tensor | None, state: dict) -> None:
        """The commit (writer thread). Several processes: every rank writes its activation shard into the step
        and marks it done; rank 0 also writes the layer, waits for every rank's mark, writes the state and
        commits. Marks are files, not collectives, so they never interleave with the main threads' collectives."""
        final = self._step(index)
        tmp = final.with_name(f"{final.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        if self.lead:
            save_file(tensors, str(tmp / "layer.safetensors"), metadata={"formats": json.dumps(formats)})
        if acts is not None:
            inputs = self._inputs_name()
            save_file({"inputs": acts}, str(tmp / inputs))
            _fsync(tmp / inputs)
            if self.ranks:
                (tmp / f"{inputs}.done").touch()
        if not self.lead:
            return
        if self.ranks and acts is not None:
            self._wait_for_shards(tmp)
        (tmp / "state.json").write_text(json.dumps(state))  # last, though only the rename below makes it count
        for f in ("layer.safetensors", "state.json", "."):
            _fsync(tmp / f)
        os.replace(tmp, final)  # the commit: layer i, the inputs of layer i+1 and their state appear together
        _fsync(self.path)
        if acts is not None:
            self._prune(index, leftovers=False)

    def _wait_for_shards(self, tmp: Path, timeout: float = 600.0) -> None:
        marks = [tmp / f"inputs-{r}-of-{self.ranks.world}.safetensors.done" for r in range(self.ranks.world)]
        deadline = time.monotonic() + timeout
        while not all(m.exists() for m in marks):
            if time.monotonic() > deadline:
                raise LowbitError(f"checkpoint {tmp}: the other processes' activations did not arrive in "
                                  f"{timeout:.0f} s")
            time.sleep(0.01)
        for m in marks:
            m.unlink()

    def load(self, layers: nn.ModuleList) -> Resume | None:
        """Restore the committed layers into ``layers``; what to resume from (see :meth:`committed`), or None to
        start over."""
        found = self.committed(len(layers))
        if found is None:
            return None
        for i in range(found.next_layer):
            self.restore_layer(i, layers[i])
        return found

    def restore_layer(self, index: int, layer: nn.Module, assign: bool = False) -> None:
        """Committed layer ``index``'s quantized linears and other tensors into ``layer``: copied into its tensors,
        or with ``assign`` (a layer on the meta device) put in their place, on the host."""
        from safetensors import safe_open

        f = self.layer_file(index)
        with safe_open(str(f), "pt") as sf:
            formats = json.loads(sf.metadata()["formats"])
        for sub, (fmt, rot) in formats.items():
            set_module(layer, sub, empty_quant_linear(layer.get_submodule(sub), fmt, Rotation.from_json(rot)))
        layer.load_state_dict(load_file(str(f)), strict=True, assign=assign)

    def layer_file(self, index: int) -> Path:
        """Where committed layer ``index``'s quantized tensors are (formats and rotations in its metadata)."""
        return self._step(index) / "layer.safetensors"

    def committed(self, n_layers: int) -> Resume | None:
        """The newest committed step of a model of ``n_layers`` layers, checked against this run's fingerprint,
        without reading any layer; None to start over."""
        if not self.path.is_dir():
            return None
        if (self.path / "state.json").exists():
            raise LowbitError(f"checkpoint {self.path} has the older, non-atomic layout, which a kill can leave "
                              "inconsistent; delete it to start over")
        steps = self._committed()
        if not steps:
            if self.lead:
                self._prune(0)
            self._barrier()  # no rank writes step 0 before rank 0 has removed a killed run's leftovers
            return None
        current = max(steps)
        try:
            state = json.loads((steps[current] / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"checkpoint {steps[current]} is unreadable ({e}); delete {self.path} to start over") \
                from e
        if state.get("layout") != CHECKPOINT_LAYOUT:
            raise LowbitError(f"checkpoint {self.path} has layout {state.get('layout')}, this version writes "
                              f"{CHECKPOINT_LAYOUT}; delete it to start over")
        if state.get("fingerprint") != self.fingerprint:
            raise LowbitError(f"checkpoint {self.path} was made with other settings or another model; "
                              "delete it to start over")
        n = state["next_layer"]
        missing = [i for i in range(n) if not self.layer_file(i).is_file()]
        if n != current + 1 or n > n_layers or missing:
            raise LowbitError(f"checkpoint {self.path} is incomplete (step {current}, next layer {n}, missing "
                              f"layers {missing}); delete it to start over")
        snap = state.get("inputs_from", current)
        inps = load_file(str(steps[snap] / self._inputs_name()))["inputs"] if snap >= 0 else None
        stats = {k: LinearStats(**v) for k, v in state["stats"].items()}
        self._barrier()  # every rank has read its inputs before rank 0 prunes
        if self.lead:
            self._prune(max(snap, 0))
        self._inputs_from = snap
        return Resume(n, inps, snap + 1, stats)

    def remove(self) -> None:
        """Delete the checkpoint: one rename retires it whole, so a kill while deleting never leaves a partial one
        that a rerun would try to resume."""
        self.flush()
        self._barrier()
        if not self.lead:
            return
        parent, name = self.path.parent, self.path.name
        for p in (parent.iterdir() if parent.is_dir() else ()):  # earlier removals a kill interrupted
            if p.name.startswith(f".{name}.removing-"):
                shutil.rmtree(p, ignore_errors=True)
        if not self.path.exists():
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.removing-", dir=parent))
        os.replace(self.path, trash / name)
        shutil.rmtree(trash, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk where the OS allows it (directories cannot be opened on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
