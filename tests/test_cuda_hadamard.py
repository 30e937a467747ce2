"""The CUDA randomized Hadamard kernels (:mod:`lowbit.kernels.cuda_hadamard`, ``cuda/hadamard.cu``).

Without a GPU: the kernels' butterfly schedule (which index bits run in registers, through shuffles, after the pass
through shared memory) replayed on a register file in torch gives the Walsh-Hadamard transform, and the source
compiles with NVRTC where NVRTC is installed. On a GPU: the transforms and the junction against the float64 steps
and Triton's kernels, launched early inside a CUDA graph, and every variant without spills."""

import pytest
import torch

from conftest import nvrtc_found
from lowbit.kernels import cuda_hadamard, cuda_jit
from lowbit.rotations.hadamard import LAYOUT, RandomizedHadamard, fwht

LOGS = range(cuda_hadamard.MIN_LOG, cuda_hadamard.MAX_LOG + 1)


class _Block:
    """A block's registers [threads, 16] as ``cuda/hadamard.cu`` moves them (its reg_stages, lane_stages,
    m1_to_m2, m2_to_m1), with the shared buffer's padding."""

    def __init__(self, log_n: int):
        self.log_n, self.threads = log_n, (1 << log_n) // 16
        self.t = torch.arange(self.threads)

    def m1_index(self) -> torch.Tensor:  # thread t, register e: value 16 t + e
        return 16 * self.t[:, None] + torch.arange(16)[None, :]

    def m2_index(self) -> torch.Tensor:  # thread t, register j: value j threads + t
        return torch.arange(16)[None, :] * self.threads + self.t[:, None]

    @staticmethod
    def reg_stages(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        v = v.clone()
        for b in range(lo, hi):
            for e in range(16):
                if not e & (1 << b):
                    a, c = v[:, e].clone(), v[:, e | (1 << b)].clone()
                    v[:, e], v[:, e | (1 << b)] = a + c, a - c
        return v

    def lane_stages(self, v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        for b in range(lo, hi):
            partner = v[self.t ^ (1 << b)]  # __shfl_xor_sync within the warp (b < 5)
            upper = ((self.t & 31) & (1 << b)).bool()[:, None]
            v = torch.where(upper, partner - v, v + partner)
        return v

    def move(self, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        pad = lambda i: i + (i >> 5)  # noqa: E731
        buf = torch.zeros((1 << self.log_n) + (1 << self.log_n) // 32, dtype=v.dtype)
        buf[pad(src)] = v
        return buf[pad(dst)]

    def fwht_m1(self, v: torch.Tensor) -> torch.Tensor:
        v = self.lane_stages(self.reg_stages(v, 0, 4), 0, 5)
        v = self.move(v, self.m1_index(), self.m2_index())
        return self.reg_stages(v, max(0, 13 - self.log_n), 4)

    def fwht_m2(self, v: torch.Tensor) -> torch.Tensor:
        v = self.lane_stages(self.reg_stages(v, 0, 4), 0, 5)
        v = self.move(v, self.m2_index(), self.m1_index())
        return self.lane_stages(v, 1, self.log_n - 8)


@pytest.mark.parametrize("log_n", LOGS)
def test_butterfly_schedule_is_the_walsh_hadamard_transform(log_n: int) -> None:
    """From M1 the kernel's stages end in M2 with every value transformed, and from M2 they end in M1."""
    block, n = _Block(log_n), 1 << log_n
    x = torch.randn(n, generator=torch.Generator().manual_seed(log_n), dtype=torch.float64)
    want = fwht(x) * n ** 0.5  # unnormalized
    out = torch.empty(n, dtype=torch.float64)
    out[block.m2_index()] = block.fwht_m1(x[block.m1_index()])
    torch.testing.assert_close(out, want)
    out[block.m1_index()] = block.fwht_m2(x[block.m2_index()])
    torch.testing.assert_close(out, want)


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (a CUDA build of PyTorch or the nvidia-cuda-nvrtc wheel)")
@pytest.mark.parametrize("bf16", [False, True])
def test_every_variant_compiles(bf16: bool) -> None:
    for log_n in LOGS:
        for inverse in (False, True):
            assert cuda_jit.compile_cubin(cuda_hadamard._source(log_n, bf16, inverse), "hadamard.cu", "sm_90")


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_jit.available(), reason="needs CUDA and NVRTC")


@gpu
@pytest.mark.parametrize("n", [512, 1024, 4096, 8192])
@pytest.mark.parametrize("k,batch", [(1, 1), (3, 1), (1, 8), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transforms_on_gpu_are_tritons(n: int, k: int, batch: int, dtype: torch.dtype) -> None:
    """Bit for bit Triton's kernel (the same stages in the same order of bits), and within 16-bit rounding of the
    float64 transforms."""
    from lowbit.kernels import triton_hadamard

    rots = [RandomizedHadamard(n, seed=40 + j, layout=LAYOUT) for j in range(k)]
    x = torch.randn(batch, k * n, generator=torch.Generator().manual_seed(n + k), dtype=torch.float32)
    x = x.to("cuda", dtype)
    for inverse in (False, True):
        y = cuda_hadamard.rotate_stacked(rots, x, inverse)
        assert torch.equal(y, triton_hadamard.rotate_stacked(rots, x, inverse))
        ref = torch.cat([(r.inverse if inverse else r.apply)(p.double().cpu())
                         for r, p in zip(rots, x.split(n, dim=-1), strict=True)], dim=-1)
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < (3e-3 if dtype == torch.float16 else 2.5e-2)


@gpu
@pytest.mark.parametrize("n", [512, 4096, 8192])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_junction_on_gpu(n: int, batch: int, dtype: torch.dtype) -> None:
    from test_residual_norm_kernel import _TRUTH, TOL

    ns: dict = {}
    exec(_TRUTH, ns)  # noqa: S102 - the float64 steps of the Triton junction's tests
    y, r, w, u, v = ns["inputs"](n, [batch], torch.Generator().manual_seed(n), dtype)
    h, x = cuda_hadamard.residual_norm(y.cuda(), u, r.cuda(), w.cuda(), 1e-5, v)
    th, tx = ns["truth"](y, u, r, w, 1e-5, v)
    tol = TOL[str(dtype).removeprefix("torch.")]
    assert ns["rel"](h.cpu(), th) < tol and ns["rel"](x.cpu(), tx) < tol


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_launched_early_gives_the_plain_result() -> None:
    """Launched behind the kernel that writes their input (one CUDA graph, programmatic dependent launch), the
    transform and the junction wait for it: the plain launches' results bit for bit."""
    n = 4096
    u, v = RandomizedHadamard(n, seed=1, layout=LAYOUT), RandomizedHadamard(n, seed=2, layout=LAYOUT)
    src, r = torch.randn(2, 4, n, generator=torch.Generator().manual_seed(3)).half().cuda()
    w = torch.ones(n, device="cuda").half()
    plain_y = cuda_hadamard.rotate_stacked([u], src * 2, inverse=True)
    plain_h, plain_x = cuda_hadamard.residual_norm(src * 2, u, r, w, 1e-5, v)
    x_in = torch.empty_like(src)

    def step() -> tuple[torch.Tensor, ...]:
        torch.mul(src, 2.0, out=x_in)
        y = cuda_hadamard.rotate_stacked([u], x_in, inverse=True, pdl=True)
        torch.mul(src, 2.0, out=x_in)
        return (y, *cuda_hadamard.residual_norm(x_in, u, r, w, 1e-5, v, pdl=True))

    step()  # compiled and loaded outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x_in.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, (plain_y, plain_h, plain_x), strict=True))


@gpu
def test_every_variant_fits_without_spills() -> None:
    for log_n in LOGS:
        for bf16 in (False, True):
            for inverse in (False, True):
                for name in ("hadamard", "residual_norm"):
                    kern = cuda_jit.kernel(cuda_hadamard._source(log_n, bf16, inverse), name, torch.device("cuda"))
                    assert kern.attribute(3) == 0, (name, log_n, bf16, inverse)  # local (spilled) bytes per thread
