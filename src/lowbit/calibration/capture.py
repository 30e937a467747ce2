"""Capturing what flows into decoder layers and their linears.

* :func:`capture_layer_inputs` runs the model up to the first decoder layer and records that layer's inputs
  (hidden states) and the keyword arguments the model passes to every layer (attention mask, rotary
  embeddings, position ids...), so layers can then be run one at a time.
* :class:`HessianAccumulator` hooks a linear layer and accumulates H = 2/N * sum(x x^T) over its N input rows;
  :class:`SharedHessians` does it for several linears, once per distinct input (q/k/v share one H).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.models.walker import decoder_layers, linear_weight


class _Stop(Exception):
    pass


@contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """Float32 matmuls on CUDA devices in TF32 (tensor cores: ~8x the rate, a 10-bit mantissa, float32's range)
    inside the block, or exactly (``enabled`` False) whatever the caller set; CPUs are unaffected. Calibration
    passes over thousands of windows use it (the layers' outputs and X^T X are sums over many products, where
    TF32's rounding averages out); GPTQ's own arithmetic always runs exactly (gptq.py)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device | str,
                         store_device: torch.device | str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering layer 0, [n, seqlen, hidden] float32; kwargs passed to each layer).

    Only the modules before the first layer (embeddings, rotary tables) run, on ``device``.
    """
    layers = decoder_layers(model)
    first = layers[0]
    store_device = store_device or device
    captured: list[torch.Tensor] = []
    kwargs_box: dict[str, Any] = {}

    def hook(_module, args, kwargs):  # noqa: ANN001, ANN202
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().float().to(store_device))
        kwargs_box.clear()
        kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    moved = _move_prefix(model, device)
    try:
        for i in range(samples.shape[0]):
            try:
                model(input_ids=samples[i : i + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m, dev in moved:
            m.to(dev)
    kwargs = {k: v for k, v in kwargs_box.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
    return torch.cat(captured), kwargs


def _move_prefix(model: nn.Module, device: torch.device | str) -> list[tuple[nn.Module, torch.device]]:
    """Move every module except the decoder layers and the LM head to ``device``; return how to undo it."""
    layers = decoder_layers(model)
    head = model.get_output_embeddings()
    skip = {id(layers), id(head)}
    moved = []
    for _name, child in _top_modules(model, skip):
        p = next(child.parameters(recurse=True), None)
        p = next(child.buffers(recurse=True), None) if p is None else p
        if p is not None:
            moved.append((child, p.device))
            child.to(device)
    return moved


def _top_modules(model: nn.Module, skip: set[int]) -> list[tuple[str, nn.Module]]:
    """Leaf-most modules that contain no skipped module (so the decoder stack itself is never moved)."""
    out = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            if id(child) in skip:
                continue
            if any(id(d) in skip for d in child.modules()):
                visit(f"{prefix}{name}.", child)
            else:
                out.append((f"{prefix}{name}", child))

    visit("", model)
    return out


class HessianAccumulator:
    """Running H = 2/N sum x x^T (float32) over all input rows a linear layer sees while hooked."""

    def __init__(self, module: nn.Module, in_features: int, device: torch.device | str):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):  # noqa: ANN001, ANN202
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        n = x.shape[0]
        self.H.mul_(self.rows / (self.rows + n))
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.H.addmm_(x.t(), x)

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.H


class SharedHessians:
    """Running Hessians of several linears, one per distinct input: linears whose forward receives the very same
    tensor (q/k/v read the normed hidden states, gate/up the MLP input) share one H, built once.

    Sharing is decided by identity, never by names: consecutive hooks that see the same tensor object (unchanged
    in between) form a run, and the run's first linear adds the input to its H with exactly
    :class:`HessianAccumulator`'s operations, so a shared H is bit-identical to each linear's own. :meth:`remove`
    returns ``[(names, H)]``, one entry per set of linears sharing an H, or None when the runs changed between
    forwards (a linear reading a shared input once and its own another time): then hook each linear on its own.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device | str):
        self.device = device
        self._in = {name: linear_weight(m).shape[1] for name, m in modules.items()}
        self._acc: dict[str, list] = {}  # a run's first linear -> [H, rows]
        self._runs: dict[str, set[tuple[str, ...]]] = {}  # linear -> every run it was part of
        self._run: list[str] = []
        self._input: tuple[torch.Tensor, int] | None = None  # the current run's input (held: its id stays unique)
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in modules.items()]
        self.rows: dict[tuple[str, ...], int] = {}  # input rows behind each H, filled by remove()

    def _hook_for(self, name: str):  # noqa: ANN202
        def hook(_module, args):  # noqa: ANN001, ANN202
            x = args[0]
            same = self._input is not None and self._input[0] is x and self._input[1] == _version(x)
            if same and name not in self._run:
                self._run.append(name)
                return
            self._end_run()
            self._input, self._run = (x, _version(x)), [name]
            if name not in self._acc:
                k = self._in[name]
                self._acc[name] = [torch.zeros(k, k, dtype=torch.float32, device=self.device), 0]
            acc = self._acc[name]
            x = x.detach().reshape(-1, x.shape[-1]).float()
            n = x.shape[0]
            acc[0].mul_(acc[1] / (acc[1] + n))
            acc[1] += n
            x = x * (2.0 / acc[1]) ** 0.5
            acc[0].addmm_(x.t(), x)

        return hook

    def _end_run(self) -> None:
        run = tuple(self._run)
        for n in run:
            self._runs.setdefault(n, set()).add(run)
        self._run, self._input = [], None

    def remove(self) -> list[tuple[tuple[str, ...], torch.Tensor]] | None:
        for h in self._handles:
            h.remove()
        self._end_run()
        if any(len(runs) > 1 for runs in self._runs.values()):
            return None
        runs = list(dict.fromkeys(next(iter(r)) for r in self._runs.values()))
        unused = [((n,), torch.zeros(k, k, dtype=torch.float32, device=self.device))
                  for n, k in self._in.items() if n not in self._runs]  # never called: H = 0, as a lone hook's
        self.rows = {run: self._acc[run[0]][1] for run in runs} | {run: 0 for run, _ in unused}
        return [(run, self._acc[run[0]][0]) for run in runs] + unused


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version
