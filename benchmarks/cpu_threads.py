"""CPU threads: PyTorch's OpenMP settings on a machine another process keeps busy, and lowbit's default.

    python benchmarks/cpu_threads.py [--threads 1,2] [--repeat 3] [--competitors none,torch,spin]

Each cell is a fresh process (OpenMP reads its settings once, when torch loads) timing three workloads at the
bundled model's shapes (SmolLM2-135M: hidden 576, MLP 1536, 30 layers, random weights, seed 0):
  forward: one 512-token forward pass of the whole model (large matrix products);
  gptq:    GPTQ of one stacked q/k/v problem (960 x 576, int4_g64_sym; a Python loop of small tensor operations);
  decode:  32 one-token steps with a KV cache (small matrix-vector products, many short parallel regions).
The competitor runs beside it for the whole cell: ``torch`` is another PyTorch process with 2 threads in a loop of
512 x 576 products (a second lowbit job, a test run), ``spin`` one busy Python process. Best of ``--repeat``
after one warm-up. Policy ``default`` leaves OMP_WAIT_POLICY unset (libgomp: idle threads spin before
sleeping); ``PASSIVE`` makes them sleep at once. The last rows run with exactly what ``lowbit`` (the CLI) sets:
:func:`lowbit.cpu.configure`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

WORKLOAD = r"""
import json, sys, time
repeat, lowbit_default = int(sys.argv[1]), sys.argv[2] == "1"
if lowbit_default:  # before torch is imported, as the CLI does
    from lowbit.cpu import configure
    configure(None)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.formats import get_format
from lowbit.serve.generate import cache_arg
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 512))
g = torch.Generator().manual_seed(0)
X = torch.randn(2048, 576, generator=g)
H, W = X.t() @ X / 1024, torch.randn(960, 576, generator=g) * 0.02

def decode():
    out = model(ids[:, :16], use_cache=True)
    past, tok = getattr(out, cache_arg(model)), ids[:, 16:17]
    for _ in range(32):
        out = model(tok, **{cache_arg(model): past}, use_cache=True)
        past = getattr(out, cache_arg(model))

work = {"forward": lambda: model(ids), "gptq": lambda: gptq_quantize(W, H, get_format("int4_g64_sym")),
        "decode": decode}
res = {"threads": torch.get_num_threads()}
with torch.no_grad():
    for name, fn in work.items():
        ts = []
        for _ in range(repeat + 1):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        res[name] = min(ts[1:])
print(json.dumps(res))
"""

COMPETITORS = {
    "none": None,
    "torch": "import torch\nx, w = torch.randn(512, 576), torch.randn(576, 576)\nwhile True: torch.relu(x @ w)",
    "spin": "while True: pass",
}


def cell(threads: int | None, policy: str, competitor: str, repeat: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if threads is not None:  # None: lowbit's default, set inside the child by lowbit.cpu.configure
        env["OMP_NUM_THREADS"] = str(threads)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
    busy = None
    if COMPETITORS[competitor]:
        busy = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]],
                                env={**env, "OMP_NUM_THREADS": "2"}, stdout=subprocess.DEVNULL)
        time.sleep(2)  # let it start its loop
    try:
        out = subprocess.run([sys.executable, "-c", WORKLOAD, str(repeat), "1" if threads is None else "0"],
                             env=env, capture_output=True, text=True, timeout=1800)
    finally:
        if busy:
            busy.kill()
            busy.wait()
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default 1..available CPUs)")
    ap.add_argument("--policies", default="default,PASSIVE")
    ap.add_argument("--competitors", default="none,torch,spin")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from lowbit.cpu import available_cpus

    cpus = available_cpus()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, cpus + 1))
    print(f"`python benchmarks/cpu_threads.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {cpus} available to this process; "
          f"seconds, best of {args.repeat}")
    print()
    print("| competitor | threads | OMP_WAIT_POLICY | forward 512 tok | gptq 960x576 | decode 32 tok |")
    print("|---|---|---|---|---|---|")
    for comp in args.competitors.split(","):
        runs = [(t, p) for t in threads for p in args.policies.split(",")] + [(None, "lowbit default")]
        for t, p in runs:
            r = cell(t, p, comp, args.repeat)
            label = f"{r['threads']} (lowbit)" if t is None else str(t)
            print(f"| {comp} | {label} | {'PASSIVE' if t is None else p} | {r['forward']:.2f} | {r['gptq']:.3f} "
                  f"| {r['decode']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
