"""+ft on an asymmetric grid, its two parametrizations side by side (CPU recipe, a few minutes on 2 cores).

    python benchmarks/finetune_asym.py --format int3_g64_asym

Rounds the bundled model's decoder linears to FORMAT (round to nearest), then tunes copies with ``+ft``
(whole-model mode, 2 epochs on 32 x 128 calibration tokens) two ways: ``apart``, the scale and the min each
multiplied by its own ``exp(t)`` (``Format.tuned``, as every format was tuned before), and ``whole``, the default
(``UniformFormat.tuned``): the scale's multiplier scales the group about zero, min included, and the min moves by
grid steps. Prints KL and perplexity on the first eval windows against the float model, the first batch's KL before
and after the tuning, and whether the guard kept it. Writes ``benchmarks/results/finetune-asym-<tag>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lowbit
from finetune_steps import score  # the same eval windows and fields
from lowbit.algorithms import finetune as ft
from lowbit.algorithms.sequential import calibration_set
from lowbit.eval.perplexity import Reference
from lowbit.formats import get_format
from lowbit.formats.base import Format
from lowbit.formats.uniform import UniformFormat

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="int3_g64_asym")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--windows", type=int, default=6, help="eval windows of 512 tokens")
    ap.add_argument("--tag", default=None, help="default: cpu-<format>")
    args = ap.parse_args(argv)
    fmt = get_format(args.format)
    if not isinstance(fmt, UniformFormat) or fmt.symmetric:
        ap.error(f"{args.format} is not an asymmetric uniform grid (scale and min)")
    torch.manual_seed(0)
    model, tok = lowbit.load()
    teacher = copy.deepcopy(model).eval()
    reference = Reference(teacher)

    lowbit.quantize(model, lowbit.Recipe.parse(f"rtn:{args.format}"), tok, device="cpu", progress=False)
    rows = [{"variant": "rtn", **score(model, tok, reference, args)}]
    print(rows[-1], flush=True)
    samples = calibration_set(model, tok, lowbit.CalibConfig(32, 128, None, 0))
    whole = UniformFormat.tuned
    try:
        for variant in ("apart", "whole"):
            UniformFormat.tuned = Format.tuned if variant == "apart" else whole  # the A/B: ScaleTunedLinear reads it
            tuned = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = ft.finetune(tuned, copy.deepcopy(teacher), samples, ft.FinetuneConfig(2.0, args.lr, 4, mode="model"),
                              device="cpu", progress=False)
            rows.append({"variant": variant, "tune_s": round(time.perf_counter() - t0, 1), "kl_first": rep.kl_first,
                         "kl_end": rep.kl_end, "kept": rep.kept, "retried": rep.retried, "lr": rep.lr,
                         **score(tuned, tok, reference, args)})
            print(rows[-1], flush=True)
    finally:
        UniformFormat.tuned = whole
    out = RESULTS / f"finetune-asym-{args.tag or 'cpu-' + args.format}.json"
    out.write_text(json.dumps({"format": args.format, "lr": args.lr, "calib": "32 x 128", "windows": args.windows,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
