"""The junction between two ``+rht`` matmuls (:func:`lowbit.kernels.triton_hadamard.residual_norm`): output side
undone, residual added, RMSNorm, next input side in one Triton launch, against the same steps in float64 (Triton's
interpreter on CPU, one subprocess; CUDA when there is a GPU); on the CPU without Triton the steps one by one. The
same for the junction after a matmul without an output side (:func:`lowbit.kernels.triton_hadamard.norm_rotated`:
RMSNorm and input side)."""

import pytest
import torch

from conftest import run_in_interpreter
from lowbit.kernels import dispatch
from lowbit.rotations.hadamard import LAYOUT, RandomizedHadamard

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not dispatch.triton_available(),
                               reason="needs a CUDA GPU with Triton")

CASES = [(n, b) for n in (64, 256, 2048) for b in ([1], [3], [2, 2])]
BLOCKS = [768, 1280]  # layout 3: 3 and 5 FWHT blocks of 256

_TRUTH = r"""
import torch
from lowbit.rotations.hadamard import RandomizedHadamard

def truth(y, u, r, w, eps, v):
    h = r.double() + u.inverse(y.double())
    return h, v.apply(w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

def rel(a, b):
    ok = a.shape == b.shape and bool(torch.isfinite(a).all())
    return ((a.double() - b).norm() / b.norm()).item() if ok else float("inf")

def inputs(n, batch, g, dtype, layout=2):
    y, r = torch.randn(*batch, n, generator=g).to(dtype), (4 * torch.randn(*batch, n, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(n, generator=g)).to(dtype)
    return y, r, w, RandomizedHadamard(n, seed=3, layout=layout), RandomizedHadamard(n, seed=4, layout=layout)

def error(y, r, w, u, v):
    from lowbit.kernels.dispatch import residual_norm_rotated
    h, x = residual_norm_rotated(y, u, r, (w, 1e-5), v)
    th, tx = truth(y, u, r, w, 1e-5, v)
    return max(rel(h, th), rel(x, tx)) if h.dtype == x.dtype == y.dtype else float("inf")

def norm_error(h, w, v, norm_rotated):
    x = norm_rotated(h, w, 1e-5, v)
    hd = h.double()
    tx = v.apply(w.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5))
    return rel(x, tx) if x.dtype == h.dtype else float("inf")
"""

_SCRIPT = _TRUTH + r"""
import json, sys
gen = torch.Generator().manual_seed(11)
out = {}
from lowbit.kernels.triton_hadamard import norm_rotated
for n, batch in json.loads(sys.argv[1]):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out[f"{n}:{batch}:{str(dtype)[6:]}"] = error(*inputs(n, batch, gen, dtype))
        y, r, w, u, v = inputs(n, batch, gen, dtype)
        out[f"norm {n}:{batch}:{str(dtype)[6:]}"] = norm_error(r, w, v, norm_rotated)
# rows of layout 3's blocks (768 = 3 x 256, 1280 = 5 x 256: a [4 or 8, 256] view, padding rows masked)
for n in BLOCKS:
    for dtype in (torch.float16, torch.float32):
        y, r, w, u, v = inputs(n, [3], gen, dtype, layout=3)
        assert u.m > 1 and not u.dense
        out[f"blocks {n}:{str(dtype)[6:]}"] = error(y, r, w, u, v)
        out[f"norm blocks {n}:{str(dtype)[6:]}"] = norm_error(r, w, v, norm_rotated)
# activations with outlier channels of a few thousand (the bundled model has them): float32 inside, finite
y, r, w, u, v = inputs(4096, [2], gen, torch.float16)
r[:, :8], y[:, :8] = 3000.0, 2000.0
out["outliers"] = error(y, r, w, u, v)
out["norm outliers"] = norm_error(r, w, v, norm_rotated)
# the custom op torch.compile traces = the function
from lowbit.kernels.triton_hadamard import residual_norm
y, r, w, u, v = inputs(256, [3], gen, torch.float16)
h, x = torch.ops.lowbit.residual_norm_rotated(y, r, w, 1e-5, 256, 3, 4, 2)
h2, x2 = residual_norm(y, u, r, w, 1e-5, v)
out["op"] = max((h - h2).abs().max().item(), (x - x2).abs().max().item())
x = torch.ops.lowbit.norm_rotated(r, w, 1e-5, 256, 4, 2)
out["norm op"] = (x - norm_rotated(r, w, 1e-5, v)).abs().max().item()
print(json.dumps(out))
"""

TOL = {"float16": 3e-3, "bfloat16": 2.5e-2, "float32": 1e-5}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT.replace("BLOCKS", repr(BLOCKS)), CASES)


@pytest.mark.parametrize("kind", ["", "norm "], ids=["residual_norm", "norm_rotated"])
@pytest.mark.parametrize("n,batch", CASES, ids=[f"n{n}-b{'x'.join(map(str, b))}" for n, b in CASES])
@pytest.mark.parametrize("dtype", list(TOL))
def test_junction_in_interpreter_matches_the_steps_in_float64(interpreter_results, kind, n, batch, dtype):
    assert interpreter_results[f"{kind}{n}:{batch}:{dtype}"] < TOL[dtype]


@pytest.mark.parametrize("kind", ["", "norm "], ids=["residual_norm", "norm_rotated"])
@pytest.mark.parametrize("n", BLOCKS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_junction_of_blocks_in_interpreter_matches_the_steps_in_float64(interpreter_results, kind, n, dtype):
    assert interpreter_results[f"{kind}blocks {n}:{dtype}"] < TOL[dtype]


@pytest.mark.parametrize("kind", ["", "norm "], ids=["residual_norm", "norm_rotated"])
def test_junction_with_outlier_channels_and_its_op_in_interpreter(interpreter_results, kind):
    assert interpreter_results[f"{kind}outliers"] < TOL["float16"]
    assert interpreter_results[f"{kind}op"] == 0.0


def test_junction_on_cpu_is_the_steps_one_by_one():
    """Without Triton (the CPU default), and for sizes with a dense factor anywhere, the junction is exactly the
    separate steps a rotated layer ran before."""
    from lowbit.kernels.reference import rms_norm_reference

    g = torch.Generator().manual_seed(0)
    for n in (256, 448):  # 448 = 7 x 64: a dense factor
        u, v = RandomizedHadamard(n, seed=1, layout=LAYOUT), RandomizedHadamard(n, seed=2, layout=LAYOUT)
        y, r = torch.randn(2, n, generator=g).half(), torch.randn(2, n, generator=g).half()
        w = (1 + 0.1 * torch.randn(n, generator=g)).half()
        h, x = dispatch.residual_norm_rotated(y, u, r, (w, 1e-6), v)
        assert torch.equal(h, r + u.inverse(y))
        assert torch.equal(x, v.apply(rms_norm_reference(h, w, 1e-6)))
        assert torch.equal(dispatch.norm_rotated(r, (w, 1e-6), v), v.apply(rms_norm_reference(r, w, 1e-6)))


def test_junction_kernel_refuses_a_dense_factor():
    from lowbit.kernels.triton_hadamard import norm_rotated, residual_norm

    u, v = RandomizedHadamard(448, seed=1, layout=LAYOUT), RandomizedHadamard(448, seed=2, layout=LAYOUT)
    y = torch.zeros(1, 448, dtype=torch.float16)
    with pytest.raises(ValueError, match="length 448 without a dense factor"):
        residual_norm(y, u, y, torch.ones(448, dtype=torch.float16), 1e-5, v)
    with pytest.raises(ValueError, match="length 448 without a dense factor"):
        norm_rotated(y, torch.ones(448, dtype=torch.float16), 1e-5, v)


@needs_gpu
@pytest.mark.parametrize("output_side", [True, False])
@pytest.mark.parametrize("n", [1024, 4096, 8192, 16384])
@pytest.mark.parametrize("batch", [1, 8, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_junction_on_gpu(output_side, n, batch, dtype):
    """With and without an output side (residual_norm, norm_rotated): the kernels dispatch sends a rotated layer's
    junctions to on CUDA, against the float64 steps (passed on an H200:
    benchmarks/results/norm-rotated-gpu-h200.txt)."""
    from lowbit.kernels.triton_hadamard import norm_rotated

    ns: dict = {}
    exec(_TRUTH, ns)  # noqa: S102 - the float64 steps shared with the interpreter script
    y, r, w, u, v = (t.cuda() if isinstance(t, torch.Tensor) else t
                     for t in ns["inputs"](n, [batch], torch.Generator().manual_seed(n), dtype))
    err = ns["error"](y, r, w, u, v) if output_side else ns["norm_error"](r, w, v, norm_rotated)
    assert err < TOL[str(dtype)[6:]]


@needs_gpu
@pytest.mark.parametrize("output_side", [True, False])
@pytest.mark.parametrize("n", [3072, 3584, 5120, 11008, 13824, 14336])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_junction_blocks_on_gpu(output_side, n, batch, dtype):
    """Rows of layout 3's blocks (3 x 1024 .. 43 x 256, 27 x 512, 7 x 2048): the kernel dispatch sends such
    junctions to once ``junction_blocks`` leaves ``verified.GPU_UNVERIFIED``, called directly here."""
    from lowbit.kernels.triton_hadamard import norm_rotated, residual_norm

    ns: dict = {}
    exec(_TRUTH, ns)  # noqa: S102
    y, r, w, u, v = (t.cuda() if isinstance(t, torch.Tensor) else t
                     for t in ns["inputs"](n, [batch], torch.Generator().manual_seed(n), dtype, 3))
    assert u.m > 1 and not u.dense
    if output_side:
        h, x = residual_norm(y, u, r, w, 1e-5, v)
        th, tx = ns["truth"](y.cpu(), u, r.cpu(), w.cpu(), 1e-5, v)
        err = max(ns["rel"](h.cpu(), th), ns["rel"](x.cpu(), tx))
    else:
        err = ns["norm_error"](r, w, v, norm_rotated)
    assert err < TOL[str(dtype)[6:]]


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_junction_launched_early_gives_the_plain_result():
    """Launched behind a kernel that writes its input (one CUDA graph, programmatic dependent launch): it waits for
    that input, so it gives the plain launch's result bit for bit."""
    from lowbit.kernels.cuda_gemv import early_launch
    from lowbit.kernels.triton_hadamard import residual_norm

    n = 4096
    u, v = RandomizedHadamard(n, seed=1, layout=LAYOUT), RandomizedHadamard(n, seed=2, layout=LAYOUT)
    src, r = torch.randn(2, 4, n, generator=torch.Generator().manual_seed(3)).half().cuda()
    w = torch.ones(n, device="cuda").half()
    plain = residual_norm(src * 2, u, r, w, 1e-5, v)
    y = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    with early_launch(True):
        torch.mul(src, 2.0, out=y)  # warm-up outside the capture (Triton compiles)
        dispatch.residual_norm_rotated(y, u, r, (w, 1e-5), v)
        torch.cuda.synchronize()
        y.zero_()
        with torch.cuda.graph(graph):
            torch.mul(src, 2.0, out=y)
            h, x = dispatch.residual_norm_rotated(y, u, r, (w, 1e-5), v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(h, plain[0]) and torch.equal(x, plain[1])


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_norm_rotated_launched_early_gives_the_plain_result():
    from lowbit.kernels.cuda_gemv import early_launch
    from lowbit.kernels.triton_hadamard import norm_rotated

    n = 4096
    v = RandomizedHadamard(n, seed=2, layout=LAYOUT)
    src = torch.randn(4, n, generator=torch.Generator().manual_seed(3)).half().cuda()
    w = torch.ones(n, device="cuda").half()
    plain = norm_rotated(src * 2, w, 1e-5, v)
    y = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    with early_launch(True):
        torch.mul(src, 2.0, out=y)
        norm_rotated(y, w, 1e-5, v, pdl=True)
        torch.cuda.synchronize()
        y.zero_()
        with torch.cuda.graph(graph):
            torch.mul(src, 2.0, out=y)
            x = norm_rotated(y, w, 1e-5, v, pdl=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, plain)
