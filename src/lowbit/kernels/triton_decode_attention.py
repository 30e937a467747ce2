"""Decode attention (one query token) over a static KV cache, skipping the blocks of keys nothing attends to.

A static cache holds ``max_cache_len`` positions and the attention mask hides those not written yet; SDPA still
reads and scores every position, and on an H200 cuDNN's kernel takes ~7 µs per layer even for a short context
(docs/kernels.md). Here the keys are walked in blocks, each block's mask is read first and blocks with no visible
key are skipped, so a step reads the used part of the cache only, with no host synchronisation (the CUDA graph of a
decode step stays valid as the context grows). Grouped-query attention reads the key/value head of its group.
Scores, softmax and the weighted sum are in fp32 (online softmax).

Flash-decoding: one (sequence, query head) is split over ``splits`` programs, so that a step has enough programs
to fill the GPU (32 heads alone occupy a quarter of an H200's SMs). Program j takes key blocks j, j + splits,
j + 2 splits, ...: interleaved, so the visible blocks at the start of a long static cache are shared out rather
than all falling to the first program, and each program scans only 1 / splits of the masks. Each writes its
partial (max, sum, weighted values) to a workspace; the last of a head's programs to finish (an atomic counter)
combines them and resets the counter, all in one launch.

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


def default_splits(bsz: int, heads: int, seq: int, sms: int) -> int:
    """Programs per (sequence, head) on ``sms`` SMs: about two per SM in all, at most one per key block and at most
    :data:`MAX_SPLITS`."""
    return max(1, min(-(-seq // BLOCK), -(-2 * sms // (bsz * heads)), MAX_SPLITS))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


MAX_SPLITS = 16
_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, head), kept for the process: a captured CUDA graph holds their
    address, and each launch leaves them at zero again. Launches on concurrent streams must not share them.
    Code that torch.compile traces should :func:`reserve` them first, so the trace reads the kept tensor instead
    of creating (and zeroing) one per call."""
    key = (str(device), rows)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(rows, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def reserve(device: torch.device, batch: int, heads: int) -> None:
    """Create the counters that calls with ``batch`` sequences of ``heads`` query heads on ``device`` use."""
    _counters(device, batch * heads)


if triton is not None:

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, stat_ptr, count_ptr, S, scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s, so_b, so_h,
                          GROUP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                          SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        j = tl.program_id(2)
        kvh = h // GROUP
        d = tl.arange(0, D)
        # fp32 even when torch.compile passes ``scale`` as a float64 constant
        q = (tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale).to(tl.float32)
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(j * BLOCK_S, S, SPLITS * BLOCK_S):
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
        if SPLITS == 1:
            out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)
            tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))
        else:
            row = b * tl.num_programs(0) + h
            tl.store(part_ptr + (row * SPLITS + j) * D + d, acc)
            tl.store(stat_ptr + (row * SPLITS + j) * 2, m_i)
            tl.store(stat_ptr + (row * SPLITS + j) * 2 + 1, l_i)
            # acq_rel: the partials stored above are visible to whichever program counts last, which combines
            if tl.atomic_add(count_ptr + row, 1) == SPLITS - 1:
                js = tl.arange(0, SPLITS_P2)
                ok = js < SPLITS
                at = row * SPLITS + js
                # .cg: straight from L2, never a line this SM cached in an earlier launch
                ms = tl.load(stat_ptr + at * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
                ls = tl.load(stat_ptr + at * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
                parts = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                                cache_modifier=".cg")
                top = tl.max(ms, axis=0)
                w = tl.where(ms > float("-inf"), tl.exp(ms - tl.where(top > float("-inf"), top, 0.0)), 0.0)
                total = tl.sum(ls * w, axis=0)
                out = tl.sum(parts * w[:, None], axis=0)
                out = tl.where(total > 0, out / tl.maximum(total, 1e-30), 0.0)
                tl.store(o_ptr + b * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty))
                tl.atomic_xchg(count_ptr + row, 0)  # ready for the next launch (and the next graph replay)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, splits: int | None = None) -> torch.Tensor:
    """The kernel's result for the shapes of :func:`decode_attention_reference` (check :func:`supported` first).
    ``splits``: programs per (sequence, head), default :func:`default_splits`."""
    bsz, heads, _, dim = query.shape
    seq = key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    splits = default_splits(bsz, heads, seq, _sm_count(query.device)) if splits is None else splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in 1..{MAX_SPLITS}, got {splits}")
    out = torch.empty(bsz, heads, 1, dim, dtype=query.dtype, device=query.device)
    rows = bsz * heads
    part = torch.empty(rows * splits * dim if splits > 1 else 1, dtype=torch.float32, device=query.device)
    stat = torch.empty(rows * splits * 2 if splits > 1 else 1, dtype=torch.float32, device=query.device)
    count = _counters(query.device, rows)
    m = mask if mask is not None else query  # any pointer: HAS_MASK=False never reads it
    sm_b, sm_s = (mask.stride(0), mask.stride(-1)) if mask is not None else (0, 0)
    _decode_attention[(heads, bsz, splits)](
        query, key, value, m, out, part, stat, count, seq, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, sm_s, out.stride(0), out.stride(1),
        GROUP=heads // key.shape[1], D=dim, BLOCK_S=BLOCK, HAS_MASK=mask is not None, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), num_warps=4)
    return out
