"""The IQ2_XXS GEMV kernel (:mod:`lowbit.kernels.triton_iq2xxs`) against the torch reference, on fresh random
weights quantized with the format and fresh random inputs: under Triton's interpreter on CPU (one subprocess,
TRITON_INTERPRET=1 is read at import) and on CUDA when there is a GPU."""


import pytest
import torch

from conftest import run_in_interpreter
from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul, triton_available
from lowbit.kernels.reference import dequant_matmul_reference

# rows of one and two full superblocks, a short last superblock (576 = 2 x 256 + 64), a row shorter than one
# superblock (96 = 3 sub-blocks), a row count that is not a multiple of the row block; M = 9 -> the reference
CASES = [((6, 256), 1), ((6, 256), 3), ((6, 256), 8), ((5, 512), 1), ((5, 512), 3), ((5, 512), 8),
         ((7, 576), 1), ((7, 576), 3), ((7, 576), 8), ((3, 96), 2), ((9, 320), 9)]

_SCRIPT = r"""
import json, sys
import torch
from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul
g = torch.Generator().manual_seed(11)
fmt = get_format("iq2_xxs")
out = {}
for shape, m in json.loads(sys.argv[1]):
    qt = fmt.quantize(torch.randn(*shape, generator=g))
    x = torch.randn(m, shape[1], generator=g)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    ok = tuple(y.shape) == tuple(ref.shape) and bool(torch.isfinite(y).all())
    out[f"{shape[0]}x{shape[1]}:{m}"] = ((y.double() - ref).norm() / ref.norm()).item() if ok else float("inf")
# leading dims flattened by the dispatch
qt = fmt.quantize(torch.randn(8, 256, generator=g))
x = torch.randn(2, 3, 256, generator=g)
ref = x.double() @ fmt.dequantize(qt).double().T
out["lead_dims"] = ((dequant_matmul(x, fmt, qt).double() - ref).norm() / ref.norm()).item()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES, parts=1)  # a few cases: a second process costs more


@pytest.mark.parametrize("shape,m", CASES, ids=[f"{s[0]}x{s[1]}-m{m}" for s, m in CASES])
def test_iq2xxs_kernel_in_interpreter_matches_reference(interpreter_results, shape, m):
    assert interpreter_results[f"{shape[0]}x{shape[1]}:{m}"] < 1e-5


def test_iq2xxs_dispatch_flattens_leading_dims(interpreter_results):
    assert interpreter_results["lead_dims"] < 1e-5


def test_iq2xxs_tables_come_from_the_format():
    from lowbit.formats.iq2xxs import tables
    from lowbit.kernels.triton_iq2xxs import device_tables

    grid, ksigns = tables()
    g16, ks = device_tables(torch.device("cpu"))
    assert torch.equal(g16.float().reshape(256, 8), grid) and torch.equal(ks.long(), ksigns)


def test_iq2xxs_dispatch_uses_reference_without_cuda(monkeypatch):
    from lowbit.kernels import dispatch

    if dispatch.kernel_mode() != "auto":
        pytest.skip("LOWBIT_KERNELS set")
    fmt = get_format("iq2_xxs")
    g = torch.Generator().manual_seed(2)
    qt = fmt.quantize(torch.randn(4, 256, generator=g))
    x = torch.randn(2, 256, generator=g)
    if not torch.cuda.is_available():
        assert torch.equal(dequant_matmul(x, fmt, qt), dequant_matmul_reference(x, fmt, qt))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs a CUDA GPU and triton")


@needs_gpu
@pytest.mark.parametrize("shape,m", CASES + [((1024, 4096), 1), ((1024, 4096), 8), ((512, 11008), 3)])
def test_iq2xxs_kernel_on_gpu(shape, m):
    fmt = get_format("iq2_xxs")
    g = torch.Generator().manual_seed(4)
    qt = fmt.quantize(torch.randn(*shape, generator=g).to("cuda"))
    x = torch.randn(m, shape[1], generator=g).to("cuda", torch.float16)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    assert y.shape == ref.shape and ((y.double() - ref).norm() / ref.norm()) < 1e-2
