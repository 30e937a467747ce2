"""The k-quant GEMV kernel (:mod:`lowbit.kernels.triton_kquants`) against the format's own decode, on fresh random
weights quantized with each k-quant and fresh random inputs: under Triton's interpreter on CPU (one subprocess,
TRITON_INTERPRET=1 is read at import; through the dispatch, as a model's QuantLinear calls it) and on CUDA when
there is a GPU."""

import pytest
import torch

from conftest import run_in_interpreter
from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul, triton_available
from lowbit.kernels.reference import dequant_matmul_reference

NAMES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# one superblock, two, three (a row of 768: quarter superblocks 0..11), a row count off the row block; M = 9: the
# reference
SHAPES = [((6, 256), 1), ((5, 512), 3), ((9, 768), 8), ((3, 256), 9)]
CASES = [(name, shape, m) for name in NAMES for shape, m in SHAPES]

_SCRIPT = r"""
import json, sys
import torch
from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul, route
g = torch.Generator().manual_seed(13)
out = {}
for name, shape, m in json.loads(sys.argv[1]):
    fmt = get_format(name)
    w = torch.randn(*shape, generator=g)
    w[:, ::37] *= 6  # a few large columns: sub-block scales and mins of very different sizes
    qt = fmt.quantize(w)
    x = torch.randn(m, shape[1], generator=g)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    ok = tuple(y.shape) == tuple(ref.shape) and bool(torch.isfinite(y).all())
    err = ((y.double() - ref).norm() / ref.norm()).item() if ok else float("inf")
    out[f"{name}:{shape[0]}x{shape[1]}:{m}"] = [err, route(x, fmt, qt.shape)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES)


@pytest.mark.parametrize(("name", "shape", "m"), CASES, ids=[f"{n}-{s[0]}x{s[1]}-m{m}" for n, s, m in CASES])
def test_kquant_kernel_in_interpreter_matches_the_format(interpreter_results, name, shape, m):
    err, path = interpreter_results[f"{name}:{shape[0]}x{shape[1]}:{m}"]
    assert path == "triton"  # (M = 9 then takes the reference inside the dispatch)
    assert err < 1e-5


def test_kquants_take_the_reference_on_the_cpu_in_auto_mode():
    """In auto mode (no interpreter) a CPU input goes through the reference."""
    from lowbit.kernels import dispatch

    if dispatch.kernel_mode() != "auto":
        pytest.skip("LOWBIT_KERNELS set")
    fmt = get_format("q4_k")
    qt = fmt.quantize(torch.randn(4, 256, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    assert dispatch.route(x, fmt, qt.shape) == "reference"
    assert torch.equal(dequant_matmul(x, fmt, qt), dequant_matmul_reference(x, fmt, qt))


def test_kquant_gemv_refuses_a_row_of_another_length():
    from lowbit.kernels import triton_kquants

    if not triton_available():
        pytest.skip("triton not installed")
    fmt = get_format("q6_k")
    qt = fmt.quantize(torch.randn(4, 512, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="does not match"):
        triton_kquants.gemv(torch.zeros(1, 256), qt.data["qs"], fmt, 256)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs a CUDA GPU and triton")


@needs_gpu
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("shape", "m"), [((48, 768), 1), ((512, 4096), 1), ((512, 4096), 8), ((256, 11008), 3)])
def test_kquant_kernel_on_gpu(name, shape, m):
    """The compiled kernel (autotuned) against the float64 product with the format's decode, fp16 activations with
    outlier channels."""
    from lowbit.kernels import triton_kquants

    fmt = get_format(name)
    g = torch.Generator().manual_seed(m + shape[1])
    qt = fmt.quantize(torch.randn(*shape, generator=g) * 0.02)
    qs = qt.data["qs"].cuda()
    x = torch.randn(m, shape[1], generator=g)
    x[:, ::211] *= 300  # massive activation channels, as the bundled model has
    x = x.to("cuda", torch.float16)
    y = triton_kquants.gemv(x, qs, fmt, shape[1])
    ref = x.double() @ fmt.dequantize(qt).double().cuda().T
    assert y.shape == ref.shape and float((y.double() - ref).norm() / ref.norm()) < 2e-3
