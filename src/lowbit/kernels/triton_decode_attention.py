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

:func:`rope_cache_attention` is the whole attention step of a Llama-family layer after its fused q/k/v matmul, in
one launch: the rotary embedding of the query and the new key, the new key and value written to the static cache
at its length, and the attention over the written part of the cache (the length bounds the blocks read, so the
key/value loads need not wait for the mask's; the programs past the written blocks write nothing, and a context of
one block is written by its one program with no workspace round trip). In a compiled decode step these were three
or four small kernels per layer besides the attention (~130 µs of a 7B step on an H200, docs/kernels.md). On Hopper
GPUs a CUDA version serves the fp16 steps without a mask (:mod:`lowbit.kernels.cuda_attention`, chosen by
:func:`lowbit.kernels.dispatch.rope_cache_attention`): it combines a head's programs within a cluster of CTAs.

:func:`decode_attention_reference` and :func:`rope_cache_attention_reference` are the plain torch computations
the kernels are tested against.
"""

from __future__ import annotations

import torch

from lowbit.kernels.device import sm_count
from lowbit.kernels.launch import FUSED

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


def default_splits(bsz: int, heads: int, seq: int, sms: int, block: int = BLOCK) -> int:
    """Programs per (sequence, head) on ``sms`` SMs: about two per SM in all, at most one per ``block`` keys and at
    most :data:`MAX_SPLITS`."""
    return max(1, min(-(-seq // block), -(-2 * sms // (bsz * heads)), MAX_SPLITS))


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
    def _attend(q, k, v, visible, m_i, l_i, acc):
        """The online softmax (max, sum, weighted values) moved on by one block of keys ``k`` and values ``v``
        [BLOCK, D] (fp32), of which ``visible`` are attended; a block with none leaves it as it was."""
        scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # nothing seen yet: exp(-inf) terms, no NaN
        p = tl.exp(scores - m_ref)
        alpha = tl.exp(m_i - m_ref)
        acc = acc * alpha + tl.sum(p[:, None] * tl.where(visible[:, None], v, 0.0), axis=0)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc

    @triton.jit
    def _kv_block(k_ptr, v_ptr, b, kvh, s, ok, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, D: tl.constexpr):
        """Keys and values (fp32, [len(s), D]) of cache positions ``s``; zeros where ``ok`` is False (not read)."""
        d = tl.arange(0, D)
        k = tl.load(k_ptr + b * sk_b + kvh * sk_h + s[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * sv_b + kvh * sv_h + s[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
        return k.to(tl.float32), v.to(tl.float32)

    @triton.jit
    def _scan(q, k_ptr, v_ptr, m_ptr, b, kvh, j, S, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
              D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, SPLITS: tl.constexpr):
        """Online softmax of program ``j``'s key blocks (j, j + SPLITS, ...) for the scaled query ``q``: the
        running (max, sum, weighted values). A block whose mask hides every key is not read."""
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(j * BLOCK_S, S, SPLITS * BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            visible = s < S
            if HAS_MASK:
                visible = visible & (tl.load(m_ptr + b * sm_b + s * sm_s, mask=s < S, other=0) != 0)
            if tl.max(visible.to(tl.int32), axis=0) > 0:
                k, v = _kv_block(k_ptr, v_ptr, b, kvh, s, visible, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, D)
                m_i, l_i, acc = _attend(q, k, v, visible, m_i, l_i, acc)
        return m_i, l_i, acc

    @triton.jit
    def _written_block(k_ptr, v_ptr, m_ptr, b, kvh, start, hi, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
        """Keys, values (fp32) and visibility of the cache block at ``start``, positions below ``hi`` only. The
        key/value loads do not wait for the mask's (the mask only hides padding inside the written part)."""
        s = start + tl.arange(0, BLOCK_S)
        written = s < hi
        k, v = _kv_block(k_ptr, v_ptr, b, kvh, s, written, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, D)
        visible = written
        if HAS_MASK:
            visible = visible & (tl.load(m_ptr + b * sm_b + s * sm_s, mask=written, other=0) != 0)
        return k, v, visible

    @triton.jit
    def _store_normalized(acc, total, out_ptrs):
        """The weighted values over their softmax sum (zeros where no key was visible), in the output's dtype."""
        out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
        tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty))

    @triton.jit
    def _finish(m_i, l_i, acc, o_ptr, part_ptr, stat_ptr, count_ptr, row, j, active,
                D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
        """Write the attention of one (sequence, head) to ``o_ptr`` (its D outputs): directly when one program
        holds it all, else through the workspace, by whichever of the first ``active`` programs finishes last (the
        others found no key to read and write nothing)."""
        d = tl.arange(0, D)
        if SPLITS == 1:
            _store_normalized(acc, l_i, o_ptr + d)
        elif j < active:
            if active == 1:  # a short context: no workspace round trip, no atomic
                _store_normalized(acc, l_i, o_ptr + d)
            else:
                tl.store(part_ptr + (row * SPLITS + j) * D + d, acc)
                tl.store(stat_ptr + (row * SPLITS + j) * 2, m_i)
                tl.store(stat_ptr + (row * SPLITS + j) * 2 + 1, l_i)
                # acq_rel: the partials stored above are visible to whichever program counts last, which combines
                if tl.atomic_add(count_ptr + row, 1) == active - 1:
                    js = tl.arange(0, SPLITS_P2)
                    ok = js < active
                    at = row * SPLITS + js
                    # .cg: straight from L2, never a line this SM cached in an earlier launch
                    ms = tl.load(stat_ptr + at * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(stat_ptr + at * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
                    parts = tl.load(part_ptr + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                                    cache_modifier=".cg")
                    top = tl.max(ms, axis=0)
                    w = tl.where(ms > float("-inf"), tl.exp(ms - tl.where(top > float("-inf"), top, 0.0)), 0.0)
                    total = tl.sum(ls * w, axis=0)
                    _store_normalized(tl.sum(parts * w[:, None], axis=0), total, o_ptr + d)
                    # ready for the next launch (and the next graph replay), which the kernel's end orders after this
                    # one: relaxed, no fence (the acq_rel exchange took ~0.2 µs of a 5 µs step,
                    # docs/kernel-measurements.md)
                    tl.atomic_xchg(count_ptr + row, 0, sem="relaxed")

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, stat_ptr, count_ptr, S, scale,
                          sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s, so_b, so_h,
                          GROUP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                          SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        j = tl.program_id(2)
        d = tl.arange(0, D)
        # fp32 even when torch.compile passes ``scale`` as a float64 constant (the scores would follow it)
        q = (tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale).to(tl.float32)
        m_i, l_i, acc = _scan(q, k_ptr, v_ptr, m_ptr, b, h // GROUP, j, S, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                              sm_b, sm_s, D, BLOCK_S, HAS_MASK, SPLITS)
        _finish(m_i, l_i, acc, o_ptr + b * so_b + h * so_h, part_ptr, stat_ptr, count_ptr,
                b * tl.num_programs(0) + h, j, SPLITS, D, SPLITS, SPLITS_P2)

    @triton.jit
    def _rotate(ptr, cos, sin, D: tl.constexpr):
        """transformers' rotary embedding of the D values at ``ptr``: x cos + rotate_half(x) sin, in fp32."""
        d = tl.arange(0, D)
        x = tl.load(ptr + d).to(tl.float32)
        other = tl.load(ptr + (d + D // 2) % D).to(tl.float32)
        return x * cos + tl.where(d < D // 2, -other, other) * sin

    @triton.jit
    def _rope_cache_attention(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, len_ptr, m_ptr, o_ptr, part_ptr, stat_ptr,
                              count_ptr, S, scale, s_qkv, s_cos, s_sin, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                              sm_b, sm_s, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                              BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, SPLITS: tl.constexpr,
                              SPLITS_P2: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        j = tl.program_id(2)
        kvh = h // (HEADS // KV_HEADS)
        d = tl.arange(0, D)
        pos = tl.load(len_ptr)  # where this step's key and value go
        # Only the positions written before this step are read (none reads the line this step writes: the new
        # key is scored from registers), so the first block's loads wait for the length alone, not for the
        # mask's nor for q/k/v's.
        hi = tl.minimum(pos, S)
        # Programs past the last written block have nothing to read: they leave the combining to the others, and
        # with one block of keys (contexts of up to BLOCK_S) program 0 writes the output itself. Program j's first
        # block is block j, so the blocks' interleaving is the same as with every program taking part.
        active = tl.maximum(tl.minimum((hi + BLOCK_S - 1) // BLOCK_S, SPLITS), 1)
        cos = tl.load(cos_ptr + b * s_cos + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * s_sin + d).to(tl.float32)
        k0, v0, vis0 = _written_block(k_ptr, v_ptr, m_ptr, b, kvh, j * BLOCK_S, hi, sk_b, sk_h, sk_s, sv_b, sv_h,
                                      sv_s, sm_b, sm_s, D, BLOCK_S, HAS_MASK)
        seen = (pos < S) & (j == 0)  # program 0 of the row scores the new key, from registers
        if HAS_MASK:
            seen = seen & (tl.load(m_ptr + b * sm_b + pos * sm_s, mask=seen, other=0) != 0)
        row = qkv_ptr + b * s_qkv
        dtype = k_ptr.dtype.element_ty
        # rounded to the model's dtype, as the unfused step stores and reads them
        q = (_rotate(row + h * D, cos, sin, D).to(dtype).to(tl.float32) * scale).to(tl.float32)  # scale: see above
        k_new = _rotate(row + (HEADS + kvh) * D, cos, sin, D).to(dtype)
        v_new = tl.load(row + (HEADS + KV_HEADS + kvh) * D + d)
        if (h % (HEADS // KV_HEADS) == 0) & (j == 0):  # one program per key/value head writes the cache
            inside = pos + tl.zeros((D,), tl.int64) < S  # a full cache is not written past its end
            tl.store(k_ptr + b * sk_b + kvh * sk_h + pos * sk_s + d, k_new, mask=inside)
            tl.store(v_ptr + b * sv_b + kvh * sv_h + pos * sv_s + d, v_new.to(dtype), mask=inside)
        m_i, l_i, acc = _attend(q, k0, v0, vis0, tl.full((), float("-inf"), tl.float32), tl.zeros((), tl.float32),
                                tl.zeros((D,), tl.float32))
        for start in range((j + SPLITS) * BLOCK_S, hi, SPLITS * BLOCK_S):
            k, v, visible = _written_block(k_ptr, v_ptr, m_ptr, b, kvh, start, hi, sk_b, sk_h, sk_s, sv_b, sv_h,
                                           sv_s, sm_b, sm_s, D, BLOCK_S, HAS_MASK)
            m_i, l_i, acc = _attend(q, k, v, visible, m_i, l_i, acc)
        m_i, l_i, acc = _attend(q, k_new.to(tl.float32)[None, :], v_new.to(dtype).to(tl.float32)[None, :],
                                (tl.zeros((1,), tl.int32) + seen.to(tl.int32)) != 0, m_i, l_i, acc)
        _finish(m_i, l_i, acc, o_ptr + (b * HEADS + h) * D, part_ptr, stat_ptr, count_ptr, b * HEADS + h, j,
                active, D, SPLITS, SPLITS_P2)


def _launch(x: torch.Tensor, bsz: int, heads: int, seq: int, dim: int, mask: torch.Tensor | None,
            splits: int | None, block: int = BLOCK) -> tuple[int, tuple[torch.Tensor, ...], tuple[int, int]]:
    """What both kernels' launches share: the splits (checked, or :func:`default_splits` for ``block`` keys a
    step), the mask pointer, the workspace and counters of the splits, and the mask's strides."""
    splits = default_splits(bsz, heads, seq, sm_count(x.device), block) if splits is None else splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in 1..{MAX_SPLITS}, got {splits}")
    rows = bsz * heads
    part = torch.empty(rows * splits * dim if splits > 1 else 1, dtype=torch.float32, device=x.device)
    stat = torch.empty(rows * splits * 2 if splits > 1 else 1, dtype=torch.float32, device=x.device)
    m = mask if mask is not None else x  # any pointer: HAS_MASK=False never reads it
    strides = (mask.stride(0), mask.stride(-1)) if mask is not None else (0, 0)
    return splits, (m, part, stat, _counters(x.device, rows)), strides


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, splits: int | None = None) -> torch.Tensor:
    """The kernel's result for the shapes of :func:`decode_attention_reference` (check :func:`supported` first).
    ``splits``: programs per (sequence, head), default :func:`default_splits`."""
    bsz, heads, _, dim = query.shape
    seq = key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    splits, (m, part, stat, count), (sm_b, sm_s) = _launch(query, bsz, heads, seq, dim, mask, splits)
    out = torch.empty(bsz, heads, 1, dim, dtype=query.dtype, device=query.device)
    _decode_attention[(heads, bsz, splits)](
        query, key, value, m, out, part, stat, count, seq, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, sm_s, out.stride(0), out.stride(1),
        GROUP=heads // key.shape[1], D=dim, BLOCK_S=BLOCK, HAS_MASK=mask is not None, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), num_warps=4, **FUSED)
    return out


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding ``x cos + rotate_half(x) sin`` of x [B, N, T, D] with cos/sin [B, T, D], in
    fp32 and rounded once to x's dtype (as torch.compile computes it)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos.unsqueeze(1).float() + turned.float() * sin.unsqueeze(1).float()).to(x.dtype)


def _split_heads(qkv: torch.Tensor, heads: int, kv_heads: int, dim: int) -> list[torch.Tensor]:
    return list(qkv.view(qkv.shape[0], 1, heads + 2 * kv_heads, dim).transpose(1, 2)
                .split([heads, kv_heads, kv_heads], dim=1))


def rope_cache_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None,
                                   scale: float, heads: int) -> torch.Tensor:
    """One decode step of a Llama-family attention after its fused q/k/v matmul: qkv [B, 1, (H + 2 Hkv) D] with
    H = ``heads``, cos/sin [B, 1, D]. Rotates q and k (:func:`rotary_reference`), writes k and v at position
    ``length`` (a 0-dim integer tensor; the caller advances it) of the caches [B, Hkv, S, D] and returns the
    attention (:func:`decode_attention_reference`) over the written part of the cache, positions 0..length, [B, 1,
    H D]; the mask selects among those (a causal step's mask hides every later position anyway). Mutates the
    caches."""
    dim, kv_heads = k_cache.shape[-1], k_cache.shape[1]
    q, k, v = _split_heads(qkv, heads, kv_heads, dim)
    pos = int(length)
    k_cache[:, :, pos] = rotary_reference(k, cos, sin)[:, :, 0]
    v_cache[:, :, pos] = v[:, :, 0]
    n = min(pos + 1, k_cache.shape[2])
    out = decode_attention_reference(rotary_reference(q, cos, sin), k_cache[:, :, :n], v_cache[:, :, :n],
                                     None if mask is None else mask[..., :n], scale)
    return out.transpose(1, 2).reshape(qkv.shape[0], 1, heads * dim)


def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None, scale: float,
                         heads: int, splits: int | None = None, block: int = BLOCK, warps: int = 4) -> torch.Tensor:
    """:func:`rope_cache_attention_reference` in one launch: every program rotates its query and its group's new
    key, one program per key/value head writes them to the cache, and the new position's score is taken from
    registers (no program reads the cache line being written). Check :func:`step_supported` first. ``splits`` as
    in :func:`decode_attention` (the default counts blocks of ``block`` keys); ``block`` keys per program step,
    ``warps`` per program (``benchmarks/attention_speed.py`` compares them)."""
    bsz, dim, kv_heads, seq = qkv.shape[0], k_cache.shape[-1], k_cache.shape[1], k_cache.shape[2]
    if tuple(qkv.shape[1:]) != (1, (heads + 2 * kv_heads) * dim):
        raise ValueError(f"rope_cache_attention needs qkv [B, 1, {(heads + 2 * kv_heads) * dim}] for {heads} heads "
                         f"and a cache of {kv_heads} x {dim}, got {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or cos.stride(-1) != 1 \
            or sin.stride(-1) != 1:
        raise ValueError("rope_cache_attention needs the head dimension contiguous")
    splits, (m, part, stat, count), (sm_b, sm_s) = _launch(qkv, bsz, heads, seq, dim, mask, splits, block)
    out = torch.empty(bsz, 1, heads * dim, dtype=qkv.dtype, device=qkv.device)
    batch_stride = [t.stride(0) if t.shape[0] > 1 else 0 for t in (qkv, cos, sin)]  # cos/sin may broadcast
    _rope_cache_attention[(heads, bsz, splits)](
        qkv, cos, sin, k_cache, v_cache, length, m, out, part, stat, count, seq, scale,
        *batch_stride, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), sm_b, sm_s,
        HEADS=heads, KV_HEADS=kv_heads, D=dim, BLOCK_S=block, HAS_MASK=mask is not None, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), num_warps=warps, **FUSED)
    return out


def step_supported(x: torch.Tensor, k_cache: torch.Tensor, heads: int, mask: torch.Tensor | None) -> bool:
    """:func:`rope_cache_attention` serves the q/k/v rows of ``x`` [B, 1, hidden] (checked before they are
    computed): one token per sequence, a power-of-two head size, heads a multiple of the key/value heads, a cache
    of x's dtype and no mask or a boolean one over the whole cache."""
    dim, kv_heads, seq = k_cache.shape[-1], k_cache.shape[1], k_cache.shape[2]
    return (triton is not None and x.dim() == 3 and x.shape[1] == 1 and dim & (dim - 1) == 0 and 16 <= dim <= 256
            and heads % kv_heads == 0 and k_cache.shape[0] == x.shape[0] and k_cache.dtype == x.dtype
            and (mask is None or (mask.dtype == torch.bool and mask.shape[-1] == seq and mask.shape[-2] == 1)))
