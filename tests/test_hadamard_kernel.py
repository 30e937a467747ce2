"""The online randomized-Hadamard kernel (:mod:`lowbit.kernels.triton_hadamard`) against
``RandomizedHadamard.apply``, and its wiring into QuantLinear.forward through ``dispatch.rotate_input``: under
Triton's interpreter on CPU (two subprocesses) and on CUDA when there is a GPU. Without either, the CPU path must
stay exactly the torch reference."""


import pytest
import torch

from conftest import run_scripts_in_interpreter
from lowbit.kernels.dispatch import rotate_input, rotate_output, triton_available
from lowbit.rotations.hadamard import RandomizedHadamard

# sizes: powers of two (one launch), 576 = 72 x 8 and 96 = 12 x 8 (Hadamard Kronecker factor after the
# kernel), 448 = 7 x 64 (random orthogonal factor); batch shapes incl. leading dims and more chunks than a block
CASES = [(n, b) for n in (64, 256, 576, 1024) for b in ([1], [3], [2, 5])] + [(96, [4]), (448, [3]),
                                                                             (64, [70]), (4096, [2])]

# (n, k) for k stacked rotations: 576 = 72 x 8 and 448 = 7 x 64 (dense factors, batched), 1024 (none)
STACKED = [(576, 3), (448, 2), (1024, 2)]

# silu_mul_rotated: (n, rows, layout): a power of two, 43 blocks of 256, 11 blocks of 256 over 3 rows
SILU = [(1024, 2, 3), (11008, 1, 3), (2816, 3, 3)]

# the block-diagonal layout 3 (no dense factor): 11008 = 43 blocks of 256, 2816 = 11 of 256; (n, k stacked)
BLOCKWISE = [(11008, 1), (2816, 3)]

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
# float16 with outlier channels (real activations reach ~1e3): float32 inside, so finite and within fp16 rounding
for n in (4096, 11008):
    rot = RandomizedHadamard(n, seed=9, layout=2)
    x = torch.randn(2, n, generator=g)
    x[:, :32] = 3000.0
    x = x.half()
    for key, f, ref in (("apply", rotate_input, rot.apply), ("inverse", rotate_output, rot.inverse)):
        y, r = f(rot, x), ref(x.double())
        ok = bool(torch.isfinite(y).all()) and y.dtype == torch.float16
        out[f"fp16:{n}:{key}"] = ((y.double() - r).norm() / r.norm()).item() if ok else float("inf")
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
# the rest in a second process beside the first (the interpreter runs on one core)
_FUSED_SCRIPT = r"""
import json, sys
import torch
from lowbit.rotations.hadamard import RandomizedHadamard
g = torch.Generator().manual_seed(5)
out = {}
# k rotations of one split on k slices in one launch (a fused group's output sides) = each slice on its own;
# layout 3 (block-diagonal): the kernel alone, no matmul after it, also through the op
from lowbit.kernels.triton_hadamard import rotate_stacked
for name, cases, seed, layout in (("stacked", STACKED, 10, 2), ("blockwise", BLOCKWISE, 40, 3)):
    for n, k in cases:
        rots = [RandomizedHadamard(n, seed=seed + j, layout=layout) for j in range(k)]
        x = torch.randn(3, k * n, generator=g)
        for key, inverse in (("inverse", True), ("apply", False)):
            ref = torch.cat([(r.inverse if inverse else r.apply)(part.double()) for r, part in
                             zip(rots, x.split(n, dim=-1))], dim=-1)
            rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
            out[f"{name}:{n}:{k}:{key}"] = rel(rotate_stacked(rots, x, inverse=inverse))
            if layout == 3:
                out[f"blockwise-op:{n}:{k}:{key}"] = rel(torch.ops.lowbit.hadamard(x, n, [seed + j for j in range(k)],
                                                                                   3, inverse))
# silu(gate) * up and down's input side in one launch (the product rounded as eager torch rounds it)
from lowbit.kernels.triton_hadamard import silu_mul_rotated
for n, rows, layout in SILU:
    rot = RandomizedHadamard(n, seed=50, layout=layout)
    for dtype in (torch.float16, torch.float32):
        gu = (3 * torch.randn(rows, 2 * n, generator=g)).to(dtype)
        gate, up = gu.double().chunk(2, dim=-1)
        ref = rot.apply(torch.nn.functional.silu(gate) * up)
        y = silu_mul_rotated(gu, rot)
        ok = y.dtype == dtype and y.shape == (rows, n)
        out[f"silu:{n}:{rows}:{str(dtype)[6:]}"] = ((y.double() - ref).norm() / ref.norm()).item() if ok else 9.0
        y2 = torch.ops.lowbit.silu_mul_rotated(gu, n, 50, layout)
        out[f"silu-op:{n}:{rows}:{str(dtype)[6:]}"] = (y2 - y).abs().max().item()
# the custom op torch.compile traces (lowbit::hadamard, registered by triton_hadamard) = the stacked kernel
for n, k in STACKED:
    rots = [RandomizedHadamard(n, seed=30 + j, layout=2) for j in range(k)]
    x = torch.randn(2, k * n, generator=g)
    for key, inverse in (("inverse", True), ("apply", False)):
        y = torch.ops.lowbit.hadamard(x, n, [30 + j for j in range(k)], 2, inverse)
        ref = rotate_stacked(rots, x, inverse=inverse)
        out[f"op:{n}:{k}:{key}"] = float("inf") if y.shape != x.shape else (y - ref).abs().max().item()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    fused = _FUSED_SCRIPT.replace("STACKED", repr(STACKED)).replace("BLOCKWISE", repr(BLOCKWISE))
    return run_scripts_in_interpreter([(_SCRIPT, (CASES,)), (fused.replace("SILU", repr(SILU)), ())])


@pytest.mark.parametrize("n,batch", CASES, ids=[f"n{n}-b{'x'.join(map(str, b))}" for n, b in CASES])
def test_hadamard_kernel_in_interpreter_matches_reference(interpreter_results, n, batch):
    assert interpreter_results[f"{n}:{batch}"] < 1e-5
    assert interpreter_results[f"{n}:{batch}:apply"] < 1e-5
    assert interpreter_results[f"{n}:{batch}:inverse"] < 1e-5  # the output side: signs after the butterflies


@pytest.mark.parametrize("name", ["iq2_xxs", "int4_g32_sym"])
def test_rotated_quant_linear_in_interpreter(interpreter_results, name):
    assert interpreter_results[f"quant_linear:{name}"] < 1e-5


@pytest.mark.parametrize("n,k", STACKED)
@pytest.mark.parametrize("side", ["inverse", "apply"])
def test_stacked_rotations_in_interpreter(interpreter_results, n, k, side):
    assert interpreter_results[f"stacked:{n}:{k}:{side}"] < 1e-5


@pytest.mark.parametrize("n,k", STACKED)
@pytest.mark.parametrize("side", ["inverse", "apply"])
def test_hadamard_op_is_the_stacked_kernel(interpreter_results, n, k, side):
    assert interpreter_results[f"op:{n}:{k}:{side}"] == 0.0


@pytest.mark.parametrize("n,k", BLOCKWISE)
@pytest.mark.parametrize("side", ["inverse", "apply"])
def test_block_diagonal_rotations_in_interpreter(interpreter_results, n, k, side):
    assert interpreter_results[f"blockwise:{n}:{k}:{side}"] < 1e-5
    assert interpreter_results[f"blockwise-op:{n}:{k}:{side}"] < 1e-5


@pytest.mark.parametrize("n,rows,layout", SILU)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_silu_mul_rotated_in_interpreter(interpreter_results, n, rows, layout, dtype):
    assert interpreter_results[f"silu:{n}:{rows}:{dtype}"] < {"float16": 2e-3, "float32": 1e-5}[dtype]
    assert interpreter_results[f"silu-op:{n}:{rows}:{dtype}"] == 0.0


def test_silu_mul_rotated_falls_back_to_the_steps():
    """On the CPU path, and for a transform with a dense factor anywhere, the product then rotate_input, exactly."""
    from lowbit.kernels.dispatch import silu_mul_rotated

    g = torch.Generator().manual_seed(2)
    for rot in (RandomizedHadamard(11008, seed=1, layout=2), RandomizedHadamard(1024, seed=1, layout=3)):
        gu = torch.randn(2, 2 * rot.n, generator=g).half()
        gate, up = gu.chunk(2, dim=-1)
        want = rotate_input(rot, torch.nn.functional.silu(gate) * up)
        if rot.dense or not torch.cuda.is_available():
            assert torch.equal(silu_mul_rotated(gu, rot), want)
    pytest.importorskip("triton")
    from lowbit.kernels.triton_hadamard import silu_mul_rotated as kernel

    with pytest.raises(ValueError, match="without a dense factor"):
        kernel(torch.zeros(1, 22016), RandomizedHadamard(11008, seed=1, layout=2))
    with pytest.raises(ValueError, match="2 x 1024"):
        kernel(torch.zeros(1, 1024), RandomizedHadamard(1024, seed=1, layout=3))


def test_stacked_rotations_refuse_mixed_splits():
    pytest.importorskip("triton")
    from lowbit.kernels.triton_hadamard import rotate_stacked

    with pytest.raises(ValueError, match="one split"):
        rotate_stacked([RandomizedHadamard(576), RandomizedHadamard(448)], torch.randn(1, 1024))
    with pytest.raises(ValueError, match="one split"):  # 43 x 256 both, one with a dense factor
        rotate_stacked([RandomizedHadamard(11008, layout=2), RandomizedHadamard(11008, layout=3)],
                       torch.randn(1, 22016))
    with pytest.raises(ValueError, match="last dimension"):
        rotate_stacked([RandomizedHadamard(576)] * 2, torch.randn(1, 576))


@pytest.mark.parametrize("key", ["fp16:4096:apply", "fp16:4096:inverse", "fp16:11008:apply", "fp16:11008:inverse"])
def test_float16_outliers_in_interpreter(interpreter_results, key):
    assert interpreter_results[key] < 1e-3


def test_dense_factor_is_cast_once_per_device_and_dtype():
    """F_m in x's dtype is cached (a per-call cast would launch a copy kernel in every decode step)."""
    pytest.importorskip("triton")
    from lowbit.kernels import triton_hadamard as th

    rot = RandomizedHadamard(576, seed=4)
    f16 = th._device_factor([rot], torch.device("cpu"), torch.float16, transpose=False)
    assert f16 is th._device_factor([rot], torch.device("cpu"), torch.float16, transpose=False)
    assert f16.dtype == torch.float16 and torch.equal(f16, rot.factor.half()[None])
    ft = th._device_factor([rot], torch.device("cpu"), torch.float32, transpose=True)
    assert ft.is_contiguous() and torch.equal(ft, rot.factor.t()[None])


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [2, 3])
def test_hadamard_kernel_on_gpu(n, batch, dtype, layout):
    rot = RandomizedHadamard(n, seed=7, layout=layout)  # 11008: 43 x 256 with a dense factor (2) or 43 blocks (3)
    x = torch.randn(batch, n, device="cuda").to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for y, ref in ((rotate_input(rot, x), rot.apply(x.double().cpu())),
                   (rotate_output(rot, x), rot.inverse(x.double().cpu()))):
        assert y.dtype == dtype and ((y.double() - ref.to("cuda")).norm() / ref.norm()) < tol


@needs_gpu
@pytest.mark.parametrize("n", [4096, 11008, 14336, 2816])
@pytest.mark.parametrize("batch", [1, 8, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_rotated_on_gpu(n, batch, dtype):
    """A rotated MLP's SiLU product and down's input side in one launch (layout 3's blocks, or one FWHT), against
    the float64 steps; called directly (dispatch sends it there once ``silu_mul_rotated`` leaves
    ``verified.GPU_UNVERIFIED``)."""
    from lowbit.kernels.triton_hadamard import silu_mul_rotated

    rot = RandomizedHadamard(n, seed=8, layout=3)
    gu = (3 * torch.randn(batch, 2 * n, generator=torch.Generator().manual_seed(n))).to(dtype)
    gate, up = gu.double().chunk(2, dim=-1)
    ref = rot.apply(torch.nn.functional.silu(gate) * up)
    y = silu_mul_rotated(gu.cuda(), rot)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert y.dtype == dtype and ((y.double().cpu() - ref).norm() / ref.norm()) < tol


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_silu_mul_rotated_launched_early_gives_the_plain_result():
    """Behind a kernel that writes its input (one CUDA graph, programmatic dependent launch): bit for bit."""
    from lowbit.kernels.cuda_gemv import early_launch
    from lowbit.kernels.triton_hadamard import silu_mul_rotated

    rot = RandomizedHadamard(11008, seed=3, layout=3)
    src = torch.randn(2, 2 * 11008, generator=torch.Generator().manual_seed(4)).half().cuda()
    plain = silu_mul_rotated(src * 2, rot)
    x = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    with early_launch(True):
        torch.mul(src, 2.0, out=x)
        silu_mul_rotated(x, rot, pdl=True)
        torch.cuda.synchronize()
        x.zero_()
        with torch.cuda.graph(graph):
            torch.mul(src, 2.0, out=x)
            y = silu_mul_rotated(x, rot, pdl=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, plain)


@needs_gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
@pytest.mark.parametrize("n", [4096, 11008])
@pytest.mark.parametrize("layout", [2, 3])
def test_hadamard_launched_early_gives_the_plain_result(n, layout):
    """Launched as a programmatic dependent launch behind a kernel that writes its input (one CUDA graph): the
    transform must wait for that input, so it gives the plain launch's result bit for bit."""
    from lowbit.kernels.cuda_gemv import early_launch

    rot = RandomizedHadamard(n, seed=3, layout=layout)
    src = torch.randn(8, n, device="cuda").half()
    x = torch.empty_like(src)
    plain = rotate_input(rot, src.mul(2.0))
    graph = torch.cuda.CUDAGraph()
    with early_launch(True):
        torch.mul(src, 2.0, out=x)  # warm-up (Triton compiles outside the capture)
        rotate_input(rot, x), rotate_output(rot, x)
        torch.cuda.synchronize()
        x.zero_()
        with torch.cuda.graph(graph):
            torch.mul(src, 2.0, out=x)
            y = rotate_input(rot, x)
            z = rotate_output(rot, y)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, plain)
    assert torch.equal(z, rotate_output(rot, plain))


@needs_gpu
@pytest.mark.parametrize("n,k", [(4096, 3), (11008, 2), (14336, 2), (1024, 2)])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layout", [2, 3])
def test_stacked_rotations_on_gpu(n, k, batch, layout):
    """A fused group's output sides in one launch: each slice as its own rotation's inverse (float16)."""
    from lowbit.kernels.dispatch import rotate_outputs

    rots = [RandomizedHadamard(n, seed=20 + j, layout=layout) for j in range(k)]
    y = torch.randn(batch, k * n, device="cuda").half()
    parts = zip(rots, y.split(n, dim=-1), strict=True)
    ref = torch.cat([r.inverse(part.double().cpu()) for r, part in parts], dim=-1)
    out = rotate_outputs(rots, y)
    assert out.dtype == torch.float16 and ((out.double().cpu() - ref).norm() / ref.norm()) < 2e-3
