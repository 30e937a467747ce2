"""Pick the kernel for a packed weight: Triton where it runs (CUDA, or the Triton interpreter when asked),
the torch reference everywhere else. ``LOWBIT_KERNELS=reference`` forces the reference; ``=triton`` forces the
Triton path (on CPU that needs ``TRITON_INTERPRET=1``, which is how the CPU tests check the kernels).

The variable is read once at import; :func:`set_kernel_mode` changes it at run time (tests). Per call the
dispatch does a dict lookup for the format's cached decode plan (LUT on the device, decode mode) and picks:

* first, on CUDA with M <= 16 rows: :mod:`cuda_gemv` (tensor-core GEMV in CUDA C++, compiled by NVRTC at first
  use; one launch per 8 rows) for E8P and IQ2_XXS (rows a multiple of 64 long), the K-quants Q2_K .. Q6_K, and
  the 2- to 6-bit affine grids it decodes exactly (``LOWBIT_CUDA_GEMV=0`` turns it off; a weight whose kernel
  layout cannot be had goes on to the next path: :func:`_cuda_plan`);
* more than 8 rows (a prompt) of the formats below: the dense weight from the format's Triton dequantize kernel,
  then cuBLAS (:func:`dequantize`; on an H100 2-68x faster than the tile kernel or the float32 reference that
  served prompts before, docs/kernels.md "Prompt matmuls"; ``LOWBIT_DEQUANTIZE=0`` goes back to those);
* scalar formats (uniform 2..8 bits, level sets): M <= 8 rows -> :mod:`triton_gemv` (bandwidth-bound GEMV);
  with ``LOWBIT_DEQUANTIZE=0`` more rows -> :mod:`triton_uniform` (dequantize tiles + ``tl.dot``);
* E8P (``e8p_*``): M <= 8 -> :mod:`triton_e8p` GEMV (codebook gathered from an L2-resident fp16 table);
* IQ2_XXS (``iq2_xxs``): M <= 8 -> :mod:`triton_iq2xxs` GEMV (straight from llama.cpp's superblock bytes);
* k-quants (``q2_k`` .. ``q6_k``): M <= 8 -> :mod:`triton_kquants` GEMV;
* anything else (and E8P, IQ2_XXS and the k-quants with more rows and ``LOWBIT_DEQUANTIZE=0``): the reference.

:func:`rotate_input` is the same choice for the input-side randomized Hadamard of a rotated QuantLinear:
:mod:`triton_hadamard` (signs + FWHT in one launch) where Triton runs, else ``RandomizedHadamard.apply``; and
:func:`residual_norm_rotated` for the junction between two rotated matmuls (output side undone, residual, RMSNorm,
next input side): one :mod:`triton_hadamard` launch for power-of-two sizes, else those steps one by one; and
:func:`norm_rotated` for the same junction after a matmul without an output side (RMSNorm, next input side).
:func:`rope_cache_attention` picks the kernel of a decode step's attention: :mod:`cuda_attention` on Hopper for
fp16 steps without a mask, else :mod:`triton_decode_attention`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lowbit.formats import E8PFormat, Format, IQ2XXSFormat, KQuantFormat, QuantizedTensor, UniformFormat
from lowbit.kernels import cuda_gemv, cuda_jit, verified
from lowbit.kernels.reference import decode_lut, dequant_matmul_reference, rms_norm_reference

_MODES = ("auto", "reference", "triton")
_mode = os.environ.get("LOWBIT_KERNELS", "auto")
_CUDA_GEMV = os.environ.get("LOWBIT_CUDA_GEMV", "1") != "0"
_CUDA_ATTENTION = os.environ.get("LOWBIT_CUDA_ATTENTION", "1") != "0"
_DEQUANTIZE = os.environ.get("LOWBIT_DEQUANTIZE", "1") != "0"
_LAYOUTS_ONLY = os.environ.get("LOWBIT_LAYOUTS_ONLY", "1") != "0"


def set_kernel_mode(mode: str) -> None:
    """'auto' (Triton on CUDA), 'reference' (always torch) or 'triton' (always Triton; CPU needs the interpreter)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def kernel_mode() -> str:
    return _mode


# Whether Triton is installed, looked up once at import without importing it. A module constant rather than a cached
# function: torch.compile traces triton_runs, and Dynamo warns at every lru_cache-wrapped call it traces.
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def triton_runs(x: torch.Tensor, kernel: str = "") -> bool:
    """Whether a Triton kernel serves an input like ``x``: never in reference mode or without Triton, always with
    ``LOWBIT_KERNELS=triton``, else on CUDA unless ``kernel`` is still in :data:`verified.GPU_UNVERIFIED`."""
    if _mode == "reference" or not triton_available():
        return False
    return _mode == "triton" or (x.is_cuda and kernel not in verified.GPU_UNVERIFIED)


def _use_triton(x: torch.Tensor, fmt: Format) -> bool:
    if isinstance(fmt, KQuantFormat):
        return triton_runs(x, "kquants")
    if not isinstance(fmt, UniformFormat | E8PFormat | IQ2XXSFormat):
        return False
    return triton_runs(x, "iq2_xxs" if isinstance(fmt, IQ2XXSFormat) else "")


_PLANS: dict[tuple, tuple] = {}


def decode_plan(fmt: UniformFormat, device: torch.device) -> tuple[torch.Tensor, tuple]:
    """(lut on ``device``, (mode, a, b, levels)) for the GEMV kernel: affine lut[c] = a c + b when exact, else the
    4 levels of a 2-bit set, else a gather from the lut."""
    from lowbit.kernels.triton_gemv import AFFINE, GATHER, TABLE4

    key = (fmt.name, str(device))
    if key not in _PLANS:
        lut = decode_lut(fmt, torch.device("cpu"))
        a, b = float(lut[1] - lut[0]), float(lut[0])
        affine = torch.arange(len(lut), dtype=torch.float32) * a + b
        levels = (0.0, 0.0, 0.0, 0.0)
        if torch.equal(affine, lut):
            mode = AFFINE
        elif fmt.bits == 2:
            mode, levels = TABLE4, tuple(float(v) for v in lut)
        else:
            mode = GATHER
        _PLANS[key] = (decode_lut(fmt, device), (mode, a, b, levels))
    return _PLANS[key]


def cuda_gemv_plan(x: torch.Tensor, fmt: Format, shape: tuple[int, int]):  # noqa: ANN201 - Plan | None
    """The CUDA tensor-core GEMV's plan when it serves this call (CUDA, <= 16 rows, auto mode, NVRTC found, a
    format and shape it decodes exactly), else None. ``LOWBIT_CUDA_GEMV=0`` turns it off."""
    if _mode != "auto" or not _CUDA_GEMV or not x.is_cuda or x.dtype != torch.float16:
        return None
    rows = x.numel() // max(x.shape[-1], 1)
    if not 0 < rows <= cuda_gemv.MAX_ROWS:
        return None
    p = cuda_gemv.plan(fmt, shape) if cuda_jit.available() else None
    return None if p is not None and p.kind == 3 and f"cuda_{fmt.name}" in verified.GPU_UNVERIFIED else p


def _cuda_plan(x: torch.Tensor, fmt: Format, qt: QuantizedTensor):  # noqa: ANN202 - Plan | None
    """:func:`cuda_gemv_plan` for this weight, None where its kernel layout cannot be had
    (``cuda_gemv.layout_ready``: ``LOWBIT_CUDA_LAYOUTS=0``, or no device memory for it)."""
    p = cuda_gemv_plan(x, fmt, qt.shape)
    if p is None or (any(t.device != x.device for t in qt.data.values()) and _held(qt, x.device) is None):
        return None  # a weight in host memory without a layout here (a copy of a held one) takes _matmul's copy
    return p if cuda_gemv.layout_ready(fmt, qt, p) else None


def route(x: torch.Tensor, fmt: Format, shape: tuple[int, int]) -> str:
    """Which path :func:`dequant_matmul` takes for this input: 'cuda', 'triton' or 'reference' (for a weight whose
    kernel layout could not be had, 'cuda' means Triton's: :func:`_cuda_plan`)."""
    if cuda_gemv_plan(x, fmt, shape) is not None:
        return "cuda"
    return "triton" if _use_triton(x, fmt) else "reference"


Norm = tuple[torch.Tensor, float]  # an RMSNorm's (weight, eps)


def dequant_matmul(x: torch.Tensor, fmt: Format, qt: QuantizedTensor, norm: Norm | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for a packed weight; x [..., in] -> [..., out]. ``norm``: x is first RMS-normalized
    (:func:`rms_norm_reference`); ``residual`` [..., out]: y = residual + x W^T. The CUDA GEMV does both inside
    its one launch (a decode step's norm and residual add then need no kernels of their own); every other path
    computes them around the matmul, as the model would."""
    cplan = _cuda_plan(x, fmt, qt)
    if cplan is not None:
        res = None if residual is None else residual.reshape(-1, qt.shape[0])
        return _shaped_as(cuda_gemv.gemv(x.reshape(-1, x.shape[-1]), fmt, qt, cplan, norm=norm, residual=res), x)
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    y = _matmul(x, fmt, qt)
    return y if residual is None else residual + y


def _shaped_as(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The GEMV's [rows, out] fp16 result in ``x``'s leading shape and dtype (no op where it has them already)."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _matmul(x: torch.Tensor, fmt: Format, qt: QuantizedTensor) -> torch.Tensor:
    """y = x W^T through Triton where it runs, else the reference."""
    if any(t.device != x.device for t in qt.data.values()):  # stored bytes held in host memory (hold_layout)
        if _held(qt, x.device) is not None and triton_runs(x):
            return dense_matmul(x, fmt, qt)  # from the layout on the device
        qt = qt.to(x.device)  # no layout here: the stored bytes, copied for this call
    if not _use_triton(x, fmt):
        return dequant_matmul_reference(x, fmt, qt)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    from lowbit.kernels.launch import MAX_M

    gemv_sized = x2.shape[0] <= MAX_M
    n_out, n_in = qt.shape
    if not gemv_sized and _DEQUANTIZE and triton_runs(x, "dequantize"):  # a prompt: the dense weight, then cuBLAS
        return dense_matmul(x, fmt, qt)
    if isinstance(fmt, E8PFormat | IQ2XXSFormat | KQuantFormat) and not gemv_sized:
        return dequant_matmul_reference(x, fmt, qt)
    if isinstance(fmt, KQuantFormat):
        from lowbit.kernels import triton_kquants

        return triton_kquants.gemv(x2, qt.data["qs"], fmt, n_in).reshape(*lead, n_out)
    if isinstance(fmt, E8PFormat):
        from lowbit.kernels import triton_e8p

        y = triton_e8p.gemv(x2, qt.data["codes"], qt.data["scale"], fmt.group_cols(n_in), n_in)
        return y.reshape(*lead, n_out)
    if isinstance(fmt, IQ2XXSFormat):
        from lowbit.kernels import triton_iq2xxs

        return triton_iq2xxs.gemv(x2, qt.data["qs"], n_in).reshape(*lead, n_out)
    lut, decode = decode_plan(fmt, x.device)
    mins = qt.data.get("min")
    group = fmt.group_cols(n_in)
    if gemv_sized:
        from lowbit.kernels.triton_gemv import gemv

        y = gemv(x2, qt.data["codes"], qt.data["scale"], mins, lut, decode, fmt.bits, group, n_in)
    else:
        from lowbit.kernels.triton_uniform import dequant_matmul as gemm

        y = gemm(x2, qt.data["codes"], qt.data["scale"], mins, lut, fmt.bits, group, n_in)
    return y.reshape(*lead, n_out)


# A prompt's dense weight is built and multiplied in pieces of at most this many bytes, so the memory it holds stays
# bounded whatever the layer (a 70B model's fused gate/up is 940 MB in fp16, a 128k-vocabulary head 1-2 GB); the
# 7B and 8B shapes' largest fused group (180 and 235 MB) is one piece.
DENSE_PIECE_BYTES = 256 << 20


def dense_matmul(x: torch.Tensor, fmt: Format, qt: QuantizedTensor) -> torch.Tensor:
    """x W^T through :func:`dequantize` (or :func:`dequantize_layout` for a weight whose stored bytes are held in
    host memory) and cuBLAS, W in pieces of output rows of at most :data:`DENSE_PIECE_BYTES` (their outputs side by
    side)."""
    n_out, n_in = qt.shape
    rows = max(1, DENSE_PIECE_BYTES // (x.element_size() * n_in))
    layout = _held(qt, x.device)
    if layout is not None:
        def piece(start: int, stop: int) -> torch.Tensor:
            return dequantize_layout(fmt, qt, layout, start, stop, x.dtype)
    else:
        def piece(start: int, stop: int) -> torch.Tensor:
            return dequantize(fmt, qt if stop - start == n_out else qt.rows(start, stop), x.dtype)
    if rows >= n_out:
        return torch.nn.functional.linear(x, piece(0, n_out))
    return torch.cat([torch.nn.functional.linear(x, piece(r, min(r + rows, n_out))) for r in range(0, n_out, rows)],
                     dim=-1)


def hold_layout(fmt: Format, qt: QuantizedTensor) -> dict[str, torch.Tensor] | None:
    """For a GPU weight the CUDA GEMV reads from a kernel layout (K-quants, IQ2_XXS, the 3-, 5- and 6-bit grids):
    the layout built on the device and the stored tensor copied to host memory, returned ({key: host tensor}) for
    the caller to put in the device tensor's place, so the weight takes the layout's memory on the device instead
    of twice its size (:func:`lowbit.kernels.cuda_gemv.hold`). Decode steps read the layout, prompts decode their
    dense weight from it (:func:`dequantize_layout`), saving and export read the host copy. None (nothing to do)
    for formats read as stored, where the CUDA GEMV or Triton does not serve, or with ``LOWBIT_LAYOUTS_ONLY=0``."""
    stored = next(iter(qt.data.values()))
    if (not _LAYOUTS_ONLY or not _DEQUANTIZE or not stored.is_cuda or _mode != "auto" or not _CUDA_GEMV
            or "layouts_only" in verified.GPU_UNVERIFIED or not triton_available()):
        return None
    p = cuda_gemv.plan(fmt, qt.shape) if cuda_jit.available() else None
    return None if p is None else cuda_gemv.hold(fmt, qt, p)


def release_layout(t: torch.Tensor) -> None:
    """Drop the kernel layout :func:`hold_layout` keeps on a GPU for the host tensor ``t`` (none: nothing)."""
    if not t.is_cuda:
        cuda_gemv.release(t)


def _held(qt: QuantizedTensor, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """The kernel layout on ``device`` of a weight whose stored bytes :func:`hold_layout` moved to host memory (the
    one tensor of ``qt`` off ``device``: the layout's key in :mod:`cuda_gemv`)."""
    t = next((t for t in qt.data.values() if t.device != device), None)
    if t is None or device.type != "cuda":
        return None
    hit = cuda_gemv.held(t)
    return hit[0] if hit is not None and hit[1] == device else None


def dequantize_layout(fmt: Format, qt: QuantizedTensor, layout: tuple[torch.Tensor, ...], start: int, stop: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of the dense weight in ``dtype`` from its kernel layout (:func:`_held`), by
    :mod:`triton_layouts`: the same values as :func:`dequantize` from the stored bytes."""
    from lowbit.kernels import triton_layouts

    part = [t[start:stop] for t in layout]
    n_in = qt.shape[1]
    if isinstance(fmt, IQ2XXSFormat):
        return triton_layouts.iq2xxs(*part, n_in, dtype)
    low = part[0]
    lb = low.shape[1] * 32 // n_in  # the low plane's bits per code (2 or 4)
    if isinstance(fmt, KQuantFormat):
        return triton_layouts.kquant(*part, lb, fmt.bits - lb, "dmin" in fmt.halves, n_in, dtype)
    hi = part[1]
    mins = qt.data.get("min")
    return triton_layouts.affine(low, hi, qt.data["scale"][start:stop], None if mins is None else mins[start:stop],
                                 decode_lut(fmt, low.device), lb, fmt.bits - lb, fmt.group_cols(n_in), n_in, dtype)


def dequantize(fmt: Format, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of a packed weight in ``dtype``, for a prompt's matmul through cuBLAS: written by one Triton
    kernel with the decode of the format's own kernels (E8P, IQ2_XXS, the k-quants, the scalar grids), each value
    the reference's float32 decode rounded once; other formats through the reference."""
    n_in = qt.shape[1]
    if isinstance(fmt, KQuantFormat):
        from lowbit.kernels import triton_kquants

        return triton_kquants.dequantize(qt.data["qs"], fmt, n_in, dtype)
    if isinstance(fmt, E8PFormat):
        from lowbit.kernels import triton_e8p

        return triton_e8p.dequantize(qt.data["codes"], qt.data["scale"], fmt.group_cols(n_in), n_in, dtype)
    if isinstance(fmt, IQ2XXSFormat):
        from lowbit.kernels import triton_iq2xxs

        return triton_iq2xxs.dequantize(qt.data["qs"], n_in, dtype)
    if isinstance(fmt, UniformFormat):
        from lowbit.kernels import triton_uniform

        lut = decode_lut(fmt, qt.data["codes"].device)
        return triton_uniform.dequantize(qt.data["codes"], qt.data["scale"], qt.data.get("min"), lut, fmt.bits,
                                         fmt.group_cols(n_in), n_in, dtype)
    return fmt.dequantize(qt).to(dtype)


def gated_matmul(x: torch.Tensor, fmt: Format, qt: QuantizedTensor, norm: Norm | None = None) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for a fused [gate; up] packed weight (2N rows); x [..., in] -> [..., N]. The CUDA
    GEMV computes it in its epilogue, from fp32 sums; elsewhere it is :func:`dequant_matmul`, then F.silu * up.
    ``norm`` as in :func:`dequant_matmul`."""
    cplan = _cuda_plan(x, fmt, qt)
    if cplan is not None and qt.shape[0] % 2 == 0 and triton_runs(x, "gated_gemv"):
        return _shaped_as(cuda_gemv.gemv(x.reshape(-1, x.shape[-1]), fmt, qt, cplan, gated=True, norm=norm), x)
    gate, up = dequant_matmul(x, fmt, qt, norm=norm).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_rotated(gu: torch.Tensor, rot) -> torch.Tensor:  # noqa: ANN001 - a RandomizedHadamard
    """(silu(gate) * up) R^T for gu = [gate, up] (a fused gate/up matmul's output, its output sides undone): one
    Triton launch where Triton runs and R has no dense factor (:func:`triton_hadamard.silu_mul_rotated`), else the
    product (rounded as eager torch rounds it) and :func:`rotate_input`."""
    if triton_runs(gu, "silu_mul_rotated") and gu.is_floating_point():
        from lowbit.kernels import triton_hadamard

        if not rot.dense and triton_hadamard.supported(rot.p) and gu.shape[-1] == 2 * rot.n:
            if torch.compiler.is_compiling():
                return triton_hadamard.silu_mul_rotated_op(gu, rot.n, rot.seed, rot.layout)
            return triton_hadamard.silu_mul_rotated(gu, rot, pdl=cuda_gemv.pdl_on(gu.device))
    gate, up = gu.chunk(2, dim=-1)
    return rotate_input(rot, torch.nn.functional.silu(gate) * up)


def rotate_input(rot, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - a RandomizedHadamard
    """x @ R^T for a rotated QuantLinear's input side: the Triton kernel where Triton runs (same rule as the
    matmul: CUDA, or ``LOWBIT_KERNELS=triton``), else exactly ``rot.apply(x)`` (the torch reference)."""
    if not triton_runs(x, "hadamard"):
        return rot.apply(x)
    from lowbit.kernels import triton_hadamard

    if not triton_hadamard.supported(rot.p) or not x.is_floating_point():
        return rot.apply(x)
    return _hadamard_kernel([rot], x, inverse=False)


def rotate_output(rot, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - a RandomizedHadamard
    """y @ R for a rotated QuantLinear's output side (the inverse of :func:`rotate_input`'s transform): the Triton
    kernel where Triton runs, else exactly ``rot.inverse(y)``."""
    return rotate_outputs([rot], y)


def rotate_outputs(rots: list, y: torch.Tensor) -> torch.Tensor:
    """The output sides of k linears whose outputs sit side by side in y [..., k * n] (a fused group's members,
    every ``rots[j]`` of size n and one split): each slice @ its R, in one kernel launch where Triton runs
    (:func:`triton_hadamard.rotate_stacked`), else exactly each slice's ``rot.inverse``."""
    if triton_runs(y, "hadamard") and y.is_floating_point():
        from lowbit.kernels import triton_hadamard

        if triton_hadamard.supported(rots[0].p):
            return _hadamard_kernel(rots, y, inverse=True)
    if len(rots) == 1:
        return rots[0].inverse(y)
    return torch.cat([r.inverse(part) for r, part in zip(rots, y.split(rots[0].n, dim=-1), strict=True)], dim=-1)


def _hadamard_kernel(rots: list, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """:func:`triton_hadamard.rotate_stacked` launched the way the GEMVs around it are (programmatic dependent
    launch inside :func:`cuda_gemv.early_launch` on Hopper and later); under torch.compile as the opaque op
    ``lowbit::hadamard``, which Inductor calls as it is (traced as a user Triton kernel it would launch it plainly)."""
    from lowbit.kernels import triton_hadamard

    if torch.compiler.is_compiling():
        return triton_hadamard.hadamard(x, rots[0].n, [r.seed for r in rots], rots[0].layout, inverse)
    return triton_hadamard.rotate_stacked(rots, x, inverse, pdl=cuda_gemv.pdl_on(x.device))



def residual_norm_rotated(y: torch.Tensor, u, residual: torch.Tensor, norm: Norm,  # noqa: ANN001 - u, v: transforms
                          v) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(h, x): h = residual + y U (a rotated linear's output side undone, the residual added) and x = rms_norm(h)
    V^T (the next rotated linear's input): one Triton launch where Triton runs and both are transforms of the rows'
    length without a dense factor (:func:`triton_hadamard.residual_norm`), else the same steps one by one."""
    if triton_runs(y, "residual_norm" if u.m == 1 else "junction_blocks") and y.is_floating_point():
        from lowbit.kernels import triton_hadamard

        if triton_hadamard.junction_fits(y.shape[-1], u, v):
            if torch.compiler.is_compiling():
                return triton_hadamard.residual_norm_op(y, residual, norm[0], float(norm[1]), u.n, u.seed, v.seed,
                                                        u.layout)
            return triton_hadamard.residual_norm(y, u, residual, norm[0], norm[1], v, pdl=cuda_gemv.pdl_on(y.device))
    h = residual + rotate_output(u, y)
    return h, rotate_input(v, rms_norm_reference(h, *norm))


def norm_rotated(h: torch.Tensor, norm: Norm | None, v) -> torch.Tensor:  # noqa: ANN001 - v: a transform
    """rms_norm(h) V^T (a rotated linear's input, where the matmul before it left the residual stream ``h``
    complete): one Triton launch where Triton runs and V is a transform of the rows' length without a dense factor
    (:func:`triton_hadamard.norm_rotated`), else the norm and the transform one after the other; without ``norm``
    :func:`rotate_input`."""
    if norm is None:
        return rotate_input(v, h)
    if triton_runs(h, "norm_rotated" if v.m == 1 else "junction_blocks") and h.is_floating_point():
        from lowbit.kernels import triton_hadamard

        if triton_hadamard.junction_fits(h.shape[-1], v):
            if torch.compiler.is_compiling():
                return triton_hadamard.norm_rotated_op(h, norm[0], float(norm[1]), v.n, v.seed, v.layout)
            return triton_hadamard.norm_rotated(h, norm[0], norm[1], v, pdl=cuda_gemv.pdl_on(h.device))
    return rotate_input(v, rms_norm_reference(h, *norm))


def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None, scale: float,
                         heads: int) -> torch.Tensor:
    """The one-kernel attention step of a decode step (``triton_decode_attention.rope_cache_attention``; check its
    ``step_supported`` first): the CUDA kernel of :mod:`cuda_attention` where it serves the call (Hopper, fp16, no
    mask; launched the way the GEMVs around it are, :func:`cuda_gemv.pdl_on`), else the Triton one.
    ``LOWBIT_CUDA_ATTENTION=0`` keeps the Triton kernel everywhere."""
    from lowbit.kernels import cuda_attention
    from lowbit.kernels import triton_decode_attention as attention

    if _CUDA_ATTENTION and "cuda_attention" not in verified.GPU_UNVERIFIED and \
            cuda_attention.serves(qkv, cos, sin, k_cache, v_cache, mask):
        return cuda_attention.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, length, scale, heads,
                                                   early=cuda_gemv.pdl_on(qkv.device))
    return attention.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, length, mask, scale, heads)
