"""Whole-model vs block-wise end-to-end scale tuning (``+ft``), same windows and budget, scored by perplexity and KL.

    python benchmarks/finetune_blocks.py --method rtn --format q4_0 --tag cpu
    python benchmarks/finetune_blocks.py --method gptq_act --format q4_0 --variants none,model,blocks:2
    python benchmarks/finetune_blocks.py --format "down_proj=iq2_xxs,v_proj=q4_0,*=iq4_nl" --method gptq
    python benchmarks/finetune_blocks.py --preset IQ2_XXS --method gptq_act --variants none,model,stream \
        --device cuda --nsamples 128 --seqlen 2048 --epochs 2 --eval-windows 0    # the GPU recipe

The bundled model (or ``--model``) is quantized once (``--method``, ``--format``: a format name or a plan
``SUFFIX=FORMAT,...,*=FORMAT``, linears matched by name suffix; the example is the shape of llama.cpp's IQ2_XXS
file of SmolLM2, whose 576-wide rows only hold IQ2_XXS super-blocks in ffn_down), or ``--preset`` (llama.cpp's
per-tensor types for that preset, io/gguf_presets.py). ``--device`` runs quantization, tuning and eval there.
Each variant tunes a copy on the same ``--nsamples`` x ``--seqlen`` calibration windows (algorithms/finetune.py):

* ``none``: untuned;
* ``model``: KL through the whole network (``mode="model"``);
* ``blocks:B[:OPTION...]``: B decoder layers at a time (``finetune_blocks``); options: a chain (compensate | quant |
  float), a loss (token | mse), ``nofinal`` (leave the final norm and the tail alone), ``tailT`` (the tail stage
  retunes the last T layers with the final norm by KL; default ``FinetuneConfig.tail_layers``, ``tail0``: the final
  norm alone, as before the tail stage);
* ``VARIANT@E``: that variant with E epochs instead of ``--epochs`` (``blocks:1@8``);
* ``stream[:tailT]``: ``lowbit quantize --stream --finetune``: the model quantized again from its directory a layer
  at a time, each layer tuned right after its rounding, so later layers are rounded on tuned inputs, then the tail
  stage (streamed.py; its "tune s" is the whole streamed run, rounding included).

Every copy is scored with ``lowbit.evaluate`` on the first ``--eval-windows`` windows of ``--ctx`` tokens of the
eval split, with the float model as reference (perplexity, KL nats/token, top-1 agreement). The table goes to
stdout and to ``benchmarks/results/finetune-blocks-<tag>.md`` with the command and the hardware.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.algorithms.finetune import CHAINS, LOSSES, finetune, finetune_blocks
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import calibration_set
from lowbit.data.assets import default_model_dir
from lowbit.eval.perplexity import Reference
from lowbit.io.gguf_presets import preset_plan

RESULTS = Path(__file__).parent / "results"


def parse_plan(model: torch.nn.Module, spec: str) -> str | dict[str, str]:
    """A format name as is, or ``SUFFIX=FORMAT,...,*=FORMAT`` -> {linear: format} (first matching suffix wins)."""
    if "=" not in spec:
        return spec
    rules = [tuple(part.split("=", 1)) for part in spec.split(",")]
    default = dict(rules).get("*")
    plan = {}
    for name in uniform_plan(model, "q4_0"):
        fmt = next((f for suffix, f in rules if suffix != "*" and name.endswith(suffix)), default)
        if fmt:
            plan[name] = fmt
    return plan


def run_variant(variant: str, quantized: torch.nn.Module, model: torch.nn.Module, samples: torch.Tensor,
                cfg: lowbit.FinetuneConfig, recipe: lowbit.Recipe, model_dir: Path,
                device: torch.device) -> tuple[torch.nn.Module, dict]:
    variant, _, epochs = variant.partition("@")
    if epochs:
        cfg = dataclasses.replace(cfg, epochs=float(epochs))
    if variant.split(":")[0] == "stream":  # stream[:tailT]
        tail = block_options(variant.split(":")[1:]).get("tail", cfg.tail_layers)
        return streamed_ft(recipe, dataclasses.replace(cfg, tail_layers=tail), model_dir, device)
    m = copy.deepcopy(quantized)
    if variant == "none":
        return m, {}
    teacher = copy.deepcopy(model)
    name, *opts = variant.split(":")
    if name == "model":
        rep = finetune(m, teacher, samples, lowbit.FinetuneConfig(**{**vars(cfg), "mode": "model"}), device, False)
    elif name == "blocks":
        block = lowbit.FinetuneConfig(**{**vars(cfg), "mode": "blocks", "block_layers": int(opts[0])})
        rep = finetune_blocks(m, teacher, samples, block, device, False, **block_options(opts[1:]))
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return m, {"steps": rep.steps, "tune_s": round(rep.seconds, 1),
               "last_block_loss": rep.block_losses[-1][1] if rep.block_losses else None}


def block_options(opts: list[str]) -> dict:
    """``finetune_blocks`` keywords from a ``blocks`` variant's options (the module docstring)."""
    kw: dict = {}
    for opt in opts:
        if opt in CHAINS:
            kw["chain"] = opt
        elif opt in LOSSES:
            kw["loss"] = opt
        elif opt == "nofinal":
            kw["final_norm"] = False
        elif opt.startswith("tail") and opt[4:].isdigit():
            kw["tail"] = int(opt[4:])
        else:
            raise SystemExit(f"unknown blocks option {opt!r}")
    return kw


def streamed_ft(recipe: lowbit.Recipe, cfg: lowbit.FinetuneConfig, model_dir: Path,
                device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The ``stream`` variant: the same recipe with +ft, streamed from ``model_dir``."""
    tuned = dataclasses.replace(recipe, finetune=dataclasses.replace(cfg, mode="blocks", block_layers=1))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = lowbit.convert_streamed(model_dir, tuned, Path(tmp) / "out", device=device, progress=False)
        seconds = time.perf_counter() - t0
        m, _ = lowbit.load(Path(tmp) / "out", device=device)
    ft = res.finetune
    return m, {"steps": ft.steps if ft else "-", "tune_s": round(seconds, 1),
               "last_block_loss": ft.block_losses[-1][1] if ft and ft.block_losses else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--format", default="q4_0")
    ap.add_argument("--preset", default=None, help="llama.cpp preset whose per-tensor types to use (over --format)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="none,model,blocks:1,blocks:2,blocks:4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024, help="eval window (tokens)")
    ap.add_argument("--eval-windows", type=int, default=16, help="0: the whole eval split")
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    model, tok = lowbit.load(a.model, device=device)
    calib = lowbit.CalibConfig(a.nsamples, a.seqlen)
    plan = preset_plan(model, a.preset, searched=True).plan if a.preset else parse_plan(model, a.format)
    recipe = lowbit.Recipe(plan, a.method, calib=calib)
    cfg = lowbit.FinetuneConfig(a.epochs, a.lr, a.batch)
    quantized = copy.deepcopy(model)
    t0 = time.perf_counter()
    lowbit.quantize(quantized, recipe, tok, device=device, progress=False)
    quant_s = time.perf_counter() - t0
    samples = calibration_set(model, tok, calib)  # the windows quantize drew
    reference = Reference(model, cache_bytes=4e9)
    hw = (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__})" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, torch "
          f"{torch.__version__}")
    windows = f"first {a.eval_windows} windows" if a.eval_windows else "all windows"
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"Hardware: {hw}. Recipe: `{recipe}` (quantized in {quant_s:.0f} s); tuning: {a.nsamples} x "
             f"{a.seqlen} calibration windows, {a.epochs:g} epoch(s), lr {a.lr:g}, batch {a.batch}; eval: "
             f"{windows} x {a.ctx} tokens of the eval split, KL to the float model.", "",
             "| variant | ppl | KL nats/token | top-1 % | steps | tune s | last block loss |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for variant in a.variants.split(","):
        m, info = run_variant(variant, quantized, model, samples, cfg, recipe, Path(a.model or default_model_dir()),
                              device)
        res = lowbit.evaluate(m, tok, seqlen=a.ctx, max_windows=a.eval_windows or None, reference=reference,
                              progress=False)
        loss = info.get("last_block_loss")
        row = (f"| {variant} | {res.ppl:.3f} | {res.kl:.4f} | {100 * res.top1:.1f} | {info.get('steps', '-')} | "
               f"{info.get('tune_s', '-')} | {'-' if loss is None else f'{loss:.4g}'} |")
        print(row, flush=True)
        lines.append(row)
    ref = lowbit.evaluate(model, tok, seqlen=a.ctx, max_windows=a.eval_windows or None, progress=False)
    lines += ["", f"Float model on the same windows: ppl {ref.ppl:.3f}."]
    print(lines[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"finetune-blocks-{a.tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
