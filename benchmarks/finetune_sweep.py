"""Does end-to-end scale tuning (``+ft``) lower the perplexity of GGUF files, and with which settings?

    python benchmarks/finetune_sweep.py --like llama.cpp-IQ2_XXS.gguf --tag h100
    python benchmarks/finetune_sweep.py --plan plan.json --configs 1:1e-3,2:1e-3,2:3e-3 --method gptq_act
    python benchmarks/finetune_sweep.py --like F.gguf --save-plan plan.json     # just write the plan and exit

The model is quantized once (``--method``, every tensor the type it has in ``--like``, or the ``--plan`` JSON
{"plan": {linear: format}, "embed_type": fmt}); then each ``EPOCHS:LR[:nonorm]`` config tunes a copy of it
(algorithms/finetune.py), writes it as GGUF and scores the *file* (its tensors read back into the model,
io/gguf_import.py) with lowbit's perplexity protocol on the eval split: the ``ppl`` column of
benchmarks/gguf_vs_llamacpp.py. Rows go to benchmarks/results/finetune-sweep-<tag>.json as they finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import lowbit
from lowbit.algorithms.finetune import finetune
from lowbit.algorithms.sequential import calibration_set
from lowbit.io.gguf_import import load_gguf_weights
from lowbit.io.gguf_types import plan_like
from lowbit.models.walker import default_device

RESULTS = Path(__file__).parent / "results"


def parse_configs(spec: str) -> list[tuple[str, lowbit.FinetuneConfig]]:
    out = []
    for item in spec.split(","):
        epochs, lr, *flags = item.split(":")
        out.append((item, lowbit.FinetuneConfig(float(epochs), float(lr), norms="nonorm" not in flags)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--like", help="GGUF of the same model whose tensor types to reproduce")
    src.add_argument("--plan", help="JSON {'plan': {linear: format}, 'embed_type': format}")
    ap.add_argument("--save-plan", help="write the --like plan as JSON here and exit")
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="gptq_act")
    ap.add_argument("--configs", default="1:1e-3,2:1e-3,2:3e-3,4:1e-3,2:1e-3:nonorm")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None, help="eval windows (default: all)")
    ap.add_argument("--work", default="ft-sweep")
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args(argv)

    calib = lowbit.CalibConfig(a.nsamples, a.seqlen)
    # the format is a placeholder, replaced below by the --like / --plan per-tensor types
    recipe = lowbit.Recipe.parse(f"{a.method}:q8_0", calib=calib)
    configs = parse_configs(a.configs)
    model, tok = lowbit.load(a.model, device="cpu")  # float32, weights rounded to float16 as stored
    if a.like:
        like = plan_like(model, a.like, searched=recipe.method != "rtn")
        plan, embed_type = like.plan, like.embed_type
        if a.save_plan:
            Path(a.save_plan).write_text(json.dumps({"plan": plan, "embed_type": embed_type}, indent=1))
            return 0
    else:
        spec = json.loads(Path(a.plan).read_text())
        plan, embed_type = spec["plan"], spec["embed_type"]
    device = default_device()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"finetune-sweep-{a.tag}.json"
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    recipe = recipe.with_format(plan)
    samples = calibration_set(model, tok, calib)  # what each config tunes on (the recipe draws the same windows)
    name = f"{a.method}:{Path(a.like or a.plan).stem}"

    def score(label: str, m: torch.nn.Module, extra: dict) -> None:
        path = work / f"{label.replace(':', '_').replace('/', '_')}.gguf"
        lowbit.export_gguf(m, tok, path, embed_type=embed_type, overwrite=True)
        t0 = time.perf_counter()
        scored = load_gguf_weights(copy.deepcopy(model), path).to(device)
        res = lowbit.evaluate(scored, tok, seqlen=a.ctx, max_windows=a.max_windows, progress=False)
        row = {"label": label, "ppl": res.ppl, "windows": res.n_windows, "file_mb": path.stat().st_size / 1e6,
               "eval_s": time.perf_counter() - t0, **extra}
        rows.append(row)
        meta = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                "calibration": f"{a.nsamples} x {a.seqlen}"}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"| {label} | {row['file_mb']:.1f} | {res.ppl:.3f} | {extra.get('kl_first', '')} | "
              f"{extra.get('kl_last', '')} | {extra.get('seconds', '')} |", flush=True)

    print("| variant | MB | ppl | KL first batch | KL last batch | tune s |\n|---|---|---|---|---|---|", flush=True)
    t0 = time.perf_counter()
    quantized = copy.deepcopy(model)
    lowbit.quantize(quantized, recipe, tok, device=device, progress=False)
    score(name, quantized, {"quant_s": time.perf_counter() - t0})
    for label, cfg in configs:
        m = copy.deepcopy(quantized)
        rep = finetune(m, model, samples, cfg, device=device, progress=False)
        score(f"{name}+ft {label}", m, {**asdict(rep), "config": asdict(cfg)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
