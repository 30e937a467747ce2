"""Host time of one eager QuantLinear call on the CUDA GEMV's path, on any machine (no GPU needed).

    PYTHONPATH=src python benchmarks/linear_host_time.py                 # the formats below, batch 1
    PYTHONPATH=src python benchmarks/linear_host_time.py --formats q4_0 --rows 8

Where a step is not a CUDA graph (transformers' own ``generate``, ``lowbit generate --no-fast``, a prompt's first
token), each QuantLinear's Python and launch work runs on the host per token, and a 7B model has 224 of them. This
times that work: a CPU input takes the route a CUDA one takes (``dispatch.cuda_gemv_plan`` told to plan it), the
kernel is the g++ build ``cuda_host`` runs for the CPU tests, and its launch is replaced by nothing, so what is
timed is everything around the kernel: routing, plan, launch sizes, the kernel's lookup, its arguments. The best of
seven runs of 2000 calls each, in µs of the thread's CPU time per call (others' work on the machine left out),
beside an ``nn.Linear(64, 64)`` call on the same machine (a plain linear's dispatch with next to no arithmetic).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
from torch import nn

from lowbit.formats import get_format
from lowbit.kernels import cuda_gemv, cuda_host, dispatch
from lowbit.models.quant_linear import QuantLinear

FORMATS = "q4_0,nz2_ch,e8p_ch,iq2_xxs,q4_k,int3_g128_sym"


def per_call_us(fn, calls: int, runs: int = 7) -> float:  # noqa: ANN001
    for _ in range(min(calls, 200)):
        fn()
    best = float("inf")
    for _ in range(runs):
        t = time.thread_time()  # this thread's CPU time: what others running on the machine leave out
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t) / calls)
    return 1e6 * best


def quant_linear(name: str, features: int) -> QuantLinear:
    return QuantLinear.from_quantized(get_format(name).quantize(torch.randn(features, features) * 0.02))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (a decode batch)")
    ap.add_argument("--features", type=int, default=512, help="in and out features of each linear")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed run (seven runs, the best kept)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.zeros(args.rows, 1, args.features, dtype=torch.float16)
    layers = {name: quant_linear(name, args.features) for name in args.formats.split(",")}
    plain, xp = nn.Linear(64, 64), torch.zeros(args.rows, 1, 64)
    # a CPU input takes the CUDA GEMV's route, on its g++ build
    route = mock.patch.object(dispatch, "cuda_gemv_plan", lambda x, fmt, shape: cuda_gemv.plan(fmt, shape))
    with route, torch.inference_mode():
        for q in layers.values():
            q(x)  # builds the g++ kernel and runs it once
        with mock.patch.object(cuda_host.HostKernel, "__call__", lambda self, *args, **kwargs: None):  # no launch
            us = {"nn.Linear(64, 64)": per_call_us(lambda: plain(xp), args.calls)}
            print(f"nn.Linear(64, 64): {us['nn.Linear(64, 64)']:.1f} us per call")
            for name, q in layers.items():
                us[name] = per_call_us(lambda q=q: q(x), args.calls)
                print(f"{name}: {us[name]:.1f} us per call, {us[name] / us['nn.Linear(64, 64)']:.2f}x nn.Linear's")
    return us


if __name__ == "__main__":
    main()
