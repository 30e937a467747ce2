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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.gptq import GPTQResult, gptq_quantize, proxy_loss
from lowbit.algorithms.plans import plan_by_layer, validate_plan
from lowbit.calibration.capture import HessianAccumulator, capture_layer_inputs
from lowbit.calibration.samples import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, calibration_samples
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import model_max_length
from lowbit.formats import get_format
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

    def __post_init__(self) -> None:
        if self.blocksize < 1 or not 0 <= self.percdamp < 1:
            raise LowbitError(f"GPTQ needs blocksize >= 1 and 0 <= damp < 1, got {self}")


@dataclass
class LinearStats:
    proxy_loss: float
    rtn_proxy_loss: float
    damp: float
    retries: int
    seconds: float


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
    U W V^T against V H V^T with seeded randomized Hadamards U, V (undone online). ``samples`` ([n, seqlen] token
    ids) replaces the calibration text when given.
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

    fingerprint = _fingerprint(model, plan, calib, gptq, rounding, rotation_seed)
    ckpt = _Checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
    start = 0
    report = SequentialReport()
    t_start = time.perf_counter()
    resumed = ckpt.load(layers) if ckpt else None
    if resumed:
        start, inps, stats = resumed
        report.linears.update(stats)
        report.resumed_from_layer = start
        _, kwargs = capture_layer_inputs(model, samples[:1], device)
        inps = inps.to(device)
    else:
        inps, kwargs = capture_layer_inputs(model, samples, device)

    bar = tqdm(range(start, len(layers)), desc="gptq", unit="layer", disable=not progress,
               initial=start, total=len(layers))
    for i in bar:
        layer = layers[i]
        home = module_device(layer)
        layer.to(device)
        names = by_layer[i]
        stats = _quantize_layer(layer, names, plan, prefix, i, inps, kwargs, gptq, rounding, rotation_seed)
        report.linears.update(stats)
        inps = _run_layer(layer, inps, kwargs)
        layer.to(home)
        if ckpt:
            ckpt.save(i, layer, inps, report.linears)
        if stats:
            bar.set_postfix(loss=f"{sum(s.proxy_loss for s in stats.values()):.4g}",
                            rtn=f"{sum(s.rtn_proxy_loss for s in stats.values()):.4g}")
        if on_layer_done:
            on_layer_done(i)
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
    for j in range(inps.shape[0]):
        out = layer(inps[j : j + 1], **kwargs)
        outs[j] = (out[0] if isinstance(out, tuple) else out)[0].float()
    return outs


def _quantize_layer(layer: nn.Module, names: list[str], plan: dict[str, str], prefix: str, index: int,
                    inps: torch.Tensor, kwargs: dict[str, Any], cfg: GPTQConfig, rounding: str,
                    rotation_seed: int | None) -> dict[str, LinearStats]:
    local = {n: n[len(f"{prefix}.{index}.") :] for n in names}
    accs = {}
    for name, sub in local.items():
        module = layer.get_submodule(sub)
        accs[name] = HessianAccumulator(module, linear_weight(module).shape[1], inps.device)
    try:
        _run_layer(layer, inps, kwargs)
    finally:
        hessians = {n: a.remove() for n, a in accs.items()}
    stats = {}
    for name, sub in local.items():
        t0 = time.perf_counter()
        module = layer.get_submodule(sub)
        fmt = get_format(plan[name])
        w = linear_weight(module).float()
        H = hessians[name]
        rotation = None if rotation_seed is None else Rotation.for_layer(name, rotation_seed)
        if rotation:
            w, H = rotation.rotate_weight(w), rotation.rotate_hessian(H)
        if rounding == "imatrix":
            qt = fmt.quantize(w, importance=H.diagonal().clamp_min(0))
            res = GPTQResult(qt, proxy_loss(w, fmt.dequantize(qt), H), 0.0, 0)
        else:
            # act-order where the format allows it (scalar grids); vector codebooks in a mixed plan (IQ2_XXS
            # beside IQ4_NL fallbacks) keep natural order rather than failing the whole plan
            act = rounding == "gptq_act" and fmt.vector_dim == 1
            res = gptq_quantize(w, H, fmt, cfg.blocksize, cfg.percdamp, act, cfg.static_groups)
        rtn = proxy_loss(w, fmt.dequantize(fmt.quantize(w)), H)
        bias = getattr(module, "bias", None)
        set_module(layer, sub, QuantLinear.from_quantized(res.qt, None if bias is None else bias.data, rotation))
        stats[name] = LinearStats(res.proxy_loss, rtn, res.damp, res.retries, time.perf_counter() - t0)
        if res.retries:
            tqdm.write(f"lowbit: {name}: Cholesky failed {res.retries}x; damping raised to {res.damp:g}")
    return stats


def _fingerprint(model: nn.Module, plan: dict[str, str], calib: CalibConfig, gptq: GPTQConfig, rounding: str,
                 rotation_seed: int | None) -> str:
    h = hashlib.sha256()
    h.update(model.config.to_json_string().encode())
    settings = [sorted(plan.items()), asdict(calib), asdict(gptq), rounding, rotation_seed]
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p in list(model.parameters())[:4]:  # cheap guard against resuming onto different weights
        h.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()


CHECKPOINT_LAYOUT = 2  # stored in every state.json; layout 1 (flat files, non-atomic commit) is refused


class _Checkpoint:
    """Crash-safe GPTQ checkpoint: one directory per finished layer, each committed by a single atomic rename.

    ``step-<i>/`` holds layer i's quantized tensors (``layer.safetensors``, formats in its metadata), the inputs of
    layer i+1 (``inputs.safetensors``) and ``state.json`` (layout, fingerprint, ``next_layer`` = i+1, stats so far).
    All three are written into ``step-<i>.tmp/`` (state last), flushed, and the directory is renamed to ``step-<i>``:
    that rename is the commit. The newest ``step-<i>`` is the checkpoint; it names every layer that counts (0..i),
    whose tensors stay in their own, never rewritten, ``step-<j>/layer.safetensors``. Once a step is committed the
    older steps' inputs are deleted. ``*.tmp`` directories are a killed run's leftovers: ignored and removed.
    """

    _STEP = re.compile(r"step-(\d+)")

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def _step(self, index: int) -> Path:
        return self.path / f"step-{index}"

    def _committed(self) -> dict[int, Path]:
        if not self.path.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.path.iterdir() if (m := self._STEP.fullmatch(p.name)) and p.is_dir()}

    def _prune(self, current: int) -> None:
        """Remove leftover ``*.tmp`` steps and the inputs of steps older than ``current``."""
        for p in self.path.iterdir():
            if p.name.endswith(".tmp") and self._STEP.fullmatch(p.name[: -len(".tmp")]):
                shutil.rmtree(p, ignore_errors=True)
            elif (m := self._STEP.fullmatch(p.name)) and int(m.group(1)) < current:
                (p / "inputs.safetensors").unlink(missing_ok=True)

    def save(self, index: int, layer: nn.Module, inps: torch.Tensor, stats: dict[str, LinearStats]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        final = self._step(index)
        tmp = final.with_name(f"{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        formats = {n: [m.format_name, m.rotation.to_json() if m.rotation else None]
                   for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        save_file(tensors, str(tmp / "layer.safetensors"), metadata={"formats": json.dumps(formats)})
        save_file({"inputs": inps.detach().cpu().contiguous()}, str(tmp / "inputs.safetensors"))
        state = {"layout": CHECKPOINT_LAYOUT, "fingerprint": self.fingerprint, "next_layer": index + 1,
                 "stats": {k: asdict(v) for k, v in stats.items()}}
        (tmp / "state.json").write_text(json.dumps(state))  # last, though only the rename below makes it count
        for f in ("layer.safetensors", "inputs.safetensors", "state.json", "."):
            _fsync(tmp / f)
        os.replace(tmp, final)  # the commit: layer i, the inputs of layer i+1 and their state appear together
        _fsync(self.path)
        self._prune(index)

    def load(self, layers: nn.ModuleList) -> tuple[int, torch.Tensor, dict[str, LinearStats]] | None:
        """Restore the committed layers into ``layers``; (next layer, its inputs, stats), or None to start over."""
        found = self.committed(len(layers))
        if found is None:
            return None
        from safetensors import safe_open

        for i in range(found[0]):
            f = self.layer_file(i)
            with safe_open(str(f), "pt") as sf:
                formats = json.loads(sf.metadata()["formats"])
            layer = layers[i]
            for sub, (fmt, rot) in formats.items():
                set_module(layer, sub, empty_quant_linear(layer.get_submodule(sub), fmt, Rotation.from_json(rot)))
            layer.load_state_dict(load_file(str(f)), strict=True)
        return found

    def layer_file(self, index: int) -> Path:
        """Where committed layer ``index``'s quantized tensors are (formats and rotations in its metadata)."""
        return self._step(index) / "layer.safetensors"

    def committed(self, n_layers: int) -> tuple[int, torch.Tensor, dict[str, LinearStats]] | None:
        """(next layer, its inputs, stats) of the newest committed step of a model of ``n_layers`` layers, checked
        against this run's fingerprint, without reading any layer; None to start over."""
        if not self.path.is_dir():
            return None
        if (self.path / "state.json").exists():
            raise LowbitError(f"checkpoint {self.path} has the older, non-atomic layout, which a kill can leave "
                              "inconsistent; delete it to start over")
        steps = self._committed()
        if not steps:
            self._prune(0)
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
        inps = load_file(str(steps[current] / "inputs.safetensors"))["inputs"]
        stats = {k: LinearStats(**v) for k, v in state["stats"].items()}
        self._prune(current)
        return n, inps, stats

    def remove(self) -> None:
        """Delete the checkpoint: one rename retires it whole, so a kill while deleting never leaves a partial one
        that a rerun would try to resume."""
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
