"""Where does a quantized file gain or lose log-likelihood? Per-token NLL change against the float model, bucketed
by how well the float model predicted the token (CPU, a minute per file).

    python benchmarks/nll_buckets.py A.gguf B.gguf [...] --text factbook [--windows 16 --ctx 512]

Perplexity and KL divergence can disagree: a file far from the float model's distribution can still score the
true tokens better, if the float model is confidently wrong on them and the file's noise flattens its predictions.
This splits the mean NLL change (nats per token) by the float model's own NLL of the true token, next to each
bucket's share of the tokens, its contribution to the total and the mean KL divergence there. It also prints the
best single softmax temperature for each file (does a uniform flattening explain the gap?).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import lowbit
from lowbit.data.corpus import load_text
from lowbit.eval.perplexity import tokenize_stream
from lowbit.io.gguf_import import load_gguf_weights

EDGES = (0.0, 0.05, 0.3, 1.0, 2.0, 3.0, 5.0, float("inf"))
TEMPERATURES = (0.9, 1.0, 1.05, 1.1, 1.2)


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """[windows * (ctx - 1), vocab] next-token log-probabilities, one window at a time."""
    return torch.cat([F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), -1)
                      for w in windows])


def bucket_table(ref_nll: torch.Tensor, nll: torch.Tensor, kl: torch.Tensor) -> list[str]:
    lines = ["| float NLL | share | dNLL | contribution | KL |", "|---|---|---|---|---|"]
    for lo, hi in zip(EDGES, EDGES[1:], strict=False):
        m = (ref_nll >= lo) & (ref_nll < hi)
        d = nll - ref_nll
        lines.append(f"| [{lo:g}, {hi:g}) | {m.float().mean():.3f} | {d[m].mean():+.4f} | {(d * m).mean():+.4f} "
                     f"| {kl[m].mean():.4f} |")
    lines.append(f"| all | 1 | {(nll - ref_nll).mean():+.4f} | | {kl.mean():.4f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="GGUF files of the model (lowbit's or llama.cpp's)")
    ap.add_argument("--model", default=None, help="the float model (default: the bundled one)")
    ap.add_argument("--text", default="factbook", help="eval, factbook, or a text file")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args(argv)

    model, tok = lowbit.load(args.model, device="cpu")
    model.float().eval()
    ids = tokenize_stream(tok, load_text(args.text))[: args.windows * args.ctx].reshape(-1, args.ctx)
    targets = ids[:, 1:].reshape(-1, 1)
    ref = token_logprobs(model, ids)
    ref_nll = -ref.gather(1, targets)[:, 0]
    print(f"float model: ppl {ref_nll.mean().exp():.3f} on {targets.numel()} tokens of {args.text}")
    for path in args.files:
        logits_lp = token_logprobs(load_gguf_weights(copy.deepcopy(model), path), ids)
        nll = -logits_lp.gather(1, targets)[:, 0]
        kl = (ref.exp() * (ref - logits_lp)).sum(-1)
        best = min(TEMPERATURES, key=lambda t: float(-F.log_softmax(logits_lp / t, -1).gather(1, targets).mean()))
        best_nll = -F.log_softmax(logits_lp / best, -1).gather(1, targets).mean()
        print(f"\n{path}: ppl {nll.mean().exp():.3f}, KL {kl.mean():.4f}; best temperature {best:g} "
              f"(ppl {best_nll.exp():.3f})")
        print("\n".join(bucket_table(ref_nll, nll, kl)))


if __name__ == "__main__":
    main()
