"""Triton online randomized Hadamard: x -> x R^T for R = (F_m kron H_p) diag(signs) (:mod:`lowbit.rotations.hadamard`).

One launch does the random signs and the whole fast Walsh-Hadamard transform of the power-of-two part p (the
torch reference, ``fwht``, runs log2(p) stack/add ops over the tensor): the input viewed as [rows * m, p] (chunk c
takes row c % m of the [m, p] signs table), each program loads BLOCK_C consecutive length-p chunks, multiplies by
the chunk's signs, runs the log2(p) butterfly stages in registers (reshape to [BLOCK_C, p / 2h, 2, h], split the
pair axis, join (a + b, a - b)), scales by 1 / sqrt(p) and stores once, in float32 arithmetic whatever x's dtype.
When the rotation has a dense factor (m > 1 outside the block-diagonal layout 3), F_m is applied by one torch
einsum (after the kernel; before it for the inverse), with F_m cached per (device, dtype) so that no cast runs per
call. k rotations of one split, on k consecutive slices of a row (the output sides of a fused group's members), go
through one launch and one batched matmul (:func:`rotate_stacked`): their signs tables stacked [k * m, p], their
factors [k, m, m].

These calls are launch-bound: 2.1-2.3 µs for 4096 at batch 1 and 8 on an H200, 3.9-4.4 µs for 11008 = 43 x 256
(``benchmarks/hadamard.py``, docs/kernels.md). A tensor-core variant (H_a V H_b as two ``tl.dot`` per chunk, the
float32 middle split into hi + lo 16-bit halves) measured 0.87-1.00x these times and was removed. With ``pdl``
(programmatic dependent launch, Hopper and later, as the GEMVs of a compiled decode step launch:
``cuda_gemv.early_launch``) a transform starts while the kernel before it finishes, loads its signs, waits for that
kernel before reading x, and lets the kernel after it start once x is read. :func:`hadamard` is the same call as the
custom op ``lowbit::hadamard``, which torch.compile traces as one opaque node (as a user Triton kernel Inductor would
launch it plainly).

:func:`residual_norm` is the junction between two ``+rht`` matmuls of a decoder layer (o_proj -> gate/up, down_proj ->
the next q/k/v) in one launch: h = residual + y U (the output side undone, the residual added) and x = rms_norm(h)
V^T (the next input side), one program per row, where the separate steps took two transforms and Inductor's add +
norm kernel. It rounds where those steps round (each transform's output, h, the normalized row before its weight),
so it gives their result up to the order of float32 sums; :func:`norm_rotated` is the same program without the
output side and the residual (a matmul without an output side adds the residual in its epilogue). Powers of two
only (n = p: 4096, 8192, the hidden sizes of most Llamas): a dense factor on the row's [m, p] view measured slower
in one program than as its own launch (docs/kernels.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lowbit.kernels.cuda_gemv import pdl_on
from lowbit.kernels.launch import FUSED
from lowbit.rotations.incoherence import device_signs, hadamard_of

MAX_P = 1 << 14  # a chunk lives in one program's registers (larger p: the torch reference)
CHUNK_ELEMS = 2048  # elements per program when p is small (BLOCK_C chunks of p)


@triton.jit
def _fwht_stage(v, BLOCK_C: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One butterfly stage on each row of v [BLOCK_C, P]: (v[i], v[i + H]) -> (v[i] + v[i + H], v[i] - v[i + H])."""
    v = tl.reshape(v, (BLOCK_C, P // (2 * H), 2, H))
    v = tl.permute(v, (0, 1, 3, 2))  # the pair axis last, for split
    a, b = tl.split(v)
    v = tl.join(a + b, a - b)
    v = tl.permute(v, (0, 1, 3, 2))
    return tl.reshape(v, (BLOCK_C, P))


@triton.jit
def _hadamard_kernel(x_ptr, signs_ptr, y_ptr, n_chunks, m, scale, P: tl.constexpr, LOG_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, SIGNS_AFTER: tl.constexpr, USE_GDC: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, P)
    cmask = (offs_c < n_chunks)[:, None]
    offs = offs_c.to(tl.int64)[:, None] * P + offs_p[None, :]
    s = tl.load(signs_ptr + (offs_c % m)[:, None] * P + offs_p[None, :], mask=cmask, other=0.0)
    if USE_GDC:  # x is the kernel before this one's output: wait for it (the signs are constant)
        tl.extra.cuda.gdc_wait()
    v = tl.load(x_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    if not SIGNS_AFTER:  # x R^T = H (s * x); its inverse y R = s * (H y) (H symmetric)
        v = v * s
    for i in tl.static_range(LOG_P):
        v = _fwht_stage(v, BLOCK_C, P, 1 << i)
    if SIGNS_AFTER:
        v = v * s
    tl.store(y_ptr + offs, (v * scale).to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _silu_mul_hadamard_kernel(gu_ptr, signs_ptr, y_ptr, n_chunks, m, scale, P: tl.constexpr, LOG_P: tl.constexpr,
                              BLOCK_C: tl.constexpr, USE_GDC: tl.constexpr):
    """_hadamard_kernel's input side of silu(gate) * up: chunk c is block c % m of row c // m, read from that row's
    gate half and up half of gu [rows, 2 m P]; the product rounded as eager torch rounds it (silu, then the
    product, each to x's dtype)."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, P)
    cmask = (offs_c < n_chunks)[:, None]
    j = offs_c % m
    g_offs = ((offs_c // m).to(tl.int64) * (2 * m) + j)[:, None] * P + offs_p[None, :]
    s = tl.load(signs_ptr + j[:, None] * P + offs_p[None, :], mask=cmask, other=0.0)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    g = tl.load(gu_ptr + g_offs, mask=cmask, other=0.0)
    u = tl.load(gu_ptr + g_offs + m * P, mask=cmask, other=0.0)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    v = (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32) * s
    for i in tl.static_range(LOG_P):
        v = _fwht_stage(v, BLOCK_C, P, 1 << i)
    offs = offs_c.to(tl.int64)[:, None] * P + offs_p[None, :]
    tl.store(y_ptr + offs, (v * scale).to(y_ptr.dtype.element_ty), mask=cmask)


def _chunk_launch(n_chunks: int, p: int, pdl: bool) -> tuple[tuple[int], dict]:
    """Grid and launch settings of the chunk kernels (_hadamard_kernel, _silu_mul_hadamard_kernel): BLOCK_C
    length-p chunks per program, up to CHUNK_ELEMS values, and a programmatic dependent launch with ``pdl``."""
    block_c = max(1, min(triton.next_power_of_2(n_chunks), CHUNK_ELEMS // p))
    shape = {"P": p, "LOG_P": p.bit_length() - 1, "BLOCK_C": block_c,
             "num_warps": 4 if p * block_c <= 2048 else 8 if p * block_c <= 8192 else 16}
    if pdl:  # the interpreter knows no such option: only when asked
        shape["launch_pdl"] = True
    return (triton.cdiv(n_chunks, block_c),), shape


def silu_mul_rotated(gu: torch.Tensor, rot, pdl: bool = False) -> torch.Tensor:  # noqa: ANN001
    """(silu(gate) * up) R^T for gu = [gate, up] along the last dimension (2n values, n = rot.n) in one launch: a
    gated MLP's product and the input side of its down projection, for transforms without a dense factor."""
    n, m, p = rot.n, rot.m, rot.p
    if rot.dense or not supported(p) or gu.shape[-1] != 2 * n:
        raise ValueError(f"silu_mul_rotated needs [..., 2 x {n}] and a transform without a dense factor, got "
                         f"{tuple(gu.shape)}, {rot.kind}")
    g2 = gu.reshape(-1, 2 * n).contiguous()
    y = torch.empty(g2.shape[0], n, dtype=gu.dtype, device=gu.device)
    n_chunks = g2.shape[0] * m
    if n_chunks:
        grid, shape = _chunk_launch(n_chunks, p, pdl)
        _silu_mul_hadamard_kernel[grid](g2, device_signs([rot], gu.device), y, n_chunks, m, 1.0 / math.sqrt(p),
                                        USE_GDC=pdl, **shape, **FUSED)
    return y.reshape(*gu.shape[:-1], n)


@torch.library.custom_op("lowbit::silu_mul_rotated", mutates_args=())
def silu_mul_rotated_op(gu: torch.Tensor, n: int, seed: int, layout: int) -> torch.Tensor:
    """:func:`silu_mul_rotated` of the transform (n, seed, layout), launched as :func:`hadamard` is."""
    return silu_mul_rotated(gu, hadamard_of(n, seed, layout), pdl=pdl_on(gu.device))


@silu_mul_rotated_op.register_fake
def _silu_mul_rotated_shape(gu: torch.Tensor, n: int, seed: int, layout: int) -> torch.Tensor:
    return gu.new_empty(*gu.shape[:-1], n)


_FACTORS: dict[tuple, torch.Tensor] = {}  # the stacked [k, m, m] F_m (or F_m^T) per rotations, device and dtype


def supported(n_p: int) -> bool:
    """Whether the kernel handles a power-of-two part of this length (else the caller uses the reference)."""
    return 2 <= n_p <= MAX_P


def _key(rots: Sequence) -> tuple:
    return tuple((r.n, r.seed, r.layout) for r in rots)  # what determines each transform (the layout fixes m, p)


def _device_factor(rots: Sequence, device: torch.device, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
    """The F_m (F_m^T with ``transpose``) of each rotation, stacked [k, m, m], on the device in x's dtype, built
    once: a per-call ``.to(dtype)`` would launch a copy kernel in every decode step."""
    key = (_key(rots), str(device), dtype, transpose)
    if key not in _FACTORS:
        fs = [r.factor.float().t() if transpose else r.factor.float() for r in rots]
        _FACTORS[key] = torch.stack(fs).contiguous().to(device=device, dtype=dtype)
    return _FACTORS[key]


def rotate(rot, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:  # noqa: ANN001 - a RandomizedHadamard
    """x @ R^T along the last dimension, as ``rot.apply(x)`` computes it (float32 accumulation inside); with
    ``inverse``, x @ R as ``rot.inverse(x)`` does (the dense factor F_m^T first, then the kernel with the signs
    after the transform: the two act on different axes of the [m, p] view, so their order is free)."""
    return rotate_stacked([rot], x, inverse)


def rotate_stacked(rots: Sequence, x: torch.Tensor, inverse: bool = False, pdl: bool = False) -> torch.Tensor:
    """k rotations of one split (m, p) at once: x [..., k * n] holds k consecutive slices of length n, slice j
    transformed by ``rots[j]`` (``rotate`` on each slice, concatenated) in one kernel launch and at most one
    batched matmul. A fused group's members undo their output-side rotations this way (one launch, not k)."""
    m, p, n, k, dense = rots[0].m, rots[0].p, rots[0].n, len(rots), rots[0].dense
    if any((r.m, r.p, r.dense) != (m, p, dense) for r in rots):
        raise ValueError(f"stacked rotations need one split, got {[(r.m, r.p, r.dense) for r in rots]}")
    if x.shape[-1] != k * n:
        raise ValueError(f"last dimension {x.shape[-1]} != {k} rotations of size {n}")
    if not supported(p):
        raise ValueError(f"power-of-two part {p} outside the kernel's range")
    signs = device_signs(rots, x.device)
    if inverse and dense:
        x = _dense_factor(_device_factor(rots, x.device, x.dtype, transpose=True), x, k, m, p)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n_chunks = xc.numel() // p
    if n_chunks:
        grid, shape = _chunk_launch(n_chunks, p, pdl)
        _hadamard_kernel[grid](xc, signs, y, n_chunks, k * m, 1.0 / math.sqrt(p), SIGNS_AFTER=inverse, USE_GDC=pdl,
                               **shape, **FUSED)
    if dense and not inverse:
        y = _dense_factor(_device_factor(rots, x.device, x.dtype, transpose=False), y, k, m, p)
    return y


def _dense_factor(factors: torch.Tensor, x: torch.Tensor, k: int, m: int, p: int) -> torch.Tensor:
    """Each slice's dense Kronecker factor (``factors`` [k, m, m], already in x's dtype) on the m axis of its
    [m, p] view."""
    return torch.einsum("kij,...kjb->...kib", factors, x.reshape(*x.shape[:-1], k, m, p)).reshape(x.shape)


@triton.jit
def _row_load(ptr, offs, MASK: tl.constexpr, rows):
    if MASK:  # the [M_PAD, P] view of a row of M blocks: rows M.. are padding
        return tl.load(ptr + offs, mask=rows, other=0.0)
    return tl.load(ptr + offs)


@triton.jit
def _residual_norm_kernel(y_ptr, r_ptr, w_ptr, su_ptr, sv_ptr, h_ptr, x_ptr, eps, scale, M: tl.constexpr,
                          M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, OUT_SIDE: tl.constexpr,
                          USE_GDC: tl.constexpr):
    """A row of N = M P values as [M_PAD, P]: M blocks of P for a block-diagonal transform (layout 3), one block
    (M = 1, P = N) for a power of two. OUT_SIDE: h = residual + y U, stored; else h = y (already the residual
    stream: a matmul without an output side added the residual in its epilogue) and only x is stored."""
    N: tl.constexpr = M * P
    MASK: tl.constexpr = M_PAD != M
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, M_PAD)[:, None]
    offs = offs_m * P + tl.arange(0, P)[None, :]
    rows = offs_m < M
    sv = _row_load(sv_ptr, offs, MASK, rows)
    w = _row_load(w_ptr, offs, MASK, rows).to(tl.float32)
    if OUT_SIDE:
        su = _row_load(su_ptr, offs, MASK, rows)
    if USE_GDC:  # y is the kernel before this one's output (the signs and the weight are constants)
        tl.extra.cuda.gdc_wait()
    y = _row_load(y_ptr + row * N, offs, MASK, rows)
    if OUT_SIDE:
        r = _row_load(r_ptr + row * N, offs, MASK, rows)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    if OUT_SIDE:
        t = y.to(tl.float32)  # y U = s * (H y), rounded as rotate_outputs rounds
        for i in tl.static_range(LOG_P):
            t = _fwht_stage(t, M_PAD, P, 1 << i)
        t = (t * su * scale).to(y.dtype)
        h = (t.to(tl.float32) + r.to(tl.float32)).to(y.dtype)
        if MASK:
            tl.store(h_ptr + row * N + offs, h, mask=rows)
        else:
            tl.store(h_ptr + row * N + offs, h)
    else:
        h = y
    hf = h.to(tl.float32)
    ms = tl.sum(tl.sum(hf * hf, axis=1), axis=0) / N
    hn = (hf * tl.rsqrt(ms + eps)).to(y.dtype)  # rms_norm_reference's rounding
    v = (w * hn.to(tl.float32)).to(y.dtype).to(tl.float32) * sv  # x V^T = H (s * x)
    for i in tl.static_range(LOG_P):
        v = _fwht_stage(v, M_PAD, P, 1 << i)
    if MASK:
        tl.store(x_ptr + row * N + offs, (v * scale).to(y.dtype), mask=rows)
    else:
        tl.store(x_ptr + row * N + offs, (v * scale).to(y.dtype))


def junction_fits(n: int, *rots) -> bool:  # noqa: ANN002 - RandomizedHadamards
    """Whether the junction kernel takes rows of length n with these transforms: of that length, one split, no
    dense factor (a power of two, or layout 3's blocks), at most 16K values a row (one program's registers)."""
    return (all((r.n, r.m, r.p, r.dense) == (n, rots[0].m, rots[0].p, False) for r in rots)
            and supported(rots[0].p) and triton.next_power_of_2(rots[0].m) * rots[0].p <= MAX_P)


def residual_norm(y: torch.Tensor, u, residual: torch.Tensor, weight: torch.Tensor, eps: float, v,  # noqa: ANN001
                  pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, x) with h = residual + y U (``u``'s inverse) and x = rms_norm(h, weight, eps) V^T (``v``'s transform),
    for rows of a power-of-two length n = u.n = v.n: one launch, one program per row."""
    if residual.shape != y.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not fit y {tuple(y.shape)}")
    return _junction(y, u, residual, weight, eps, v, pdl)


def norm_rotated(h: torch.Tensor, weight: torch.Tensor, eps: float, v, pdl: bool = False) -> torch.Tensor:  # noqa: ANN001
    """x = rms_norm(h, weight, eps) V^T for rows of a power-of-two length n = v.n in one launch: the junction of
    :func:`residual_norm` where the matmul before it has no output side (its GEMV added the residual already)."""
    return _junction(h, None, None, weight, eps, v, pdl)[1]


def _junction(y: torch.Tensor, u, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, v,  # noqa: ANN001
              pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = y.shape[-1]
    rots = (v,) if u is None else (u, v)
    if not junction_fits(n, *rots):
        raise ValueError(f"the junction needs transforms of the rows' length {n} without a dense factor, got "
                         f"{[(r.n, r.m, r.p, r.dense) for r in rots]}")
    if weight.shape != (n,):
        raise ValueError(f"norm weight {tuple(weight.shape)} does not fit rows of {n}")
    y2 = y.reshape(-1, n).contiguous()
    x, sv = torch.empty_like(y2), device_signs([v], y.device)
    h, r2, su = y2, y2, sv  # h, residual and U's signs: read by the kernel only with an output side
    if u is not None:
        h, r2, su = torch.empty_like(y2), residual.reshape(-1, n).to(y.dtype).contiguous(), device_signs([u], y.device)
    if y2.shape[0]:
        launch = {"launch_pdl": True} if pdl else {}
        m, p = v.m, v.p
        _residual_norm_kernel[(y2.shape[0],)](y2, r2, weight.contiguous(), su, sv, h, x,
                                              float(eps), 1.0 / math.sqrt(p), M=m, M_PAD=triton.next_power_of_2(m),
                                              P=p, LOG_P=p.bit_length() - 1, OUT_SIDE=u is not None, USE_GDC=pdl,
                                              num_warps=4 if n <= 1024 else 8 if n <= 4096 else 16, **launch,
                                              **FUSED)
    return h.reshape(y.shape), x.reshape(y.shape)


@torch.library.custom_op("lowbit::residual_norm_rotated", mutates_args=())
def residual_norm_op(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, n: int,
                     u_seed: int, v_seed: int, layout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`residual_norm` of the transforms (n, u_seed, layout) and (n, v_seed, layout), launched as
    :func:`hadamard` is."""
    return residual_norm(y, hadamard_of(n, u_seed, layout), residual, weight, eps, hadamard_of(n, v_seed, layout),
                         pdl=pdl_on(y.device))


@residual_norm_op.register_fake
def _residual_norm_shape(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, n: int,
                         u_seed: int, v_seed: int, layout: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(y), torch.empty_like(y)


@torch.library.custom_op("lowbit::norm_rotated", mutates_args=())
def norm_rotated_op(h: torch.Tensor, weight: torch.Tensor, eps: float, n: int, v_seed: int,
                    layout: int) -> torch.Tensor:
    """:func:`norm_rotated` of the transform (n, v_seed, layout), launched as :func:`hadamard` is."""
    return norm_rotated(h, weight, eps, hadamard_of(n, v_seed, layout), pdl=pdl_on(h.device))


@norm_rotated_op.register_fake
def _norm_rotated_shape(h: torch.Tensor, weight: torch.Tensor, eps: float, n: int, v_seed: int,
                        layout: int) -> torch.Tensor:
    return torch.empty_like(h)


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, n: int, seeds: list[int], layout: int, inverse: bool) -> torch.Tensor:
    """:func:`rotate_stacked` of the rotations (n, seed, layout) of ``seeds``, one slice of x each, launched as the
    GEMVs around it are (programmatic dependent launch inside ``cuda_gemv.early_launch`` on Hopper and later)."""
    return rotate_stacked([hadamard_of(n, s, layout) for s in seeds], x, inverse, pdl=pdl_on(x.device))


@hadamard.register_fake
def _hadamard_shape(x: torch.Tensor, n: int, seeds: list[int], layout: int, inverse: bool) -> torch.Tensor:
    return torch.empty_like(x)
