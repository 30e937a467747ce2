"""Triton online randomized Hadamard: x -> x R^T for R = (F_m kron H_p) diag(signs) (:mod:`lowbit.rotations.hadamard`).

The input is viewed as [rows * m, p] (chunk c takes row c % m of the [m, p] signs table); one launch does the random
signs and the whole Walsh-Hadamard transform of every length-p chunk, by one of two kernels:

* butterfly (``_hadamard_kernel``; float32 and other non-16-bit inputs, and p < 256): each program loads BLOCK_C
  consecutive chunks, multiplies by the signs, runs the log2(p) butterfly stages in registers (reshape to [BLOCK_C,
  p / 2h, 2, h], split the pair axis, join (a + b, a - b)), scales by 1 / sqrt(p) and stores once, in float32
  whatever x's dtype. Exact to float32 rounding, but each stage is a layout shuffle through shared memory, and they
  run one after another: at batch 1 a 4096-long row is ONE program doing 12 dependent shuffles (measured on an H200
  in a 7B decode step, the ``+rht`` variant ran at 0.45x the speed of the same format without rotation).
* tensor core (``_hadamard_tc_kernel``; float16/bfloat16 inputs with 256 <= p <= MAX_P): in Sylvester order H_p =
  H_a kron H_b (p = a b, a = b or 2b, both >= 16), so with a chunk viewed row-major as V [a, b], (H_a kron H_b)
  vec(V) = vec(H_a V H_b). A program computes T = V @ H_b[:, cols] and Y = H_a @ T with two ``tl.dot`` (float32
  accumulate), the +-1 matrices built in registers from indices (H[i, j] = (-1)^popcount(i & j), exact in the input
  dtype). T is float32 and the second dot takes 16-bit operands, so T is split into hi = T.to(dtype) and lo = (T -
  hi).to(dtype) and Y = H_a @ hi + H_a @ lo: ~22 (float16) / 16 (bfloat16) bits of T survive, below the output's own
  rounding. T is scaled by 1 / sqrt(b) before the split and Y by 1 / sqrt(a) after (float32 scalars): T / sqrt(b) is
  the orthonormal transform of V's rows, each entry at most the 2-norm of its column of the output Y (a values), so
  float16 outliers (~1e3 in real activations) do not overflow the hi/lo operands (an unscaled T sums up to b of
  them: 32 aligned channels of 3000 make 96000). At small batch one chunk's columns are split over several programs
  (each recomputes its T columns from the whole V, a few KB from L2), so a single 4096-long row is not a single
  serial program.

``PATH`` ("auto", "butterfly" or "tensor_core") forces one kernel for tests and A/B benchmarks. When m > 1, the
small dense Kronecker factor F_m is applied by one torch einsum (after the kernel; before it for the inverse, as
the reference does), with F_m cached per (device, dtype) so that no cast runs per call; such sizes take two
launches, power-of-two sizes (m = 1) exactly one. Not fused into the GEMV kernels (a separate launch).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lowbit.kernels.launch import INTERPRET

MAX_P = 1 << 14  # a chunk lives in one program's registers (larger p: the torch reference)
CHUNK_ELEMS = 2048  # elements per program when p is small (BLOCK_C chunks of p)
TC_MIN_P = 256  # the tensor-core kernel from p = 16 x 16 up (tl.dot needs every dimension >= 16)
TC_DTYPES = (torch.float16, torch.bfloat16)  # float32 keeps the butterflies (a float32 dot would be TF32 or slow)
TC_TARGET_PROGRAMS = 128  # split a chunk's columns over programs until about this many run (small batches)
TC_MIN_BLOCK_N = 16  # the narrowest column block of a tensor-core program (tl.dot's minimum N)
PATHS = ("auto", "butterfly", "tensor_core")
PATH = "auto"  # which kernel rotate() uses: "auto" (tensor cores where supported), or force one (tests, A/B)


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
                     BLOCK_C: tl.constexpr, SIGNS_AFTER: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, P)
    cmask = (offs_c < n_chunks)[:, None]
    offs = offs_c.to(tl.int64)[:, None] * P + offs_p[None, :]
    v = tl.load(x_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    s = tl.load(signs_ptr + (offs_c % m)[:, None] * P + offs_p[None, :], mask=cmask, other=0.0)
    if not SIGNS_AFTER:  # x R^T = H (s * x); its inverse y R = s * (H y) (H symmetric)
        v = v * s
    for i in tl.static_range(LOG_P):
        v = _fwht_stage(v, BLOCK_C, P, 1 << i)
    if SIGNS_AFTER:
        v = v * s
    tl.store(y_ptr + offs, (v * scale).to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _sylvester(rows, cols):
    """The +-1 Sylvester-Hadamard entries H[rows, cols] = (-1)^popcount(rows & cols) (indices < 2^16), float32."""
    x = rows[:, None] & cols[None, :]
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return tl.where((x & 1) != 0, -1.0, 1.0)


@triton.jit
def _hadamard_tc_kernel(x_ptr, signs_ptr, y_ptr, m, scale_b, scale_a, A: tl.constexpr, B: tl.constexpr,
                        BLOCK_N: tl.constexpr, SIGNS_AFTER: tl.constexpr):
    """Chunk program_id(0) as V [A, B] (row-major), output columns program_id(1) * BLOCK_N + [0, BLOCK_N):
    Y[:, cols] = H_A @ (V @ H_B[:, cols]) / sqrt(A B) on tensor cores, float32 accumulate (float16/bfloat16 x)."""
    c = tl.program_id(0)
    rows = tl.arange(0, A)
    ks = tl.arange(0, B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = c.to(tl.int64) * (A * B)
    srow = (c % m) * (A * B)  # the chunk's row of the [m, p] signs table
    v = tl.load(x_ptr + base + rows[:, None] * B + ks[None, :])
    if not SIGNS_AFTER:  # x R^T = H (s * x): +-1 signs are exact in the input dtype
        v = (v.to(tl.float32) * tl.load(signs_ptr + srow + rows[:, None] * B + ks[None, :])).to(v.dtype)
    t = tl.dot(v, _sylvester(ks, cols).to(v.dtype)) * scale_b  # [A, BLOCK_N] float32: V's rows, orthonormal
    hi = t.to(v.dtype)  # the second dot takes 16-bit operands: T = hi + lo to ~2x the dtype's mantissa
    lo = (t - hi.to(tl.float32)).to(v.dtype)
    h_a = _sylvester(rows, rows).to(v.dtype)
    y = tl.dot(h_a, hi)
    y = tl.dot(h_a, lo, y) * scale_a
    out = rows[:, None] * B + cols[None, :]
    if SIGNS_AFTER:  # the inverse y R = s * (H y) (H symmetric)
        y = y * tl.load(signs_ptr + srow + out)
    tl.store(y_ptr + base + out, y.to(y_ptr.dtype.element_ty))


_SIGNS: dict[tuple, torch.Tensor] = {}  # the [m, p] float32 signs table per rotation and device
_FACTORS: dict[tuple, torch.Tensor] = {}  # F_m (or F_m^T), contiguous, per rotation, device and dtype


def supported(n_p: int) -> bool:
    """Whether the kernel handles a power-of-two part of this length (else the caller uses the reference)."""
    return 2 <= n_p <= MAX_P


def tensor_core_supported(n_p: int, dtype: torch.dtype) -> bool:
    """Whether the tensor-core kernel handles chunks of length n_p (a power of two) in this dtype (not bfloat16
    under TRITON_INTERPRET=1: the interpreter's numpy tl.dot computes bfloat16 products wrongly)."""
    if INTERPRET and dtype == torch.bfloat16:
        return False
    return TC_MIN_P <= n_p <= MAX_P and n_p & (n_p - 1) == 0 and dtype in TC_DTYPES


def choose_path(n_p: int, dtype: torch.dtype, path: str | None = None) -> str:
    """The kernel for chunks of length n_p in dtype: ``path`` (default: the module's ``PATH``) unless "auto", else
    the tensor cores where supported and the butterflies otherwise. Forcing an unsupported one raises."""
    path = PATH if path is None else path
    if path not in PATHS:
        raise ValueError(f"unknown Hadamard kernel path {path!r}; one of {PATHS}")
    if path == "auto":
        return "tensor_core" if tensor_core_supported(n_p, dtype) else "butterfly"
    if path == "tensor_core" and not tensor_core_supported(n_p, dtype):
        raise ValueError(f"the tensor-core Hadamard kernel needs float16/bfloat16 and a power-of-two p in "
                         f"[{TC_MIN_P}, {MAX_P}], got p={n_p}, {dtype}")
    return path


def _rot_key(rot) -> tuple:  # noqa: ANN001
    # (n, seed) alone no longer determines the split once RandomizedHadamard has layouts: key on what the kernel reads
    return rot.n, rot.seed, rot.m, rot.p, str(getattr(rot, "layout", None))


def _device_signs(rot, device: torch.device) -> torch.Tensor:  # noqa: ANN001
    key = (*_rot_key(rot), str(device))
    if key not in _SIGNS:
        _SIGNS[key] = rot.signs.float().contiguous().to(device)
    return _SIGNS[key]


def _device_factor(rot, device: torch.device, dtype: torch.dtype, transpose: bool) -> torch.Tensor:  # noqa: ANN001
    """F_m (F_m^T with ``transpose``) on the device in x's dtype, built once: a per-call ``.to(dtype)`` would launch
    a copy kernel in every decode step."""
    key = (*_rot_key(rot), str(device), dtype, transpose)
    if key not in _FACTORS:
        f = rot.factor.float()
        _FACTORS[key] = (f.t() if transpose else f).contiguous().to(device=device, dtype=dtype)
    return _FACTORS[key]


def _tc_shape(p: int) -> tuple[int, int]:
    """p = a * b with b = 2^floor(log2(p) / 2) and a = p / b (a = b or 2b), both >= 16 for p >= 256."""
    b = 1 << ((p.bit_length() - 1) // 2)
    return p // b, b


def _tc_config(n_chunks: int, a: int, b: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): split each chunk's b output columns over programs while there are fewer than
    TC_TARGET_PROGRAMS of them (batch-1 decode: one or a few chunks), down to TC_MIN_BLOCK_N columns."""
    splits = 1
    while b // (2 * splits) >= TC_MIN_BLOCK_N and n_chunks * splits < TC_TARGET_PROGRAMS:
        splits *= 2
    block_n = b // splits
    num_warps = 4 if a * max(a, b) <= 4096 and a * block_n <= 4096 else 8
    return block_n, num_warps


def rotate(rot, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:  # noqa: ANN001 - a RandomizedHadamard
    """x @ R^T along the last dimension, as ``rot.apply(x)`` computes it (float32 accumulation inside); with
    ``inverse``, x @ R as ``rot.inverse(x)`` does (the dense factor F_m^T first, then the kernel with the signs
    after the transform: the two act on different axes of the [m, p] view, so their order is free). The kernel is
    the module's ``PATH`` (see :func:`choose_path`)."""
    if x.shape[-1] != rot.n:
        raise ValueError(f"last dimension {x.shape[-1]} != rotation size {rot.n}")
    m, p = rot.m, rot.p
    if not supported(p):
        raise ValueError(f"power-of-two part {p} outside the kernel's range")
    path = choose_path(p, x.dtype)
    signs = _device_signs(rot, x.device)
    if inverse and m > 1:
        x = _dense_factor(_device_factor(rot, x.device, x.dtype, transpose=True), x, m, p)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n_chunks = xc.numel() // p
    if n_chunks and path == "tensor_core":
        a, b = _tc_shape(p)
        block_n, num_warps = _tc_config(n_chunks, a, b)
        _hadamard_tc_kernel[(n_chunks, b // block_n)](xc, signs, y, m, 1.0 / math.sqrt(b), 1.0 / math.sqrt(a),
                                                     A=a, B=b, BLOCK_N=block_n, SIGNS_AFTER=inverse,
                                                     num_warps=num_warps)
    elif n_chunks:
        block_c = max(1, min(triton.next_power_of_2(n_chunks), CHUNK_ELEMS // p))
        num_warps = 4 if p * block_c <= 2048 else 8 if p * block_c <= 8192 else 16
        _hadamard_kernel[(triton.cdiv(n_chunks, block_c),)](xc, signs, y, n_chunks, m, 1.0 / math.sqrt(p), P=p,
                                                            LOG_P=p.bit_length() - 1, BLOCK_C=block_c,
                                                            SIGNS_AFTER=inverse, num_warps=num_warps)
    if m > 1 and not inverse:
        y = _dense_factor(_device_factor(rot, x.device, x.dtype, transpose=False), y, m, p)
    return y


def _dense_factor(factor: torch.Tensor, x: torch.Tensor, m: int, p: int) -> torch.Tensor:
    """The small dense Kronecker factor F_m (or its transpose, already in x's dtype) on the m axis of x's [m, p]
    view."""
    return torch.einsum("ij,...jb->...ib", factor, x.reshape(*x.shape[:-1], m, p)).reshape(x.shape)
