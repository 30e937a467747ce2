"""Programmatic dependent launch (PDL) in the compiled decode step: which kernels take part, what it gains, and
whether the logits stay those of plain launches. Hopper or later.

    PYTHONPATH=src python benchmarks/decode_pdl.py --formats nz2_ch,fp16,q4_0 --tag h200

The model is decode.py's random Llama-2-7B shape (fp16, batch 1). Per format, four compiled ``StaticDecoder`` steps:

* ``plain``: every kernel launched plainly (``pdl=False``);
* ``inductor_only``: Inductor's kernels compiled and launched with PDL, lowbit's GEMVs plainly;
* ``gemv_no_early_release``: lowbit's GEMVs launched with PDL too (each starts while the kernel before it finishes
  and waits for it only before reading the activations), but the kernel after a GEMV starts only as it exits;
* ``gemv_early_release``: what ``pdl=True`` runs, the GEMV also releasing the kernel after it once its weights are
  read.

For each: the logits of the prefill and 64 greedy steps against ``plain`` (bit-equal, max abs difference; a kernel
reading inputs before they were written would read the previous step's values, the graph replaying into the same
buffers) and against ``inductor_only`` (same Inductor kernels: a difference there can only come from lowbit's
launches), then TG-128 tokens/s (decode.py's timing: median of 3 after a warm-up run). Writes
benchmarks/results/pdl-<tag>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode  # noqa: E402
import lowbit.serve.fast_decode as fast_decode  # noqa: E402
from lowbit.kernels import cuda_gemv  # noqa: E402

VARIANTS = ("plain", "inductor_only", "gemv_no_early_release", "gemv_early_release")
_SOURCE, _EARLY = cuda_gemv._source, fast_decode.early_launch


def use_variant(name: str) -> bool:
    """Switch lowbit's launches to ``name``; returns the decoder's ``pdl``."""
    fast_decode.early_launch, cuda_gemv._source = _EARLY, _SOURCE
    if name == "inductor_only":
        fast_decode.early_launch = lambda on=True: contextlib.nullcontext()
    elif name == "gemv_no_early_release":
        cuda_gemv._source = lambda *a, **k: "#define NO_EARLY_RELEASE 1\n" + _SOURCE(*a, **k)
    return name != "plain"


def run(model: torch.nn.Module, prompt: torch.Tensor, name: str, steps: int, gen: int) -> tuple[torch.Tensor, float]:
    pdl = use_variant(name)
    torch._dynamo.reset()
    dec = fast_decode.StaticDecoder(model, max_cache_len=prompt.numel() + max(steps, gen) + 1, compile=True, pdl=pdl)
    dec.reset()
    logits = [dec.prefill(prompt).clone()] + [dec.step().clone() for _ in range(steps)]
    tok_s = decode.time_decode(dec, prompt, gen, repeats=3)["tok_s"]
    use_variant("plain")
    return torch.stack(logits), tok_s


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"bit_equal": torch.equal(a, b), "max_abs_diff": float((a.float() - b.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="nz2_ch,fp16,q4_0", help="fp16 and/or lowbit formats (+rht: rotated)")
    ap.add_argument("--steps", type=int, default=64, help="greedy steps whose logits are compared")
    ap.add_argument("--gen", type=int, default=128, help="timed steps (TG-128)")
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs a CUDA GPU of compute capability 9.0 or more (programmatic dependent launch)", file=sys.stderr)
        return 2
    shape = decode.build_parser().parse_args(["--gen", str(args.gen)])  # decode.py's 7B shape and prompt length
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = decode.build_model(shape, dev, torch.float16)
    prompt = torch.randint(0, shape.vocab, (shape.prompt,), generator=torch.Generator().manual_seed(1)).to(dev)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"pdl-{args.tag}.json"
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "command": " ".join(["python", *sys.argv]), "steps": args.steps, "gen": args.gen}
    rows = []
    for fmt in args.formats.split(","):
        originals = None if fmt == "fp16" else decode.quantize_model(model, fmt, "random")
        names = VARIANTS[:2] if fmt == "fp16" else VARIANTS  # fp16 runs no lowbit GEMV
        runs = {name: run(model, prompt, name, args.steps, args.gen) for name in names}
        for name, (logits, tok_s) in runs.items():
            rows.append({"format": fmt, "variant": name, "tok_s": tok_s,
                         "vs_plain": compare(logits, runs["plain"][0]),
                         "vs_inductor_only": compare(logits, runs["inductor_only"][0])})
            print(json.dumps(rows[-1]), flush=True)
        if originals is not None:
            decode.restore_model(model, originals)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
