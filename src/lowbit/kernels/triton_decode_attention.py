"""Decode attention (one query token) over a static KV cache, skipping the blocks of keys nothing attends to.

A static cache holds ``max_cache_len`` positions and the attention mask hides those not written yet; SDPA still
reads and scores every position, and on an H200 cuDNN's kernel takes ~7 µs per layer even for a short context
(docs/kernels.md). Here one program per (sequence, query head) walks the keys in blocks, reads each block's mask
first and skips blocks with no visible key, so a step reads the used part of the cache only, with no host
synchronisation (the CUDA graph of a decode step stays valid as the context grows). Grouped-query attention reads
the key/value head of its group. Scores, softmax and the weighted sum are in fp32 (online softmax).

:func:`decode_attention_reference` is the plain torch computation the kernel is tested against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference still works
    triton = None

BLOCK = 64  # keys per step


def supported(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """The kernel serves one query token, a power-of-two head size, and no mask or a boolean one."""
    d = query.shape[-1]
    return (triton is not None and query.shape[2] == 1 and d & (d - 1) == 0 and 16 <= d <= 256
            and query.shape[1] % key.shape[1] == 0 and (mask is None or mask.dtype == torch.bool))


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float64; query [B, H, 1, D], key/value [B, Hkv, S, D], mask [B, 1, 1, S]
    (True = attend) or None -> [B, H, 1, D]. A row with no visible key gives zeros."""
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ v).to(query.dtype)


if triton is not None:

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, S, scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s, so_b, so_h,
                          GROUP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, D)
        # fp32 even when torch.compile passes ``scale`` as a float64 constant
        q = (tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale).to(tl.float32)
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, S, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            visible = s < S
            if HAS_MASK:
                visible = visible & (tl.load(m_ptr + b * sm_b + s * sm_s, mask=s < S, other=0) != 0)
            if tl.max(visible.to(tl.int32), axis=0) > 0:  # a block nobody attends to is not read
                k = tl.load(k_ptr + b * sk_b + kvh * sk_h + s[:, None] * sk_s + d[None, :], mask=visible[:, None],
                            other=0.0).to(tl.float32)
                scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=0))
                p = tl.exp(scores - m_new)
                alpha = tl.exp(m_i - m_new)
                v = tl.load(v_ptr + b * sv_b + kvh * sv_h + s[:, None] * sv_s + d[None, :], mask=visible[:, None],
                            other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
        out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)
        tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """The kernel's result for the shapes of :func:`decode_attention_reference` (check :func:`supported` first)."""
    bsz, heads, _, dim = query.shape
    seq = key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    out = torch.empty(bsz, heads, 1, dim, dtype=query.dtype, device=query.device)
    m = mask if mask is not None else query  # any pointer: HAS_MASK=False never reads it
    sm_b, sm_s = (mask.stride(0), mask.stride(-1)) if mask is not None else (0, 0)
    _decode_attention[(heads, bsz)](
        query, key, value, m, out, seq, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, sm_s, out.stride(0), out.stride(1),
        GROUP=heads // key.shape[1], D=dim, BLOCK_S=BLOCK, HAS_MASK=mask is not None, num_warps=4)
    return out
