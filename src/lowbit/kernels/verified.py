"""Which kernels have passed their tests on a GPU: the switch between a new kernel and the torch reference.

Kept apart from :mod:`lowbit.kernels.dispatch` so that the kernels it routes to can read it without importing the
dispatcher back (tests and scripts set ``verified.GPU_UNVERIFIED``; every reader looks it up at call time)."""

from __future__ import annotations

# Kernels that pass the interpreter tests but have not yet been compiled and checked on a GPU: "auto" keeps the
# torch reference for them on CUDA until their GPU tests have passed there; LOWBIT_KERNELS=triton opts in.
# iq2_xxs and hadamard left it after their GPU tests passed on an H100; decode_attention (flash-decoding,
# tests/test_decode_attention.py) and gated_gemv (the CUDA GEMV's silu(gate) * up epilogue, tests/test_cuda_gemv.py)
# after theirs passed on an H200, and so did resident_gemv (the CUDA GEMV's blocks looping over row blocks,
# cuda_gemv.RESIDENT_GRID), kquants (triton_kquants) and the CUDA GEMV's K-quants (cuda_q2_k .. cuda_q6_k). A new
# kernel enters here (as "cuda_<format>" for a CUDA GEMV format) until its GPU test has run. row_tiles (two row
# blocks per warp in the CUDA GEMV's batches, cuda_gemv.row_tiles) left it when its GPU test passed on an H200, and
# residual_norm (a rotated layer's junction, triton_hadamard.residual_norm) never entered: its GPU tests
# (tests/test_residual_norm_kernel.py) passed on an H200 before it was first used; norm_rotated (the same kernel
# without an output side: triton_hadamard.norm_rotated) left it when those tests passed on an H200 with it.
# junction_blocks (the junction kernel on rows of layout 3's blocks, e.g. 5120 = 5 x 1024: triton_hadamard's
# junction_fits) left it when its GPU tests passed on an H100 (benchmarks/results/rotation-layout3-gpu-h100.txt).
# silu_mul_rotated (a rotated MLP's SiLU product and down's input side in one launch) left it when its GPU tests
# passed on an H100 (benchmarks/results/silu-mul-rotated-gpu-h100.txt).
# dequantize (the Triton dequantize kernels that serve a prompt's matmuls) left it when its GPU tests passed on an
# H100 (benchmarks/results/dequantize-gpu-tests-h100.txt).
# layouts_only (hold_layout: a weight's stored bytes in host memory, its kernel layout alone on the device, prompts
# decoded from the layout by triton_layouts) entered it untested on a GPU and left it when its GPU tests passed on
# an H100 (benchmarks/results/held-layouts-gpu-tests-h100.txt; the first run found IQ2_XXS's tables left on the host).
# packed_args (cuda_jit.PackedArgs: a launch's arguments written into one reusable buffer instead of a ctypes object
# each, ~40 -> 3.5 µs of host time a GEMV launch) entered it untested on a GPU and left it when its GPU tests and the
# CUDA kernels' tests with it on passed on an H200 (benchmarks/results/packed-args-gpu-tests-h200.txt).
# serve_fast (lowbit serve's default on CUDA: one StaticDecoder per slot, as lowbit generate decodes there, instead
# of the dynamic-cache loop with its weight cache; serve.app.serves_fast) entered it untested on a GPU (the server's
# decoders replay their CUDA graphs on its worker thread) and left it when its GPU test,
# tests/test_serve.py::test_serve_decodes_fast_by_default_on_cuda_only, and the other fast-serving tests passed on
# a GPU (benchmarks/results/serve-fast-gpu-tests-h100.txt).
# pinned_row_e8p and pinned_row_kquants (the CUDA GEMV's batch-1 kernels with the staged row's address kept in a
# register, cuda_gemv.PIN_XS, for E8P and the K-quants) entered it untested on a GPU and left it when
# tests/test_cuda_gemv.py -k pinned passed for every format it covers on an H100
# (benchmarks/results/pinned-gpu-tests-h100-all.txt).
GPU_UNVERIFIED: frozenset[str] = frozenset()
