"""What every Triton kernel wrapper here shares: interpreter mode, launch options, autotuning setup, GEMV input
checks. Importable without Triton (the modules that run without it read the launch options)."""

from __future__ import annotations

import os
from collections.abc import Callable

# read once: under the interpreter (CPU tests) kernels run one fixed config instead of autotuning
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_M = 8  # rows the GEMV kernels take; larger batches go to a tiled kernel or the reference
# launch options of a kernel whose float32 results must be the torch reference's bit for bit (the dequantize
# kernels): no a * b + c contracted into one FMA, which rounds once where torch's separate ops round twice
EXACT = {"enable_fp_fusion": False}
# launch options of every other kernel: a * b + c contracted into one FMA, as each kernel was measured. Stated at every
# launch rather than left to Triton's default, which Triton 3.10 turns off (3.9 warns once a launch leaves it unset);
# tests/test_kernels.py checks that every launch in lowbit names EXACT or FUSED.
FUSED = {"enable_fp_fusion": True}


def bench(warmup: int, rep: int, median: bool = False) -> Callable:
    """An autotuner timing function with the given warm-up / repetition budget (ms)."""
    extra = {"return_mode": "median"} if median else {}

    def run(fn, quantiles=None):  # noqa: ANN001 - triton's do_bench hook
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles, **extra)
    return run


def autotune(kernel, configs: list, key: list[str], do_bench: Callable, **kwargs):  # noqa: ANN001, ANN201
    """triton.autotune with a custom timing function where the installed Triton accepts one."""
    import triton

    try:
        return triton.autotune(configs, key=key, do_bench=do_bench, **kwargs)(kernel)
    except TypeError:  # older triton without do_bench=
        return triton.autotune(configs, key=key, **kwargs)(kernel)


def check_input(K: int, n_cols: int) -> None:
    if K != n_cols:
        raise ValueError(f"input has {K} features, weight has {n_cols}")


def gemv_rows(x_shape: tuple[int, int], n_cols: int) -> tuple[int, int, int]:
    """(M, K, BLOCK_M) for a GEMV input [M <= MAX_M, K]: BLOCK_M is M rounded up to 1, 2, 4 or 8."""
    M, K = x_shape
    check_input(K, n_cols)
    if M > MAX_M:
        raise ValueError(f"gemv handles up to {MAX_M} rows, got {M}")
    return M, K, 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8
