"""Is one +ft step against the gradient a step down? Per kind of tensor, at a llama.cpp preset's types (CPU, minutes).

    python benchmarks/finetune_probe.py --preset Q5_K_M --steps 1e-4,1e-3

Rounds the bundled model's decoder linears to the preset's per-tensor types (round to nearest), wraps them as +ft
does (``ScaleTunedLinear``), takes the KL gradient on 4 x 128 calibration tokens, then moves every trainable
parameter of one format at a time by ``-step * sign(gradient)`` (the size of Adam's first step) and prints the KL on
the same tokens. A step that raises the KL for a format where the others lower it points at how that format is
parametrized. Both parametrizations of asymmetric grids are probed: ``apart`` (scale and min each times its own
``exp(t)``) and ``whole`` (the default: the group scaled about zero, the min moved by grid steps).
"""

from __future__ import annotations

import argparse
import copy

import torch

import lowbit
from lowbit.algorithms import finetune as ft
from lowbit.algorithms.sequential import calibration_set
from lowbit.formats.base import Format
from lowbit.formats.uniform import UniformFormat
from lowbit.io.gguf_presets import preset_plan
from lowbit.models.walker import set_module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Q5_K_M")
    ap.add_argument("--steps", default="1e-4,1e-3")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = lowbit.load()
    teacher = copy.deepcopy(model).eval()
    lowbit.quantize(model, lowbit.Recipe(format=preset_plan(model, args.preset, True).plan, method="rtn"), tok,
                    device="cpu", progress=False)
    samples = calibration_set(model, tok, lowbit.CalibConfig(4, 128, None, 0))
    wrapped = {n: ft.ScaleTunedLinear(m) for n, m in ft.tunable_linears(model).items()}
    for n, w in wrapped.items():
        set_module(model, n, w)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        target = teacher(samples).logits
    kinds: dict[str, list[ft.ScaleTunedLinear]] = {}
    for w in wrapped.values():
        kinds.setdefault(w.q.fmt.name, []).append(w)
    whole = UniformFormat.tuned
    try:
        for variant in ("apart", "whole"):
            UniformFormat.tuned = Format.tuned if variant == "apart" else whole
            params = [t for w in wrapped.values() for t in w.log.values()]
            for t in params:
                t.data.zero_()
                t.requires_grad_(True)
                t.grad = None
            loss = ft.kl_per_token(target, model(samples).logits)
            loss.backward()
            print(f"{variant}: KL {float(loss.detach()):.5f} before any step", flush=True)
            for step in map(float, args.steps.split(",")):
                for name, ws in sorted(kinds.items()):
                    with torch.no_grad():
                        for w in wrapped.values():
                            for t in w.log.values():
                                t.data.copy_(-step * t.grad.sign() if w in ws else torch.zeros_like(t))
                        kl = float(ft.kl_per_token(target, model(samples).logits))
                    print(f"  {name} ({len(ws)} tensors), step {step:g}: KL {kl:.5f}", flush=True)
    finally:
        UniformFormat.tuned = whole
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
