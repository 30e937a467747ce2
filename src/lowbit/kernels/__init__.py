"""Low-bit matmul kernels: Triton on CUDA, with a plain torch reference beside each (see dispatch.py)."""
