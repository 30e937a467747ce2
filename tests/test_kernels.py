"""The packed-matmul kernel against its torch reference, on fresh random inputs.

The Triton kernel is checked on CPU through Triton's interpreter (a subprocess with TRITON_INTERPRET=1, skipped
when triton is not installed) and on CUDA when there is a GPU; the reference is checked everywhere."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit.formats import get_format
from lowbit.kernels.dispatch import decode_lut, dequant_matmul, triton_available
from lowbit.kernels.reference import dequant_matmul_reference

CASES = [("int4_g32_sym", (96, 128), 1), ("q4_1", (64, 96), 8), ("int4_g128_asym", (64, 576), 3),
         ("int3_g64_sym", (80, 200), 5), ("nz2_ch", (64, 96), 20), ("int2_g32_asym", (70, 160), 2),
         ("int8_g32_sym", (32, 64), 1), ("int5_g32_asym", (40, 96), 4), ("std2m_g64", (48, 128), 2)]


def _problem(name, shape, m, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = get_format(name)
    qt = fmt.quantize(torch.randn(*shape, generator=g))
    return fmt, qt, torch.randn(m, shape[1], generator=g)


@pytest.mark.parametrize("name,shape,m", CASES)
def test_reference_is_the_dequantized_matmul(name, shape, m):
    fmt, qt, x = _problem(name, shape, m, seed=1)
    expected = x.double() @ fmt.dequantize(qt).double().T
    y = dequant_matmul_reference(x, fmt, qt)
    assert ((y.double() - expected).norm() / expected.norm()) < 1e-6


def test_lut_matches_decode():
    for name in ("int4_g32_sym", "int3_g64_asym", "nz2_ch", "std2_g32"):
        fmt = get_format(name)
        lut = decode_lut(fmt, torch.device("cpu"))
        assert lut.shape == (1 << fmt.bits,)
        params = {"scale": torch.ones(1, 1)} | ({} if fmt.symmetric else {"min": torch.zeros(1, 1)})
        assert torch.equal(lut, fmt.decode(torch.arange(1 << fmt.bits).unsqueeze(0), params)[0])


def test_dispatch_uses_reference_without_cuda(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    fmt, qt, x = _problem("int4_g32_sym", (32, 64), 2, seed=2)
    assert torch.equal(dequant_matmul(x, fmt, qt), dequant_matmul_reference(x, fmt, qt))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_in_interpreter_matches_reference():
    script = textwrap.dedent(f"""
        import torch
        from lowbit.formats import get_format
        from lowbit.kernels.dispatch import dequant_matmul
        g = torch.Generator().manual_seed(3)
        for name, shape, m in {CASES!r}:
            fmt = get_format(name)
            qt = fmt.quantize(torch.randn(*shape, generator=g))
            x = torch.randn(3, m, shape[1], generator=g)  # leading dims are flattened by the dispatch
            y = dequant_matmul(x, fmt, qt)
            ref = x.double() @ fmt.dequantize(qt).double().T
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert y.shape == ref.shape and torch.isfinite(y).all() and err < 1e-5, (name, err)
        # QuantLinear's forward goes through the same dispatch (rotation and bias around the kernel)
        from lowbit.models.quant_linear import QuantLinear
        from lowbit.rotations.incoherence import Rotation
        fmt = get_format("int4_g32_sym")
        rot = Rotation.for_layer("layer", 0)
        w = torch.randn(64, 96, generator=g)
        q = QuantLinear.from_quantized(fmt.quantize(rot.rotate_weight(w)), torch.randn(64, generator=g), rot)
        x = torch.randn(5, 96, generator=g)
        ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double())
        assert ((q(x).double() - ref).norm() / ref.norm()).item() < 1e-5
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", LOWBIT_KERNELS="triton")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("name,shape,m", CASES)
def test_triton_kernel_on_gpu(name, shape, m):
    fmt, qt, x = _problem(name, shape, m, seed=4)
    qt, x = qt.to("cuda"), x.to("cuda", torch.float16)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2
