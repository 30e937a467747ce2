"""The CUDA attention step (lowbit.kernels.cuda_attention) against the plain reference; GPU tests need Hopper."""

from __future__ import annotations

import pytest
import torch

from conftest import compile_all, nvrtc_found
from lowbit.kernels import cuda_attention, dispatch
from lowbit.kernels.triton_decode_attention import rope_cache_attention_reference


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _step_inputs(b: int, h: int, hkv: int, s: int, d: int, device: str, seed: int):  # noqa: ANN202
    g = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g, device=device, dtype=torch.float16)
    turn = torch.rand(1, 1, d // 2, generator=g, device=device) * 6  # one cos/sin row for the batch: broadcast
    cos, sin = (torch.cat([f(turn)] * 2, -1).half() for f in (torch.cos, torch.sin))
    caches = torch.randn(2, b, hkv, s, d, generator=g, device=device, dtype=torch.float16)
    return qkv, cos, sin, caches


@pytest.mark.skipif(not nvrtc_found(), reason="needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)")
def test_every_variant_compiles_for_hopper():
    """Head sizes, cluster sizes and keys per warp the module can ask for (no GPU needed)."""
    from lowbit.kernels import cuda_jit

    sources = [cuda_jit.source("attention_step.cu", f"#define HEAD_DIM {dim}\n#define SPLITS {splits}\n"
                                                   f"#define KPW {kpw}\n")
               for dim in cuda_attention.HEAD_DIMS for splits in (1, 3, cuda_attention.MAX_SPLITS)
               for kpw in (4, 8, 16)]
    compile_all([(source, "sm_90") for source in sources], "attention_step.cu")


def test_not_served_on_cpu_or_with_a_mask():
    qkv, cos, sin, caches = _step_inputs(1, 4, 2, 16, 64, "cpu", 0)
    assert not cuda_attention.serves(qkv, cos, sin, *caches, None)


def test_bad_inputs_are_refused_before_launch():
    qkv, cos, sin, caches = _step_inputs(1, 4, 2, 16, 64, "cpu", 0)
    with pytest.raises(ValueError, match="int64"):
        cuda_attention.rope_cache_attention(qkv, cos, sin, *caches, torch.tensor(3, dtype=torch.int32), 0.1, 4)
    with pytest.raises(ValueError, match="keys_per_warp"):
        cuda_attention.rope_cache_attention(qkv, cos, sin, *caches, torch.tensor(3), 0.1, 4, keys_per_warp=2)
    with pytest.raises(ValueError, match="qkv"):
        cuda_attention.rope_cache_attention(qkv, cos, sin, *caches, torch.tensor(3), 0.1, 3)
    with pytest.raises(ValueError, match="splits"):
        cuda_attention.rope_cache_attention(qkv, cos, sin, *caches, torch.tensor(3), 0.1, 4, splits=9)


gpu = pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.0 or more")
# (batch, heads, kv heads, cache positions, head size)
CASES = [(1, 32, 32, 144, 128), (2, 9, 3, 100, 64), (1, 4, 2, 300, 256), (1, 8, 2, 1000, 128)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[",".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("keys_per_warp", [4, 8, 16])
def test_step_on_gpu_matches_reference(case, keys_per_warp):
    """Every length class (no key yet, within the first block, at block edges, the last position) and split count:
    the reference's attention, the new key and value written at the length and no position from it on read (they
    hold NaN)."""
    b, h, hkv, s, d = case
    qkv, cos, sin, caches = _step_inputs(b, h, hkv, s, d, "cuda", 4)
    worst = 0.0
    for used in sorted({u for u in (0, 1, 15, 63, 64, 65, 130, s - 1) if u < s}):
        cache = caches.clone()
        cache[..., used:, :] = float("nan")
        want_cache = cache.nan_to_num(0.0)
        r = rope_cache_attention_reference(qkv, cos, sin, *want_cache, torch.tensor(used), None, d ** -0.5, h)
        for splits in (None, 1, 3, 8):
            got = cache.clone()
            y = cuda_attention.rope_cache_attention(qkv, cos, sin, *got, torch.tensor(used, device="cuda"),
                                                    d ** -0.5, h, splits=splits, keys_per_warp=keys_per_warp)
            assert torch.isfinite(y).all()
            worst = max(worst, float((y.double() - r.double()).norm() / r.double().norm()))
            assert torch.allclose(got[..., used, :].float(), want_cache[..., used, :].float(), atol=2e-3)
            assert torch.equal(got[..., :used, :], cache[..., :used, :])
            assert got[..., used + 1:, :].isnan().all()
    assert worst < 2e-3


@gpu
@pytest.mark.gpu
def test_graph_replays_with_early_launch_follow_the_length():
    """Captured as programmatic dependent launches after another kernel, replayed at changing lengths with fresh
    queries: each replay's output is that step's attention (the first keys, read before the wait, are the
    current length's)."""
    from lowbit.kernels import cuda_gemv

    qkv, cos, sin, caches = _step_inputs(1, 32, 8, 512, 128, "cuda", 5)
    fresh = torch.empty_like(qkv)
    length = torch.tensor(0, device="cuda")
    with cuda_gemv.early_launch():
        cuda_attention.rope_cache_attention(qkv, cos, sin, *caches.clone(), length, 0.1, 32, early=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            qkv.copy_(fresh * 1.0)  # the kernel before: the step reads its output after the wait
            y = cuda_attention.rope_cache_attention(qkv, cos, sin, *caches, length, 0.1, 32, early=True)
    g = torch.Generator("cuda").manual_seed(6)
    worst = 0.0
    for i in range(100):
        fresh.copy_(torch.randn(fresh.shape, generator=g, device="cuda", dtype=torch.float16))
        length.fill_(1 + (i * 37) % 500)
        want = rope_cache_attention_reference(fresh, cos, sin, *caches.clone(), length.cpu(), None, 0.1, 32)
        graph.replay()
        worst = max(worst, float((y.double() - want.double()).norm() / want.double().norm()))
    assert worst < 2e-3


@gpu
@pytest.mark.gpu
def test_dispatch_takes_the_cuda_kernel_where_it_serves():
    qkv, cos, sin, caches = _step_inputs(1, 8, 4, 200, 128, "cuda", 7)
    length = torch.tensor(150, device="cuda")
    ours = dispatch.rope_cache_attention(qkv, cos, sin, *caches.clone(), length, None, 0.1, 8)
    cuda = cuda_attention.rope_cache_attention(qkv, cos, sin, *caches.clone(), length, 0.1, 8)
    assert torch.equal(ours, cuda)
    mask = torch.ones(1, 1, 1, 200, dtype=torch.bool, device="cuda")  # a mask: the Triton kernel
    masked = dispatch.rope_cache_attention(qkv, cos, sin, *caches.clone(), length, mask, 0.1, 8)
    want = rope_cache_attention_reference(qkv, cos, sin, *caches.clone(), length.cpu(), mask, 0.1, 8)
    assert float((masked.double() - want.double()).norm() / want.double().norm()) < 2e-3
