"""What ``+ft`` does out of domain: variants of the tuning after one GPTQ run, each file scored in and out of domain.

    python benchmarks/finetune_ood.py --preset Q4_0 --variants none,base,ep3   # H200: GPTQ ~2 min, 1-3 min a variant
    python benchmarks/finetune_ood.py --preset Q2_K --nsamples 8 --seqlen 128 --ctx 512 --windows 4 --device cpu

GPTQ act-order (or --method) at the preset's per-tensor types (llama.cpp's, ``io/gguf_presets.py``) on --nsamples x
--seqlen calibration tokens (the GPU recipe's 128 x 2048 by default, Hessian shrink 0.5 as the CLI), once; then each
variant tunes a copy and is written as a GGUF file, whose weights are loaded into the float model and scored as
``gguf_vs_llamacpp.py`` scores files (lowbit's protocol over the whole eval split and the Factbook, windows of
--ctx tokens, KL to the float16 model), so its rows compare with that benchmark's llama.cpp rows.

Variants: ``none`` (GPTQ alone), ``base`` (``FinetuneConfig()``), ``lrX`` (Adam step X, e.g. lr1e-3), ``epX`` (X
epochs), ``cos`` (the rate falls to 0 along half a cosine), ``seedX`` (another order of the windows), ``nonorm``
(scales only), ``decayX`` (AdamW's decay toward the untuned values at weight X), ``retryX`` (a refused tuning
runs again at X times its rate, at most ``finetune.RETRY_LR``: ``finetune.RETRY_FRACTION``), ``mixN`` (the
calibration windows plus as many sampled from the float model at temperature 1, N epochs over both); parts join
with ``+``: ``ep3+cos``.
``--gptq-mix``: GPTQ's Hessians from half the calibration windows and half sampled ones.
``--llama-bin DIR``: each file is also scored by stock ``llama-perplexity`` from DIR on both texts, in
``--llama-ctx`` windows (512, llama.cpp's usual), the first ``--llama-chunks`` of them (-1: all): fields
``llama_ppl`` and ``llama_ppl@factbook``; ``gguf_vs_llamacpp.py --methods none`` gives the F16 and llama.cpp files'
on the same windows.
Writes ``benchmarks/results/finetune-ood-<tag>.json`` after every variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import lowbit
import lowbit.api as api
from calib_selfgen import generated  # benchmarks/, the script's folder, is first on sys.path
from gguf_vs_llamacpp import llama_perplexity, suffixed
from lowbit.algorithms import finetune as ft
from lowbit.algorithms.sequential import calibration_set
from lowbit.cli import HESSIAN_SHRINK
from lowbit.data.corpus import load_text
from lowbit.eval.perplexity import Reference
from lowbit.io.gguf_import import load_gguf_weights
from lowbit.io.gguf_presets import preset_plan

RESULTS = Path(__file__).parent / "results"


def config_for(variant: str) -> tuple[ft.FinetuneConfig, float, float]:
    """(FinetuneConfig, AdamW weight decay, retry fraction) of a variant name: parts joined by ``+``
    (``ep3+cos+lr1e-3``)."""
    cfg, extra = ft.FinetuneConfig(), {"decay": 0.0, "retry": ft.RETRY_FRACTION}
    for part in variant.split("+"):
        for prefix, name in (("lr", "lr"), ("ep", "epochs"), ("mix", "epochs"), ("decay", "decay"), ("seed", "seed"),
                             ("retry", "retry")):
            if part.startswith(prefix) and part[len(prefix):]:
                value = float(part[len(prefix):])
                value = int(value) if name == "seed" else value
                if name in extra:
                    extra[name] = value
                else:
                    cfg = replace(cfg, **{name: value})
                break
        else:
            if part == "nonorm":
                cfg = replace(cfg, norms=False)
            elif part == "cos":
                cfg = replace(cfg, schedule="cosine")
            elif part not in ("base", "none"):
                raise SystemExit(f"unknown variant {variant!r}")
    return cfg, extra["decay"], extra["retry"]


def adamw(decay: float):  # noqa: ANN201 - replaces ft._adam: the log-multipliers decay toward 0, the untuned value
    real = ft._adam

    def make(tuned: list, lr: float) -> torch.optim.Optimizer:
        groups = real(tuned, lr).param_groups
        return torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups], lr=lr, weight_decay=decay)
    return make


TEXTS = ("eval", "factbook")


def stock_scores(args: argparse.Namespace, work: Path, path: Path) -> dict:
    """``llama_ppl`` / ``llama_ppl_err`` (``@factbook``) of a GGUF file by stock llama-perplexity; {} without
    --llama-bin."""
    if not args.llama_bin:
        return {}
    row = {}
    for text in TEXTS:
        ppl, err = llama_perplexity(str(Path(args.llama_bin) / "llama-perplexity"), path, work / f"{text}.txt",
                                    args.llama_ctx, args.llama_chunks, args.threads,
                                    work / f"{path.stem}.{text}.ppl.log")
        row |= suffixed({"llama_ppl": ppl, "llama_ppl_err": err}, text)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Q4_0")
    ap.add_argument("--variants", default="none,base,mix1")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=2048, help="scoring windows")
    ap.add_argument("--windows", type=int, default=None, help="at most this many scoring windows per text")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default="/tmp/finetune-ood")
    ap.add_argument("--method", default="gptq_act", choices=["gptq_act", "imatrix", "rtn"], help="the rounding tuned")
    ap.add_argument("--gptq-mix", action="store_true", help="GPTQ's windows: half the calibration split, half sampled")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--llama-bin", default=None, help="folder with stock llama-perplexity: score each file with it")
    ap.add_argument("--llama-ctx", type=int, default=512)
    ap.add_argument("--llama-chunks", type=int, default=-1, help="llama-perplexity windows per text (-1: all)")
    ap.add_argument("--threads", type=int, default=4, help="llama-perplexity's CPU threads")
    args = ap.parse_args(argv)
    if args.llama_bin and not (Path(args.llama_bin) / "llama-perplexity").exists():
        ap.error(f"no llama-perplexity in {args.llama_bin}")
    variants = args.variants.split(",")
    for v in variants:
        config_for(v)  # an unknown name fails before minutes of GPTQ
    tag = args.tag or f"{args.preset.lower()}-{'gpu' if args.device != 'cpu' else 'cpu'}"
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = lowbit.load(device="cpu")
    fp = copy.deepcopy(model)
    types = preset_plan(model, args.preset, True)
    calib = lowbit.CalibConfig(args.nsamples, args.seqlen, None, 0)
    recipe = lowbit.Recipe(format=types.plan, method=args.method, calib=calib,
                           gptq=lowbit.GPTQConfig(shrink=HESSIAN_SHRINK))
    samples = calibration_set(fp, tok, calib)
    gen, meta = None, {}
    if args.llama_bin:
        for text in TEXTS:
            (work / f"{text}.txt").write_text(load_text(text))
        meta |= {"llama_ctx": args.llama_ctx, "llama_chunks": args.llama_chunks}
    if args.gptq_mix:
        t1 = time.perf_counter()
        gen = generated(fp, tok, args.nsamples, seqlen=args.seqlen, device=args.device, batch=64)
        meta["generate_s"] = round(time.perf_counter() - t1, 1)
        half = args.nsamples // 2
        windows = torch.cat([samples[:half], gen[:half]])
        api.calibration_set = lambda *a: windows  # what quantize's GPTQ reads
    t0 = time.perf_counter()
    lowbit.quantize(model, recipe, tok, device=args.device, progress=False)
    gptq_s = time.perf_counter() - t0
    reference = Reference(copy.deepcopy(fp).to(args.device), cache_bytes=6e9)
    meta |= {"preset": args.preset, "method": args.method,
             "command": "python benchmarks/finetune_ood.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu", "gptq_s": round(gptq_s, 1)}
    rows = []
    for variant in variants:
        cfg, decay, retry = config_for(variant)
        tuned = copy.deepcopy(model)
        row: dict = {"variant": variant}
        if variant != "none":
            data = samples
            if "mix" in variant:
                if gen is None:
                    t1 = time.perf_counter()
                    gen = generated(fp, tok, args.nsamples, seqlen=args.seqlen, device=args.device, batch=64)
                    meta["generate_s"] = round(time.perf_counter() - t1, 1)
                data = torch.cat([samples, gen])
            real, real_retry = ft._adam, ft.RETRY_FRACTION
            ft._adam, ft.RETRY_FRACTION = (adamw(decay) if decay else real), retry
            try:
                t1 = time.perf_counter()
                rep = ft.finetune(tuned, ft.host_copy(fp), data, cfg, args.device, progress=False)
            finally:
                ft._adam, ft.RETRY_FRACTION = real, real_retry
            row |= {"tune_s": round(time.perf_counter() - t1, 1), "train_kl_first": rep.kl_first,
                    "train_kl_last": rep.kl_last, "kept": rep.kept, "retried": rep.retried, "steps": rep.steps,
                    "lr": rep.lr}
        path = work / f"{variant}.gguf"
        path.unlink(missing_ok=True)
        lowbit.export_gguf(tuned, tok, path, embed_type=types.embed_type or "f16", output_type=types.output_type)
        scored = load_gguf_weights(copy.deepcopy(fp), path).to(args.device)
        for text in TEXTS:
            r = lowbit.evaluate(scored, tok, text_file=None if text == "eval" else text, seqlen=args.ctx,
                                max_windows=args.windows, reference=reference, progress=False)
            row |= suffixed({"ppl": r.ppl, "kl": r.kl, "top1": r.top1}, text)
        row |= stock_scores(args, work, path)
        del scored, tuned
        rows.append(row)
        print(json.dumps(row), flush=True)
        out = RESULTS / f"finetune-ood-{tag}.json"
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
