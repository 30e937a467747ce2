"""Calibration windows sampled from the float model itself, alone or mixed with the calibration split (CPU recipe).

    python benchmarks/calib_selfgen.py                 # sotu64 mix32 mix64 sotu128 gen64, ~25 min on 2 cores
    python benchmarks/calib_selfgen.py --variants sotu64,mix32

Text the model writes is of no particular domain, so GPTQ's Hessian from it might generalize where 8k tokens of
speeches overfit (docs/gguf.md). Each variant quantizes the bundled model's decoder linears to q4_0 with GPTQ
act-order (the CLI's CPU settings: windows of 128 tokens, Hessian shrink 0.5 below 64k tokens) from its windows:
``sotuN`` N windows of the calibration split, ``genN`` N windows sampled at temperature 1 from the float model
(each started from a calibration-split token), ``mixN`` N of each. Scored with lowbit's protocol on the first 16
windows of 512 tokens of the eval split and of the Factbook, KL to the float model. Writes
``benchmarks/results/calib-selfgen-<tag>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lowbit
import lowbit.api as api
from lowbit.algorithms.sequential import GPTQConfig
from lowbit.calibration.samples import calibration_samples
from lowbit.data.corpus import load_text
from lowbit.eval.perplexity import Reference, perplexity, tokenize_stream

SEQ = 128
VARIANTS = {"sotu64": (64, 0), "mix32": (32, 32), "mix64": (64, 64), "sotu128": (128, 0), "gen64": (0, 64)}


def generated(model: torch.nn.Module, tok: object, n: int, seed: int = 0, seqlen: int = SEQ,
              device: str | None = None, batch: int | None = None) -> torch.Tensor:
    """n windows of seqlen tokens sampled at temperature 1 from ``model``, each from a calibration-split token
    (a copy of the model on ``device`` if given; ``batch`` windows per generate call, default all)."""
    first = calibration_samples(tok, n, 2, seed=seed + 7)[:, :1]
    torch.manual_seed(seed)
    if device is not None:
        model = copy.deepcopy(model).to(device)
    out = []
    with torch.no_grad():
        for ids in first.split(batch or n):
            ids = ids.to(next(model.parameters()).device)
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                                      pad_token_id=tok.eos_token_id)[:, :seqlen].cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; known: {','.join(VARIANTS)}")
    reference, tok = lowbit.load()
    t0 = time.time()
    gen = generated(reference, tok, max(VARIANTS[v][1] for v in names) or 1)
    gen_s = time.time() - t0
    ref = Reference(reference)
    texts = {t: tokenize_stream(tok, load_text(t)) for t in ("eval", "factbook")}
    rows = []
    for name in names:
        n_calib, n_gen = VARIANTS[name]
        parts = [calibration_samples(tok, n_calib, SEQ)] if n_calib else []
        samples = torch.cat(parts + ([gen[:n_gen]] if n_gen else []))
        api.calibration_set = lambda model, tokenizer, calib, s=samples: s  # the windows this variant names
        model, _ = lowbit.load()
        recipe = lowbit.Recipe("q4_0", method="gptq_act",
                               gptq=GPTQConfig(shrink=0.5 if samples.numel() < 65536 else 0.0))
        t1 = time.time()
        lowbit.quantize(model, recipe, tok, device="cpu", progress=False)
        row = {"variant": name, "windows": list(samples.shape), "quantize_s": round(time.time() - t1, 1)}
        for t, ids in texts.items():
            r = perplexity(model, ids, 512, max_windows=16, progress=False, reference=ref)
            row |= {f"ppl@{t}": r.ppl, f"kl@{t}": r.kl}
        rows.append(row)
        print(json.dumps(row), flush=True)
        out = Path(__file__).parent / "results" / f"calib-selfgen-{args.tag}.json"  # after every variant
        out.write_text(json.dumps({"command": f"python benchmarks/calib_selfgen.py --variants {args.variants}",
                                   "generate_s": round(gen_s, 1), "torch_threads": torch.get_num_threads(),
                                   "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
