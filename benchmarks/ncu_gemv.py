"""Two GEMVs per format (batch 1 unless --batch) through the CUDA kernel, for Nsight Compute (needs CUDA).

    ncu --kernel-name gemv_mma --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section InstructionStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        python benchmarks/ncu_gemv.py --formats nz2_ch,e8p_ch,iq2_xxs,q4_0 --shape 14336x4096

docs/kernels.md reads the instructions per weight, the issue rate and the pipes' throughput from that output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv_speed import packed_weight  # noqa: E402
from lowbit.formats import get_format  # noqa: E402
from lowbit.kernels import cuda_gemv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="nz2_ch,e8p_ch,iq2_xxs,q4_0")
    ap.add_argument("--shape", default="14336x4096", help="out x in")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="activation rows (1-8)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    shape = tuple(int(v) for v in args.shape.split("x"))
    for name in args.formats.split(","):
        fmt = get_format(name)
        p = cuda_gemv.plan(fmt, shape)
        if p is None:
            print(f"{name} at {shape} is not served by the CUDA GEMV", file=sys.stderr)
            continue
        qt = packed_weight(name, shape, torch.Generator(device="cuda").manual_seed(0))
        x = torch.randn(args.batch, shape[1], device="cuda", dtype=torch.float16)
        for _ in range(args.calls):
            cuda_gemv.gemv(x, fmt, qt, p)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
