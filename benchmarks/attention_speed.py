"""Speed of the one-kernel decode attention step (rotary + cache write + attention) at several context lengths.

    PYTHONPATH=src python benchmarks/attention_speed.py                          # 7B shape, cache of 144
    PYTHONPATH=src python benchmarks/attention_speed.py --configs 3,64,4 1,256,16 --lengths 16,80,143

Each layer of a Llama-2-7B-shaped model (32 heads of 128, ``--layers`` caches of ``--cache`` positions, together
larger than the H200's L2 so that the keys come from DRAM as in a decode step) gets one
:func:`lowbit.kernels.triton_decode_attention.rope_cache_attention` call; the ``--layers`` calls are captured in one
CUDA graph and replayed. A config is ``splits,block,warps`` (programs per head, keys per program step, warps per
program) of the Triton kernel, ``default`` what it chooses, or ``cuda`` / ``cuda-pdl`` (``,splits,keys_per_warp``
optional) the CUDA kernel of :mod:`lowbit.kernels.cuda_attention`, plain or as programmatic dependent launches.
Prints µs per call by length and writes benchmarks/results/attention-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from lowbit.kernels import cuda_attention
from lowbit.kernels.triton_decode_attention import rope_cache_attention, rope_cache_attention_reference


def parse_config(text: str) -> dict[str, int | str] | None:
    if text == "default":
        return None
    if text.startswith("cuda"):  # cuda[-pdl][,splits[,keys per warp]]: lowbit.kernels.cuda_attention
        name, *rest = text.split(",")
        return {"kernel": name, **dict(zip(("splits", "keys_per_warp"), (int(v) for v in rest), strict=False))}
    splits, block, warps = (int(v) for v in text.split(","))
    return {"splits": splits, "block": block, "warps": warps}


def time_config(config: dict[str, int | str] | None, lengths: list[int], args: argparse.Namespace
                ) -> tuple[dict[int, float], float]:
    """µs per call for each length (one graph of ``args.layers`` calls, the median of ``args.repeats`` timings
    of ``args.replays`` replays) and the largest relative error of the last layer's output after them, against
    the reference."""
    dev, heads, dim = torch.device("cuda"), args.heads, args.dim
    g = torch.Generator(dev).manual_seed(0)
    caches = [torch.randn(2, 1, heads, args.cache, dim, generator=g, device=dev, dtype=torch.float16)
              for _ in range(args.layers)]
    qkv = torch.randn(1, 1, 3 * heads * dim, generator=g, device=dev, dtype=torch.float16)
    cos, sin = torch.randn(2, 1, 1, dim, generator=g, device=dev, dtype=torch.float16)
    length = torch.tensor(lengths[0], device=dev)
    kwargs = dict(config or {})
    kernel = kwargs.pop("kernel", "triton")

    def step() -> list[torch.Tensor]:
        if kernel != "triton":
            return [cuda_attention.rope_cache_attention(qkv, cos, sin, kv[0], kv[1], length, dim ** -0.5, heads,
                                                        early=kernel == "cuda-pdl", **kwargs) for kv in caches]
        return [rope_cache_attention(qkv, cos, sin, kv[0], kv[1], length, None, dim ** -0.5, heads, **kwargs)
                for kv in caches]

    step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    out, worst = {}, 0.0
    for n in lengths:
        length.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.replays):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000 / (args.replays * args.layers))
        out[n] = statistics.median(times)
        want = rope_cache_attention_reference(qkv, cos, sin, *caches[-1].clone(), length, None, dim ** -0.5, heads)
        worst = max(worst, float((outs[-1].double() - want.double()).norm() / want.double().norm()))
    return out, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["default", "1,256,8", "1,256,16", "2,128,8", "3,64,4"])
    ap.add_argument("--lengths", default="16,48,80,112,143")
    ap.add_argument("--cache", type=int, default=144, help="positions per cache (TG-128 after a 16-token prompt)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="local")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    rows = []
    print("| config | " + " | ".join(f"length {n}" for n in lengths) + " | mean | error |")
    print("|---" * (len(lengths) + 3) + "|")
    for text in args.configs:
        us, err = time_config(parse_config(text), lengths, args)
        mean = statistics.mean(us.values())
        rows.append({"config": text, "us": us, "mean_us": mean, "max_rel_err": err})
        print(f"| {text} | " + " | ".join(f"{us[n]:.2f}" for n in lengths) + f" | {mean:.2f} | {err:.1e} |",
              flush=True)
    out = Path(args.out or f"benchmarks/results/attention-{args.tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(), "cache": args.cache,
            "heads": args.heads, "dim": args.dim, "layers": args.layers,
            "env": {k: v for k, v in os.environ.items() if k.startswith("LOWBIT_")}}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
