"""+ft's step sizes at a llama.cpp preset's types (CPU recipe): untuned GPTQ, then tuning with one step for every
format (as before ``finetune.step_scale``) and with the steps sized by each format's grid.

    python benchmarks/finetune_steps.py --preset Q5_K_M          # ~15 min on 2 cores
    python benchmarks/finetune_steps.py --preset Q2_K --variants steps

Quantizes the bundled model's decoder linears to the preset's per-tensor types (``io/gguf_presets.py``) with GPTQ
act-order, then tunes copies with ``+ft`` (whole-model mode, 2 epochs) and prints, per variant, KL and perplexity on
the first windows of the eval split against the float model, the training KL of the first and last batch, the first
batch's KL after tuning, whether the guard kept the tuning and whether it was the retry at a tenth of the rate.
Writes ``benchmarks/results/finetune-steps-<tag>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.algorithms import finetune as ft
from lowbit.algorithms.sequential import calibration_set
from lowbit.cli import HESSIAN_SHRINK
from lowbit.eval.perplexity import Reference
from lowbit.io.gguf_presets import preset_plan

VARIANTS = ("flat", "steps")  # one step for all formats (finetune before step_scale), steps by grid (the default)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Q5_K_M")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=12, help="eval windows of 512 tokens")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tag", default=None, help="default: cpu-<preset>")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model, tok = lowbit.load()
    teacher = copy.deepcopy(model)
    reference = Reference(teacher)
    calib = lowbit.CalibConfig(args.nsamples, args.seqlen, None, 0)
    t0 = time.perf_counter()
    recipe = lowbit.Recipe(format=preset_plan(model, args.preset, True).plan, method="gptq_act", calib=calib,
                           gptq=lowbit.GPTQConfig(shrink=HESSIAN_SHRINK))  # the CLI's default
    lowbit.quantize(model, recipe, tok, device="cpu", progress=False)
    rows = [{"variant": "none", "quantize_s": round(time.perf_counter() - t0, 1), **score(model, tok, reference, args)}]
    print(rows[-1], flush=True)
    samples = calibration_set(model, tok, calib)
    real = ft.step_scale
    for variant in variants:
        ft.step_scale = (lambda bits: 1.0) if variant == "flat" else real  # the A/B: finetune reads it per tensor
        try:
            tuned = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = ft.finetune(tuned, copy.deepcopy(teacher), samples, ft.FinetuneConfig(2.0, args.lr, 4, mode="model"),
                              "cpu", progress=False)
        finally:
            ft.step_scale = real
        rows.append({"variant": variant, "tune_s": round(time.perf_counter() - t0, 1),
                     "train_kl_first": rep.kl_first, "train_kl_last": rep.kl_last, "kl_end": rep.kl_end,
                     "kept": rep.kept, "retried": rep.retried, "lr": rep.lr, **score(tuned, tok, reference, args)})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"finetune-steps-{args.tag or 'cpu-' + args.preset.lower()}.json"
    out.write_text(json.dumps({"preset": args.preset, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def score(model: torch.nn.Module, tok: object, reference: Reference, args: argparse.Namespace) -> dict:
    r = lowbit.evaluate(model, tok, seqlen=512, max_windows=args.windows, reference=reference, progress=False)
    return {"ppl": r.ppl, "kl": r.kl, "top1": r.top1}


if __name__ == "__main__":
    raise SystemExit(main())
