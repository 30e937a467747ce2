"""First calls of the CUDA GEMV with an empty kernel cache and with a warm one (needs CUDA).

    python benchmarks/jit_cache.py --formats nz2_ch,e8p_ch,q4_0,q4_k,iq2_xxs --batch 1,8

Each side is a process of its own with the same fresh ``$LOWBIT_HOME``: the first compiles every kernel variant the
calls need with NVRTC and leaves the machine code in ``$LOWBIT_HOME/cuda``, the second reads it back. Printed: the
seconds each process spent in its first call of every (format, batch) and the number of kernels it built, cold and
warm; weights are packed before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def first_calls(formats: list[str], batches: list[int]) -> dict:
    """Seconds of the first dequant_matmul of each (format, batch) at 4096x4096, in this process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemv_speed import packed_weight
    from lowbit.formats import get_format
    from lowbit.kernels import cuda_jit
    from lowbit.kernels.dispatch import dequant_matmul

    g = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: packed_weight(name, (4096, 4096), g) for name in formats}
    torch.cuda.synchronize()
    seconds = 0.0
    for name in formats:
        for m in batches:
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16, generator=g)
            start = time.perf_counter()
            dequant_matmul(x, get_format(name), weights[name])
            torch.cuda.synchronize()
            seconds += time.perf_counter() - start
    return {"seconds": seconds, "kernels": len(cuda_jit._KERNELS)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="nz2_ch,e8p_ch,q4_0,q4_k,iq2_xxs")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print its JSON
    args = ap.parse_args(argv)
    formats, batches = args.formats.split(","), [int(b) for b in args.batch.split(",")]
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.side:
        print(json.dumps(first_calls(formats, batches)))
        return 0
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LOWBIT_HOME": home, "LOWBIT_CUDA_CACHE": "1"}
        sides = {}
        for side in ("cold", "warm"):
            done = subprocess.run([sys.executable, __file__, "--side", side, "--formats", args.formats, "--batch",
                                   args.batch], capture_output=True, text=True, env=env, check=True)
            sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    for side, r in sides.items():
        print(f"{side}: {r['seconds']:.2f} s in the first calls, {r['kernels']} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
