"""Which part of llama.cpp's Q4_0 rounding with an importance matrix moves perplexity: a CPU ablation on the
bundled model, every decoder linear at Q4_0, embeddings and head left in float (so only the rounding differs).

    python benchmarks/q4_0_fit_ablation.py                  # 2 cores: ~5 minutes
    python benchmarks/q4_0_fit_ablation.py --windows 4      # a quick look

The importance of a linear's input columns is the mean square of its float inputs over --nsamples x --seqlen SOTU
calibration tokens (what ``llama-imatrix`` collects; lowbit's diag(H) up to a constant). Variants (``float``: none
rounded, the scoring's baseline):

* ``ref``: ggml's ``quantize_row_q4_0_ref``: d = the block's signed absolute max / -8, nearest codes (no importance).
* ``lowbit``: the shrunken-range search (``int4_g32_sym_mse``: ranges searched against the importance-weighted
  error, nearest codes at the stored scale), lowbit's Q4_0 fit before ``int4_g32_sym_ls``, as ``--method imatrix``
  rounded with it.
* ``llama``: ggml's ``quantize_row_q4_0_impl`` with the importance: each weight weighted by ``imp * sqrt(sigma^2 +
  w^2)``, ``make_qx_quants`` trying 19 scales between -(8 - 0.9) / max and -(8 + 0.9) / max and keeping the codes
  whose least-squares scale explains most of the block; that least-squares scale is stored.
* ``llama-nols``: the same codes with the scale they were rounded at (1 / iscale) instead of the least-squares one.
* ``lowbit+ls``: lowbit's codes with the (weighted) least-squares scale of each block.

A least-squares scale is a projection of the block onto its codes, so it never lengthens the block; ``norm`` is the
quantized linears' summed squared norm over the float one's. Scored as ``finetune_ood.py`` scores (SOTU eval split
and the Factbook, windows of --ctx tokens, KL to the float model). Writes benchmarks/results/q4_0-fit-<tag>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.algorithms.sequential import calibration_set
from lowbit.eval.perplexity import Reference
from lowbit.formats import get_format
from lowbit.formats.uniform import least_squares_scale, make_qx_quants

RESULTS = Path(__file__).parent / "results"
NMAX = 8  # Q4_0 codes -8..7
VARIANTS = ("float", "ref", "lowbit", "llama", "llama-nols", "lowbit+ls")


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@torch.inference_mode()
def input_importance(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean square of each linear's input columns over the calibration windows (float model)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):  # noqa: ANN202
        def run(_mod: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return run

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears(model).items()]
    for i in range(0, windows.shape[0], 8):
        model(input_ids=windows[i : i + 8], use_cache=False)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _blocks(w: torch.Tensor) -> torch.Tensor:
    return w.float().reshape(-1, 32)


def _fp16(d: torch.Tensor) -> torch.Tensor:
    return d.half().float()


def llama_weights(w: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_impl's per-weight weights: imp * sqrt(sigma^2 + w^2), sigma^2 the row's mean square."""
    sigma2 = w.float().pow(2).mean(1, keepdim=True)
    return (imp[None, :] * torch.sqrt(sigma2 + w.float().pow(2))).reshape(-1, 32)


def quantized(variant: str, w: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    if variant == "float":
        return w.float()
    if variant == "ref":  # lowbit's plain q4_0 is ggml's reference rounding
        fmt = get_format("q4_0")
        return fmt.dequantize(fmt.quantize(w))
    if variant in ("lowbit", "lowbit+ls"):
        fmt = get_format("int4_g32_sym_mse")
        qt = fmt.quantize(w, importance=imp)
        if variant == "lowbit":
            return fmt.dequantize(qt)
        codes, _ = fmt.unpack(qt)
        lv = (codes - fmt.offset).float().reshape(-1, 32)
        x = _blocks(w)
        return (_fp16(least_squares_scale(x, lv, llama_weights(w, imp))[0]) * lv).reshape(w.shape)
    lv, ls, plain = make_qx_quants(_blocks(w), llama_weights(w, imp), NMAX)
    return ((_fp16(ls) if variant == "llama" else _fp16(plain)) * lv).reshape(w.shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    torch.manual_seed(0)
    model, tok = lowbit.load(device="cpu")
    model.float()
    windows = calibration_set(model, tok, lowbit.CalibConfig(args.nsamples, args.seqlen, None, 0))
    t0 = time.perf_counter()
    imps = input_importance(model, windows)
    reference = Reference(copy.deepcopy(model), cache_bytes=6e9)
    meta = {"command": "python benchmarks/q4_0_fit_ablation.py " + " ".join(argv or []),
            "importance_s": round(time.perf_counter() - t0, 1), "windows": args.windows, "ctx": args.ctx}
    rows = []
    for variant in variants:
        q = copy.deepcopy(model)
        num = den = 0.0
        with torch.no_grad():
            for name, lin in linears(q).items():
                w = lin.weight.data
                deq = quantized(variant, w, imps[name])
                num, den = num + deq.pow(2).sum().item(), den + w.float().pow(2).sum().item()
                lin.weight.data = deq.to(w.dtype)
        row: dict = {"variant": variant, "norm": num / den}
        for text in ("eval", "factbook"):
            r = lowbit.evaluate(q, tok, text_file=None if text == "eval" else text, seqlen=args.ctx,
                                max_windows=args.windows, reference=reference, progress=False)
            suffix = "" if text == "eval" else "@factbook"
            row |= {f"ppl{suffix}": r.ppl, f"kl{suffix}": r.kl, f"top1{suffix}": r.top1}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (RESULTS / f"q4_0-fit-{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
