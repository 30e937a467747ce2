"""The online randomized-Hadamard kernel (:mod:`lowbit.kernels.triton_hadamard`) against
``RandomizedHadamard.apply``, and its wiring into QuantLinear.forward through ``dispatch.rotate_input``: under
Triton's interpreter on CPU (one subprocess per script) and on CUDA when there is a GPU. Without either, the CPU path
must stay exactly the torch reference. Both kernels (butterfly and tensor core) are checked: the interpreter runs the
tensor-core kernel in float16 (its numpy tl.dot gets bfloat16 wrong, so bfloat16 is checked on the GPU only)."""


import pytest
import torch

from conftest import run_in_interpreter
from lowbit.kernels.dispatch import rotate_input, rotate_output, triton_available
from lowbit.rotations.hadamard import RandomizedHadamard

# sizes: powers of two (one launch), 576 = 72 x 8 and 96 = 12 x 8 (Hadamard Kronecker factor after the
# kernel), 448 = 7 x 64 (random orthogonal factor); batch shapes incl. leading dims and more chunks than a block
CASES = [(n, b) for n in (64, 256, 576, 1024) for b in ([1], [3], [2, 5])] + [(96, [4]), (448, [3]),
                                                                             (64, [70]), (4096, [2])]

_SCRIPT = r"""
import json, sys
import torch
from lowbit.kernels.dispatch import rotate_input, rotate_output
from lowbit.rotations.hadamard import RandomizedHadamard
g = torch.Generator().manual_seed(5)
out = {}
for n, batch in json.loads(sys.argv[1]):
    rot = RandomizedHadamard(n, seed=n + 1)
    x = torch.randn(*batch, n, generator=g)
    y = rotate_input(rot, x)
    ref = x.double() @ rot.matrix().double().T if n <= 1024 else rot.apply(x.double())
    ok = tuple(y.shape) == tuple(x.shape) and y.dtype == x.dtype
    out[f"{n}:{batch}"] = ((y.double() - ref).norm() / ref.norm()).item() if ok else float("inf")
    out[f"{n}:{batch}:apply"] = ((y - rot.apply(x)).norm() / rot.apply(x).norm()).item()
    z = rotate_output(rot, x)  # the inverse: x @ R
    ref = x.double() @ rot.matrix().double() if n <= 1024 else rot.inverse(x.double())
    ok = tuple(z.shape) == tuple(x.shape) and z.dtype == x.dtype
    out[f"{n}:{batch}:inverse"] = ((z.double() - ref).norm() / ref.norm()).item() if ok else float("inf")
# QuantLinear with an input- and output-side rotation, IQ2_XXS weight: kernel rotation + kernel GEMV
from lowbit.formats import get_format
from lowbit.models.quant_linear import QuantLinear
from lowbit.rotations.incoherence import Rotation
for name, (o, i) in [("iq2_xxs", (16, 256)), ("int4_g32_sym", (24, 576))]:
    fmt = get_format(name)
    rot = Rotation.for_layer("layer", 0)
    q = QuantLinear.from_quantized(fmt.quantize(rot.rotate_weight(torch.randn(o, i, generator=g))),
                                   torch.randn(o, generator=g), rot)
    x = torch.randn(3, i, generator=g)
    ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double())
    out[f"quant_linear:{name}"] = ((q(x).double() - ref).norm() / ref.norm()).item()
print(json.dumps(out))
"""


# the tensor-core kernel: p in {256, 512, 1024, 2048, 4096, 8192, 16384} (a = b and a = 2b), m = 1, m = 12 (the
# class's Hadamard factor) and m = 3 (a random orthogonal factor forced on the instance: any (m, p) must work)
TC_CASES = [(n, m, rows) for n, m in ((256, 1), (1024, 1), (4096, 1), (3072, 12), (12288, 12), (768, 3),
                                      (3072, 3), (12288, 3)) for rows in (1, 5)]
TC_CASES += [(512, 1, 1), (2048, 1, 3), (8192, 1, 1), (16384, 1, 1), (64 * 16, 64, 1)]  # 64 x 16: butterflies

_TC_SCRIPT = r"""
import json, sys
import torch
from lowbit.kernels import triton_hadamard as th
from lowbit.rotations.hadamard import RandomizedHadamard

def with_split(n, m, seed):
    rot = RandomizedHadamard(n, seed=seed)
    if rot.m != m:  # the reference reads m, p and factor off the instance too
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        rot.m, rot.p, rot.factor = m, n // m, (q * torch.sign(torch.diagonal(r))).float()
    return rot

g = torch.Generator().manual_seed(11)
out = {}
for n, m, rows in json.loads(sys.argv[1]):
    rot = with_split(n, m, seed=n + m)
    assert (rot.m, rot.p) == (m, n // m)
    x = torch.randn(rows, n, generator=g)
    x[0, torch.randint(0, n, (3,), generator=g)] = torch.tensor([3000.0, -3000.0, 2500.0])  # outlier channels
    x = x.half()
    for inverse in (False, True):
        ref = (rot.inverse if inverse else rot.apply)(x.double())
        errs = {}
        for path in ("butterfly", "auto"):
            th.PATH = path
            y = th.rotate(rot, x, inverse=inverse)
            ok = y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape) and bool(torch.isfinite(y).all())
            errs[path] = ((y.double() - ref).norm() / ref.norm()).item() if ok else float("inf")
        out[f"{n}:{m}:{rows}:{inverse}"] = [errs["butterfly"], errs["auto"], th.choose_path(rot.p, x.dtype)]
# adversarial for the overflow: 32 channels of one V row at 3000 with aligned signs, so that an unscaled T = V @ H_b
# would hold 96000 (> float16's 65504); the output holds 3000 * 32 / 64 = 1500
rot = RandomizedHadamard(4096, seed=2)
for inverse in (False, True):
    x = torch.zeros(2, 4096)
    x[:, 64:96] = 3000.0 * (1 if inverse else rot.signs[64:96])
    x = x.half()
    th.PATH = "tensor_core"
    y = th.rotate(rot, x, inverse=inverse)
    ref = (rot.inverse if inverse else rot.apply)(x.double())
    out[f"aligned:{inverse}"] = (((y.double() - ref).norm() / ref.norm()).item()
                                 if bool(torch.isfinite(y).all()) else float("inf"))
out["interpreter_bfloat16_path"] = th.choose_path(4096, torch.bfloat16, "auto")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES)


@pytest.mark.parametrize("n,batch", CASES, ids=[f"n{n}-b{'x'.join(map(str, b))}" for n, b in CASES])
def test_hadamard_kernel_in_interpreter_matches_reference(interpreter_results, n, batch):
    assert interpreter_results[f"{n}:{batch}"] < 1e-5
    assert interpreter_results[f"{n}:{batch}:apply"] < 1e-5
    assert interpreter_results[f"{n}:{batch}:inverse"] < 1e-5  # the output side: signs after the butterflies


@pytest.mark.parametrize("name", ["iq2_xxs", "int4_g32_sym"])
def test_rotated_quant_linear_in_interpreter(interpreter_results, name):
    assert interpreter_results[f"quant_linear:{name}"] < 1e-5


@pytest.fixture(scope="module")
def interpreter_tc_results():
    return run_in_interpreter(_TC_SCRIPT, TC_CASES)


@pytest.mark.parametrize("n,m,rows", TC_CASES, ids=[f"n{n}-m{m}-r{r}" for n, m, r in TC_CASES])
@pytest.mark.parametrize("inverse", [False, True], ids=["apply", "inverse"])
def test_tensor_core_kernel_in_interpreter(interpreter_tc_results, n, m, rows, inverse):
    """float16 with outlier channels (3000): both kernels finite and within float16 rounding of the float64
    reference; the tensor-core one (auto, p >= 256) as close as the butterflies (its hi/lo split keeps T's bits:
    without the lo term its error is ~1.5x theirs)."""
    butterfly, tc, path = interpreter_tc_results[f"{n}:{m}:{rows}:{inverse}"]
    assert path == ("tensor_core" if n // m >= 256 else "butterfly")
    assert butterfly < 1e-3 and tc < 1e-3
    assert tc <= 1.1 * butterfly + 1e-6


@pytest.mark.parametrize("inverse", [False, True], ids=["apply", "inverse"])
def test_tensor_core_kernel_outliers_do_not_overflow_in_interpreter(interpreter_tc_results, inverse):
    assert interpreter_tc_results[f"aligned:{inverse}"] < 1e-3


def test_interpreter_keeps_bfloat16_on_the_butterflies(interpreter_tc_results):
    assert interpreter_tc_results["interpreter_bfloat16_path"] == "butterfly"  # its numpy bfloat16 dot is wrong


def test_kernel_path_choice_and_tensor_core_split():
    pytest.importorskip("triton")
    from lowbit.kernels import triton_hadamard as th

    assert th.choose_path(4096, torch.float16, "auto") == "tensor_core"
    assert th.choose_path(256, torch.bfloat16, "auto") == "tensor_core"
    assert th.choose_path(128, torch.float16, "auto") == "butterfly"
    assert th.choose_path(4096, torch.float32, "auto") == "butterfly"
    assert th.choose_path(4096, torch.float16, "butterfly") == "butterfly"
    with pytest.raises(ValueError):
        th.choose_path(4096, torch.float32, "tensor_core")
    with pytest.raises(ValueError):
        th.choose_path(128, torch.float16, "tensor_core")
    with pytest.raises(ValueError):
        th.choose_path(4096, torch.float16, "fast")
    for k in range(8, 15):
        p = 1 << k
        a, b = th._tc_shape(p)
        assert a * b == p and a in (b, 2 * b) and b >= 16
        for n_chunks in (1, 3, 12, 1000):
            block_n, _ = th._tc_config(n_chunks, a, b)
            assert b % block_n == 0 and block_n >= th.TC_MIN_BLOCK_N


def test_dense_factor_is_cast_once_per_device_and_dtype():
    """F_m in x's dtype is cached (a per-call cast would launch a copy kernel in every decode step)."""
    pytest.importorskip("triton")
    from lowbit.kernels import triton_hadamard as th

    rot = RandomizedHadamard(576, seed=4)
    f16 = th._device_factor(rot, torch.device("cpu"), torch.float16, transpose=False)
    assert f16 is th._device_factor(rot, torch.device("cpu"), torch.float16, transpose=False)
    assert f16.dtype == torch.float16 and torch.equal(f16, rot.factor.half())
    ft = th._device_factor(rot, torch.device("cpu"), torch.float32, transpose=True)
    assert ft.is_contiguous() and torch.equal(ft, rot.factor.t())


def test_rotate_input_on_cpu_is_exactly_the_reference():
    from lowbit.kernels import dispatch

    if dispatch.kernel_mode() == "triton" or torch.cuda.is_available():
        pytest.skip("only the CPU auto/reference path")
    rot = RandomizedHadamard(576, seed=3)
    x = torch.randn(4, 576)
    assert torch.equal(rotate_input(rot, x), rot.apply(x))
    assert torch.equal(rotate_output(rot, x), rot.inverse(x))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs a CUDA GPU and triton")


@needs_gpu
@pytest.mark.parametrize("n", [64, 256, 576, 1024, 3072, 4096, 11008, 14336, 16384])
@pytest.mark.parametrize("batch", [1, 8, 33])
@pytest.mark.parametrize("dtype,path", [(torch.float32, "auto"), (torch.float16, "auto"),
                                        (torch.float16, "butterfly"), (torch.bfloat16, "auto"),
                                        (torch.bfloat16, "butterfly")])
def test_hadamard_kernel_on_gpu(n, batch, dtype, path, monkeypatch):
    from lowbit.kernels import triton_hadamard as th

    monkeypatch.setattr(th, "PATH", path)  # auto: the tensor cores for 16-bit x and p >= 256
    rot = RandomizedHadamard(n, seed=7)
    x = torch.randn(batch, n, device="cuda").to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for y, ref in ((rotate_input(rot, x), rot.apply(x.double().cpu())),
                   (rotate_output(rot, x), rot.inverse(x.double().cpu()))):
        assert y.dtype == dtype and ((y.double() - ref.to("cuda")).norm() / ref.norm()) < tol


def _with_split(n: int, m: int, seed: int) -> RandomizedHadamard:
    """RandomizedHadamard(n) with the split forced to (m, n / m) and a random orthogonal F_m when the class picks
    another (the reference reads m, p and factor off the instance too): the kernel must take any split."""
    rot = RandomizedHadamard(n, seed=seed)
    if rot.m != m:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        rot.m, rot.p, rot.factor = m, n // m, (q * torch.sign(torch.diagonal(r))).float()
    return rot


@needs_gpu
@pytest.mark.parametrize("n,m", [(256, 1), (1024, 1), (4096, 1), (3072, 12), (12288, 12), (768, 3), (3072, 3),
                                 (12288, 3), (512, 1), (2048, 1), (8192, 1), (16384, 1), (11008, 43),
                                 (14336, 7)])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True], ids=["apply", "inverse"])
def test_tensor_core_kernel_on_gpu(n, m, rows, dtype, inverse, monkeypatch):
    """The tensor-core kernel against the float64 reference and as close as the butterflies, with outlier
    channels (3000) in the input: finite, and within the 16-bit output's own rounding."""
    from lowbit.kernels import triton_hadamard as th

    rot = _with_split(n, m, seed=n + m)
    g = torch.Generator(device="cuda").manual_seed(n + rows)
    x = torch.randn(rows, n, device="cuda", generator=g)
    x[:, torch.randint(0, n, (3,), device="cuda", generator=g)] = 3000.0
    x = x.to(dtype)
    ref = (rot.inverse if inverse else rot.apply)(x.double().cpu()).cuda()
    errs = {}
    for path in ("butterfly", "tensor_core"):
        monkeypatch.setattr(th, "PATH", path)
        y = th.rotate(rot, x, inverse=inverse)
        assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
        errs[path] = float((y.double() - ref).norm() / ref.norm())
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    assert errs["butterfly"] < tol and errs["tensor_core"] < tol
    assert errs["tensor_core"] <= 1.1 * errs["butterfly"] + 1e-6, errs


@needs_gpu
@pytest.mark.parametrize("inverse", [False, True], ids=["apply", "inverse"])
def test_tensor_core_kernel_aligned_outliers_on_gpu(inverse, monkeypatch):
    """32 channels of one V row at 3000 with aligned signs: an unscaled T = V @ H_b would hold 96000 (> float16's
    65504); scaled by 1 / sqrt(b) before the hi/lo split it holds 12000, and the output 1500."""
    from lowbit.kernels import triton_hadamard as th

    monkeypatch.setattr(th, "PATH", "tensor_core")
    rot = RandomizedHadamard(4096, seed=2)
    x = torch.zeros(2, 4096)
    x[:, 64:96] = 3000.0 * (1 if inverse else rot.signs[64:96])
    x = x.half().cuda()
    y = th.rotate(rot, x, inverse=inverse)
    ref = (rot.inverse if inverse else rot.apply)(x.double().cpu()).cuda()
    assert torch.isfinite(y).all() and float((y.double() - ref).norm() / ref.norm()) < 1e-3
