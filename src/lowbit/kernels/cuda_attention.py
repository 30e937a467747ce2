"""The one-kernel attention step (:func:`lowbit.kernels.triton_decode_attention.rope_cache_attention`) in CUDA C++
(``cuda/attention_step.cu``), for Hopper and later: a head's flash-decoding programs form a cluster of CTAs and
program 0 combines their partial softmaxes through distributed shared memory instead of global memory, and the
step reads its first keys before the q/k/v matmul has finished (programmatic dependent launch).

:func:`serves` says when it applies (fp16, no mask, a head size of 64, 128 or 256, 16-byte aligned rows, compute
capability 9.0 or more, NVRTC found); :func:`rope_cache_attention` runs it. The Triton kernel serves every other
case; both are tested against ``rope_cache_attention_reference``. Measured on an H200 (docs/kernel-measurements.md):
TG-128 of the 7B shape with nz2_ch 810.7 -> 837.5 tok/s against the Triton kernel; a first version (16 keys a warp) took
the step alone at a cache of 4096 from 24.1 to 15.8 µs per layer.
"""

from __future__ import annotations

import ctypes

import torch

from lowbit.kernels import cuda_jit
from lowbit.kernels.device import hopper, sm_count
from lowbit.kernels.triton_decode_attention import default_splits

MAX_SPLITS = 8  # the portable cluster size
HEAD_DIMS = (64, 128, 256)
# Keys per warp in a block of 64 (the .cu's KPW): 8, so 8 warps a program. Measured on an H200 (TG-128 of the 7B
# shape, nz2_ch): 837.5 tok/s against 816.5 with 16 keys on 4 warps.
KEYS_PER_WARP = 8


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned rows, the head dimension contiguous (the kernel reads a lane's dims in one load)."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1] if s)


def serves(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           mask: torch.Tensor | None) -> bool:
    """Whether :func:`rope_cache_attention` runs this step (check ``step_supported`` of the Triton module too)."""
    return (qkv.is_cuda and qkv.dtype == torch.float16 and k_cache.dtype == torch.float16 and mask is None
            and k_cache.shape[-1] in HEAD_DIMS and all(_aligned(t) for t in (qkv, cos, sin, k_cache, v_cache))
            and hopper(qkv.device) and cuda_jit.available())


def splits_for(bsz: int, heads: int, seq: int, device: torch.device) -> int:
    """Programs per (sequence, head): the Triton kernel's default, at most :data:`MAX_SPLITS` (one cluster)."""
    return min(default_splits(bsz, heads, seq, sm_count(device)), MAX_SPLITS)


def _kernel(dim: int, splits: int, keys_per_warp: int, device: torch.device) -> cuda_jit.Kernel:
    defines = f"#define HEAD_DIM {dim}\n#define SPLITS {splits}\n#define KPW {keys_per_warp}\n"
    return cuda_jit.kernel(cuda_jit.source("attention_step.cu", defines), "attention_step", device)


def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, length: torch.Tensor, scale: float, heads: int,
                         splits: int | None = None, early: bool = False,
                         keys_per_warp: int = KEYS_PER_WARP) -> torch.Tensor:
    """``rope_cache_attention_reference`` without a mask, as one CUDA launch (:func:`serves` first): qkv [B, 1,
    (H + 2 Hkv) D], cos/sin [B or 1, 1, D], caches [B, Hkv, S, D] (written at ``length``, an int64 0-dim tensor) ->
    [B, 1, H D]. ``splits``: programs per head (default :func:`splits_for`); ``early``: a programmatic dependent
    launch (the kernel waits for the one before it only where it reads q/k/v, cos and sin); ``keys_per_warp``: 4,
    8 or 16 of each 64-key block (``benchmarks/attention_speed.py`` compares them)."""
    bsz, dim, kv_heads, seq = qkv.shape[0], k_cache.shape[-1], k_cache.shape[1], k_cache.shape[2]
    if tuple(qkv.shape[1:]) != (1, (heads + 2 * kv_heads) * dim) or heads % kv_heads:
        raise ValueError(f"the attention step needs qkv [B, 1, {(heads + 2 * kv_heads) * dim}] for {heads} heads "
                         f"and a cache of {kv_heads} x {dim}, got {tuple(qkv.shape)}")
    if length.dtype != torch.int64 or length.numel() != 1:
        raise ValueError(f"the cache length must be one int64, got {length.dtype} x {length.numel()}")
    if not all(_aligned(t) for t in (qkv, cos, sin, k_cache, v_cache)):
        raise ValueError("the attention step needs 16-byte aligned rows with the head dimension contiguous")
    if keys_per_warp not in (4, 8, 16):
        raise ValueError(f"keys_per_warp must be 4, 8 or 16, got {keys_per_warp}")
    splits = splits_for(bsz, heads, seq, qkv.device) if splits is None else splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in 1..{MAX_SPLITS}, got {splits}")
    out = torch.empty(bsz, 1, heads * dim, dtype=qkv.dtype, device=qkv.device)
    batch_stride = [t.stride(0) if t.shape[0] > 1 else 0 for t in (qkv, cos, sin)]  # cos/sin may broadcast
    cache_strides = [ctypes.c_longlong(s) for t in (k_cache, v_cache) for s in t.stride()[:3]]
    _kernel(dim, splits, keys_per_warp, qkv.device)(
        (heads * splits, bsz, 1), (32 * 64 // keys_per_warp, 1, 1),
        [qkv, cos, sin, k_cache, v_cache, length, out, seq, ctypes.c_float(scale), *batch_stride, *cache_strides,
         heads, kv_heads], early=early)
    return out
