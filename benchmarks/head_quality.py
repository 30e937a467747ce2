"""What rounding the LM head costs: one recipe for the decoder, the head 16-bit or in each ``--heads`` format
(``Recipe.head``, ``lowbit quantize --head``), scored against the 16-bit model (CPU, a minute per row).

    python benchmarks/head_quality.py --recipe q4_0 --heads fp16,q6_k,q4_k,q4_0 --windows 8

Prints a markdown table: the head's format as written (a k-quant falls back as llama.cpp's does where its
superblocks do not divide the rows), the model's size, perplexity, KL divergence and top-1 agreement to the
16-bit model on the bundled eval split. Speed: ``benchmarks/decode.py --head FORMAT`` (GPU).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import lowbit
from lowbit.recipe import Recipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or cached hub id (default: the bundled model)")
    ap.add_argument("--recipe", default="q4_0", help="the decoder's recipe, e.g. q4_0 or gptq_act:q4_k")
    ap.add_argument("--heads", default="fp16,q6_k,q4_k,q4_0", help="comma-separated: fp16 and/or head formats")
    ap.add_argument("--windows", type=int, default=8, help="eval windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args(argv)
    reference, tok = lowbit.load(args.model, device="cpu")
    print("| head | written as | total MB | ppl | KL to 16-bit | top-1 |\n|---|---|---|---|---|---|")
    for head in (h.strip() for h in args.heads.split(",")):
        model, _ = lowbit.load(args.model, device="cpu")
        recipe = Recipe.parse(args.recipe if ":" in args.recipe else f"rtn:{args.recipe}")
        recipe = replace(recipe, head=None if head == "fp16" else head)
        result = lowbit.quantize(model, recipe, tok, progress=False)
        e = lowbit.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, reference=reference,
                            progress=False)
        written = result.extra.get("lm_head", {}).get("format", "fp16")
        print(f"| {head} | {written} | {result.size.total_mb:.1f} | {e.ppl:.2f} | {e.kl:.4f} | {100 * e.top1:.1f}% |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
