"""The dynamic-cache loop (``lowbit generate --no-fast``) on a GPU, with and without its weight cache: speed, memory.

    PYTHONPATH=src python benchmarks/generate_path.py                             # 7B shape on CUDA, ~3-5 min
    PYTHONPATH=src python benchmarks/generate_path.py --layers 4 --formats fp16,q4_0   # quick look
    PYTHONPATH=src python benchmarks/generate_path.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --vocab 1000 --prompt 8 --gen 8 --formats fp16,q4_0 --out /tmp/generate-cpu.json   # smoke test

``lowbit generate --no-fast`` (before, its default on a GPU) and ``lowbit serve`` without ``--fast`` run
transformers' forward with a dynamic KV cache, token by token (:class:`lowbit.serve.generate.TextStream`). Each
quantized linear then either reads a dequantized copy of its weight kept between tokens (the weight cache:
``use_weight_cache``) or multiplies from its packed bytes (the packed GEMV kernels for a token, a dequantize and
one matmul for the prompt). This times both, per format, on the
random Llama-2-7B-shaped model of ``benchmarks/decode.py`` (same model, same random packed weights): the prompt
(time to first token), the decode tokens/s after it, the GPU memory allocated while generating and its peak, and
whether the two ways give the same greedy tokens. fp16 is the baseline (no quantized linears, nothing to cache).
Prints a markdown table and writes benchmarks/results/generate-path-<tag>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from decode import build_model, default_tag, log, quantize_model, restore_model, sync  # noqa: E402
from lowbit.serve.generate import SamplingParams, TextStream, use_weight_cache  # noqa: E402

FORMATS = "fp16,q4_0,Q4_K_M,int2_g64_sym,nz2_ch,e8p_ch+rht,iq2_xxs"


class IdTokenizer:
    """Just enough tokenizer for TextStream: token ids printed as text, no EOS (every run makes ``--gen`` tokens)."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def run_stream(model: nn.Module, prompt: list[int], gen: int) -> dict:
    """One greedy generation through TextStream: prompt time, decode tokens/s, tokens, memory."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stream = TextStream(model, IdTokenizer(), prompt, SamplingParams(temperature=0, max_new_tokens=gen))
    stream.text()
    sync(dev)
    row = {"first_token_ms": 1e3 * (stream.t_first - stream.t_start),
           "decode_tok_s": (stream.completion_tokens - 1) / (stream.t_end - stream.t_first),
           "tokens": list(stream.token_ids)}
    if dev.type == "cuda":
        row |= {"gpu_mb": torch.cuda.memory_allocated(dev) / 1e6, "peak_mb": torch.cuda.max_memory_allocated(dev) / 1e6}
    return row


def time_path(model: nn.Module, prompt: list[int], gen: int, repeats: int, cache: bool) -> dict:
    cache_mb = use_weight_cache(model, cache) / 1e6
    run_stream(model, prompt, min(gen, 4))  # warm-up: kernel compiles, the cache's first dequantize
    runs = [run_stream(model, prompt, gen) for _ in range(repeats)]
    best = max(runs, key=lambda r: r["decode_tok_s"])
    return best | {"weight_cache_mb": cache_mb, "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
                   "first_token_ms": min(r["first_token_ms"] for r in runs)}


def run_variant(model: nn.Module, variant: str, args: argparse.Namespace, prompt: list[int]) -> dict:
    originals = quantize_model(model, variant, "random") if variant != "fp16" else None
    try:
        row: dict = {"variant": variant}
        paths = ("packed",) if originals is None else ("cache", "packed")
        for path in paths:
            r = time_path(model, prompt, args.gen, args.repeats, cache=path == "cache")
            row[path] = r
            log(f"{variant} {path}: first token {r['first_token_ms']:.1f} ms, {r['decode_tok_s']:.1f} tok/s, "
                f"{r.get('gpu_mb', 0):.0f} MB allocated, peak {r.get('peak_mb', 0):.0f} MB")
        if len(paths) == 2:
            row["same_tokens"] = row["cache"]["tokens"] == row["packed"]["tokens"]
        return row
    finally:
        use_weight_cache(model, False)
        if originals is not None:
            restore_model(model, originals)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | path | first token ms | decode tok/s | GPU MB | peak MB | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for path in ("cache", "packed"):
            if path in row:
                r = row[path]
                same = {True: "yes", False: "no"}.get(row.get("same_tokens"), "-")
                mb, peak = r.get("gpu_mb", float("nan")), r.get("peak_mb", float("nan"))
                lines.append(f"| {row['variant']} | {path if row['variant'] != 'fp16' else '-'} | "
                             f"{r['first_token_ms']:.1f} | {r['decode_tok_s']:.1f} | {mb:.0f} | {peak:.0f} | {same} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=FORMATS, help=f"comma-separated variants as decode.py names them ({FORMATS})")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="generated tokens per run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path (the fastest is kept)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-path-<tag>.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu (with a tiny model) for a smoke test", file=sys.stderr)
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"device {dev_name}; torch {torch.__version__}")
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"generate-path-{args.tag or default_tag(device)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev_name, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "tag")}}
    rows: list[dict] = []
    for v in filter(None, (s.strip() for s in args.formats.split(","))):
        rows.append(run_variant(model, v, args, prompt))
        out.write_text(json.dumps({"meta": meta, "rows": rows, "table": markdown(rows)}, indent=2))  # after each
    print(markdown(rows), flush=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
