"""Does TF32 in GPTQ's calibration passes cost quality? The bundled model quantized twice, TF32 on and off.

    python benchmarks/tf32_quality.py --presets Q4_0,IQ2_XXS --tag h200

Streamed and in-memory GPTQ run the calibration forwards and X^T X in TF32 on CUDA by default
(``GPTQConfig.tf32``, ``--no-tf32``); GPTQ's own arithmetic stays exact float32 either way. Each preset's
per-tensor types (llama.cpp's, io/gguf_presets.py) are quantized with ``gptq_act`` on ``--nsamples`` x
``--seqlen`` calibration windows with TF32 on, then off, and scored on the whole eval split (perplexity, KL to the
float model, top-1 agreement). Table to stdout and ``benchmarks/results/tf32-<tag>.md``. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.algorithms.sequential import GPTQConfig
from lowbit.eval.perplexity import Reference
from lowbit.io.gguf_presets import preset_plan

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="Q4_0,IQ2_XXS")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--tag", default="gpu")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("TF32 is a CUDA setting: run this on a GPU machine")
    model, tok = lowbit.load(None, device="cuda")
    reference = Reference(model, cache_bytes=4e9)
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"Hardware: {torch.cuda.get_device_name()}, torch {torch.__version__}. gptq_act, {a.nsamples} x "
             f"{a.seqlen} calibration windows; eval: all windows x {a.ctx} tokens of the eval split.", "",
             "| preset | calibration passes | ppl | KL nats/token | top-1 % | quantize s |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for preset in a.presets.split(","):
        plan = preset_plan(model, preset, searched=True).plan
        for tf32 in (True, False):
            recipe = lowbit.Recipe(plan, "gptq_act", calib=lowbit.CalibConfig(a.nsamples, a.seqlen),
                                   gptq=GPTQConfig(tf32=tf32))
            quantized = copy.deepcopy(model)
            t0 = time.perf_counter()
            lowbit.quantize(quantized, recipe, tok, device="cuda", progress=False)
            seconds = time.perf_counter() - t0
            r = lowbit.evaluate(quantized, tok, seqlen=a.ctx, reference=reference, progress=False)
            lines.append(f"| {preset} | {'TF32' if tf32 else 'float32'} | {r.ppl:.3f} | {r.kl:.4f} | "
                         f"{100 * r.top1:.1f} | {seconds:.0f} |")
            print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"tf32-{a.tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
