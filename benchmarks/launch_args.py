"""Host time to build a CUDA launch's arguments: a ctypes object per argument against one packed buffer.

    PYTHONPATH=src python benchmarks/launch_args.py          # any machine; no GPU needed

The arguments are a decode GEMV's (``cuda_gemv.gemv``: eight tensors, five ints, a float). Prints µs per launch
for ``cuda_jit._ctypes_params`` (launches before ``cuda_jit.PackedArgs``, still taken with ``packed_args`` put back in
``verified.GPU_UNVERIFIED``) and for ``PackedArgs.pack``, and their ratio.
"""

from __future__ import annotations

import ctypes
import time

import torch

from lowbit.kernels import cuda_jit


def per_call_us(fn, args: list, n: int = 20000) -> float:  # noqa: ANN001
    for _ in range(100):
        fn(args)
    t = time.perf_counter()
    for _ in range(n):
        fn(args)
    return 1e6 * (time.perf_counter() - t) / n


def main() -> None:
    t = [torch.empty(4) for _ in range(8)]
    args = [*t[:6], 4096, 4096, 1, 32, t[6], t[7], ctypes.c_float(1e-5), 256]
    packed = cuda_jit.PackedArgs(tuple(map(type, args)))
    old = per_call_us(cuda_jit._ctypes_params, args)
    new = per_call_us(packed.pack, args)
    print(f"ctypes object per argument: {old:.1f} us; packed buffer: {new:.1f} us; {old / new:.1f}x less host time")


if __name__ == "__main__":
    main()
