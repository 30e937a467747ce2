"""Where do two GGUF files of the same model lose? Per-tensor proxy loss against calibration Hessians (CPU, minutes).

    python benchmarks/gguf_tensor_loss.py A.gguf B.gguf [...] [--nsamples 32 --seqlen 512]

Every decoder linear's input Hessian H = 2/N X^T X is collected once from the float model on the calibration
split; each file's tensors are read back (io/gguf_import.py) and scored by GPTQ's objective tr(dW H dW^T), the
output error the rounding causes on calibration inputs. Printed: the sum per linear kind (q/k/v/o/gate/up/down)
and per GGUF type, for each file. Files must share the float model's basis: a fused-rotation file is refused.
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch

import lowbit
from lowbit.algorithms.gptq import proxy_loss
from lowbit.calibration.capture import HessianAccumulator
from lowbit.calibration.samples import calibration_samples
from lowbit.io.gguf_import import load_gguf_weights
from lowbit.io.gguf_types import gguf_name, tensor_types
from lowbit.models.walker import decoder_linears, linear_weight


@torch.no_grad()
def hessians(model: torch.nn.Module, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    linears = decoder_linears(model)
    dev = next(model.parameters()).device
    accs = {n: HessianAccumulator(m, linear_weight(m).shape[1], dev) for n, m in linears.items()}
    try:
        for row in samples:
            model(row[None].to(dev))
    finally:
        hs = {n: a.remove() for n, a in accs.items()}
    return hs


def file_losses(model: torch.nn.Module, path: str, H: dict[str, torch.Tensor]) -> dict[str, tuple[str, float]]:
    """Linear name -> (GGUF type, tr(dW H dW^T)) for the file's tensors against ``model``'s."""
    types = tensor_types(path)
    ref, got = decoder_linears(model), decoder_linears(load_gguf_weights(copy.deepcopy(model), path))
    return {name: (types[gguf_name(model, f"{name}.weight")],
                   proxy_loss(linear_weight(ref[name]), linear_weight(got[name]), h)) for name, h in H.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--model", default=None, help="HF model dir or hub id (default: the bundled model)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = lowbit.load(args.model, device="cpu")  # float32 in eval mode, weights rounded to float16
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        H = {n: h.cpu() for n, h in hessians(model.to(dev), calibration_samples(tok, args.nsamples,
                                                                                 args.seqlen)).items()}
    model.cpu()
    lin = decoder_linears(model)
    energy = sum(proxy_loss(linear_weight(lin[n]), torch.zeros_like(linear_weight(lin[n])), h) for n, h in H.items())
    losses = {}
    for f in args.files:
        losses[f] = file_losses(model, f, H)
        rel = sum(v[1] for v in losses[f].values()) / energy  # near 1: the file is not in this model's basis
        if rel > 0.5:
            raise SystemExit(f"{f}: relative proxy loss {rel:.2f}: not this model's basis (a fused-rotation file?)")
    names = [f.rsplit("/", 1)[-1] for f in args.files]
    print("| linear | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    kinds = sorted({n.rsplit(".", 1)[-1] for n in H})
    for kind in [*kinds, "all"]:
        cells = []
        for f in args.files:
            rows = [v for n, v in losses[f].items() if kind == "all" or n.endswith("." + kind)]
            by_type = defaultdict(int)
            for t, _ in rows:
                by_type[t] += 1
            types = "/".join(f"{t}x{c}" for t, c in sorted(by_type.items()))
            total = f"{sum(r[1] for r in rows):.4g}"
            cells.append(f"{total} ({types})" if kind != "all" else total)
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
