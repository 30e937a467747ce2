"""A weight that keeps only its CUDA kernel layout on the GPU (its stored bytes in host memory:
:func:`lowbit.kernels.dispatch.hold_layout`): the Triton dequantize from each layout (:mod:`lowbit.kernels.
triton_layouts`) against each format's own decode, bit for bit, on fresh random weights in Triton's interpreter
and compiled for sm_90 without a GPU; on a GPU, a held QuantLinear's outputs and memory, and greedy decode of a
model with and without held layouts."""

import gc

import pytest
import torch

from conftest import run_in_interpreter
from lowbit.formats import get_format
from lowbit.kernels.dispatch import triton_available

# every format the CUDA GEMV reads from a layout: the K-quants (1-3 superblocks), IQ2_XXS (a short last superblock),
# the 3-, 5- and 6-bit grids (rows of 1-3 chunks of codes, per-row and grouped scales, sym and asym)
CASES = [("q2_k", (6, 256)), ("q3_k", (5, 512)), ("q4_k", (9, 768)), ("q5_k", (3, 256)), ("q6_k", (7, 512)),
         ("iq2_xxs", (5, 256)), ("iq2_xxs", (4, 320)), ("int3_g128_sym", (5, 256)), ("int3_g64_asym", (3, 192)),
         ("q5_0", (4, 96)), ("q5_1", (3, 128)), ("int6_g32_asym", (4, 64)), ("int5_g64_sym", (6, 128))]
IDS = [f"{n}-{r}x{c}" for n, (r, c) in CASES]

_SCRIPT = r"""
import json, sys
import torch
from lowbit.formats import get_format
from lowbit.kernels import cuda_gemv, dispatch
g = torch.Generator().manual_seed(31)
out = {}
for name, shape in json.loads(sys.argv[1]):
    fmt = get_format(name)
    w = torch.randn(*shape, generator=g)
    w[:, ::29] *= 5  # a few large columns: scales of very different sizes
    qt = fmt.quantize(w)
    p = cuda_gemv.plan(fmt, shape)
    stored = qt.data[cuda_gemv.stored_key(p)]
    layout = cuda_gemv.layout_builder(fmt, p, shape[1])(stored)
    ref = fmt.dequantize(qt).float()
    rows = shape[0]
    same = {str(dt): bool(torch.equal(dispatch.dequantize_layout(fmt, qt, layout, 0, rows, dt), ref.to(dt)))
            for dt in (torch.float32, torch.float16)}
    same["rows"] = bool(torch.equal(dispatch.dequantize_layout(fmt, qt, layout, 1, rows - 1, torch.float32),
                                    ref[1:rows - 1]))
    dispatch._held = lambda *a: layout  # the prompt path of a weight held on a GPU, in pieces of two rows
    dispatch.DENSE_PIECE_BYTES = 2 * 4 * shape[1]
    x = torch.randn(12, shape[1], generator=g)
    pieces = [torch.nn.functional.linear(x, ref[r:r + 2]) for r in range(0, rows, 2)]
    same["pieces"] = bool(torch.equal(dispatch.dense_matmul(x, fmt, qt), torch.cat(pieces, -1)))
    out[f"{name}:{rows}x{shape[1]}"] = same
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_dequantize_from_layout_is_the_format_decode(interpreter_results, name, shape):
    got = interpreter_results[f"{name}:{shape[0]}x{shape[1]}"]
    assert got == {"torch.float32": True, "torch.float16": True, "rows": True, "pieces": True}


def test_a_layout_of_another_width_is_refused():
    from lowbit.kernels import cuda_gemv, triton_layouts

    fmt = get_format("q4_k")
    layout = cuda_gemv.kquant_layout(fmt, fmt.quantize(torch.randn(2, 512)).data["qs"], 512)
    with pytest.raises(ValueError, match="does not match"):
        triton_layouts.kquant(*layout, 4, 0, True, 256, torch.float16)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("kernel", ["kquant", "kquant6", "iq2xxs", "affine"])
def test_layout_kernels_compile_for_hopper(kernel: str) -> None:
    """Compiled for sm_90 without a GPU (what the interpreter lets pass and Triton's compiler refuses fails here)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from lowbit.kernels import triton_layouts as tl_
    from lowbit.kernels.launch import EXACT

    i32 = "i32"
    blocks = {"BLOCK_N": 16, "BLOCK_K": 128}
    planes = {"low_ptr": "*i32", "hi_ptr": "*i32", "hi_at_ptr": "*i32"}
    fn, sig, const = {
        "kquant": (tl_._kquant_kernel, {**planes, "scales_ptr": "*i16", "dm_ptr": "*i32", "w_ptr": "*fp16", "N": i32,
                                        "K": i32, "low_words": i32, "hi_words": i32},
                   {"LB": 4, "HB": 1, "ASYM": True, **blocks}),
        "kquant6": (tl_._kquant_kernel, {**planes, "scales_ptr": "*u8", "dm_ptr": "*i32", "w_ptr": "*fp16", "N": i32,
                                         "K": i32, "low_words": i32, "hi_words": i32},
                    {"LB": 4, "HB": 2, "ASYM": False, "BLOCK_N": 16, "BLOCK_K": 256}),  # a whole superblock
        "iq2xxs": (tl_._iq2xxs_kernel, {"sub_ptr": "*i64", "d_ptr": "*fp16", "ls_ptr": "*i32", "grid_ptr": "*fp16",
                                        "w_ptr": "*fp16", "N": i32, "K": i32, "n_super": i32}, blocks),
        "affine": (tl_._affine_kernel, {**planes, "scale_ptr": "*fp16", "min_ptr": "*fp16", "lut_ptr": "*fp32",
                                        "w_ptr": "*fp16", "N": i32, "K": i32, "low_words": i32, "hi_words": i32,
                                        "n_groups": i32, "group": i32},
                   {"LB": 2, "HB": 1, "HAS_MIN": True, **blocks}),
    }[kernel]
    src = ASTSource(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const)
    assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **EXACT}).asm["cubin"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs a CUDA GPU and triton")


@needs_gpu
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q3_k", "iq2_xxs", "int3_g128_sym", "q5_0"])
def test_a_held_linear_computes_the_same_from_less_gpu_memory(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import verified
    from lowbit.models.quant_linear import QuantLinear

    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset())
    fmt = get_format(name)
    g = torch.Generator().manual_seed(12)
    qt = fmt.quantize(torch.randn(1024, 4096, generator=g))
    lin = QuantLinear.from_quantized(qt.to("cuda"))
    xs = [torch.randn(m, 4096, generator=g).half().cuda() for m in (1, 8, 40)]  # decode, batch, prompt
    want = [lin(x) for x in xs]  # the layout built beside the stored bytes
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert lin.hold_layout()
    assert not lin.hold_layout()  # once
    moved = sum(t.numel() * t.element_size() for k, t in lin._buffers.items() if k in lin._keys and not t.is_cuda)
    assert moved > 0 and before - torch.cuda.memory_allocated() >= moved  # the stored bytes left the GPU
    for x, y in zip(xs, want, strict=True):
        assert torch.equal(lin(x), y)
    lin.half()  # a cast keeps the stored bytes in host memory and the layout
    assert lin._held_on is not None and all(not getattr(lin, k).is_cuda for k in ("qs", "codes") if k in lin._keys)
    assert torch.equal(lin(xs[2]), want[2])
    lin.cpu()  # off the GPU: the layout is dropped, the stored bytes are where they were
    assert lin._held_on is None
    y, ref = lin(xs[0].cpu().float()), want[0].cpu().float()  # float32 here against fp16 on the GPU
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()


@needs_gpu
@pytest.mark.parametrize(("name", "compile"), [("q4_k", False), ("iq2_xxs", False), ("int3_g128_sym", False),
                                               ("q4_k", True)])
def test_greedy_decode_is_the_same_with_held_layouts(name: str, compile: bool, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """A Llama-shaped model (fused q/k/v and gate/up, folded norms) through StaticDecoder, prompt and steps (also
    compiled: the host tensors enter the traced step): the same tokens as without held layouts, from less GPU
    memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    from lowbit.kernels import verified
    from lowbit.models.quant_linear import QuantLinear
    from lowbit.serve.fast_decode import StaticDecoder

    def run(hold: bool) -> tuple[list[int], int]:
        gc.collect()  # the previous run's model (fused groups and their members refer to each other)
        start = torch.cuda.memory_allocated()
        monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset() if hold else frozenset({"layouts_only"}))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).half().cuda().eval()
        lowbit.quantize(model, f"rtn:{name}", progress=False)
        torch.cuda.empty_cache()
        if compile:
            torch._dynamo.reset()
        dec = StaticDecoder(model, max_cache_len=64, compile=compile)
        held = sum(m._held_on is not None for m in model.modules() if isinstance(m, QuantLinear))
        assert (held > 0) == hold
        tokens = dec.generate_greedy(torch.arange(1, 21, device="cuda")[None], 24)[0].tolist()
        memory = torch.cuda.memory_allocated() - start
        del dec, model
        return tokens, memory

    plain, plain_memory = run(False)
    held, held_memory = run(True)
    assert held == plain
    assert held_memory < plain_memory


def test_a_held_tensor_changed_in_place_gets_its_layout_rebuilt_on_the_layouts_device() -> None:
    """cuda_gemv's layout cache for a stored tensor held in host memory (hold's entry, here with the layout on the
    meta device in the GPU's place): an in-place change rebuilds the layout there, release drops it."""
    from lowbit.kernels import cuda_gemv

    host = torch.arange(8, dtype=torch.int32)
    built = []

    def build(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        built.append(t.device)
        return (t * 2,)

    meta = torch.device("meta")
    cuda_gemv._LAYOUTS[id(host)] = (host.data_ptr(), host._version, (torch.zeros(8, device=meta),), meta, build)
    try:
        assert cuda_gemv.held(host)[1] == meta and built == []
        host.add_(1)  # the stored bytes changed: the layout is stale
        layout, device = cuda_gemv.held(host)
        assert built == [meta] and device == meta and layout[0].device == meta
        assert cuda_gemv.held(host) is not None and built == [meta]  # once
        cuda_gemv.release(host)
        assert cuda_gemv.held(host) is None
    finally:
        cuda_gemv._LAYOUTS.pop(id(host), None)


@pytest.mark.parametrize("name", ["q4_k", "iq2_xxs", "int3_g128_sym"])
def test_what_the_gemv_reads_of_a_held_weight_is_all_on_the_layouts_device(name: str) -> None:
    """A held weight's stored tensor is in host memory; every tensor the CUDA GEMV then reads (layout, scales,
    decode tables) must be on the layout's device (the meta device here in the GPU's place). IQ2_XXS's decode
    tables once followed the host tensor: a host pointer handed to the kernel, an illegal address on the GPU."""
    from lowbit.kernels import cuda_gemv

    fmt = get_format(name)
    qt = fmt.quantize(torch.randn(16, 512, generator=torch.Generator().manual_seed(5)))
    p = cuda_gemv.plan(fmt, qt.shape)
    key = cuda_gemv.stored_key(p)
    host = qt.data[key]
    build = cuda_gemv.layout_builder(fmt, p, 512)
    meta = torch.device("meta")
    layout = tuple(t.to(meta) for t in build(host))
    cuda_gemv._LAYOUTS[id(host)] = (host.data_ptr(), host._version, layout, meta, build)  # as hold leaves it
    held = type(qt)(qt.format, qt.shape, {k: (t if k == key else t.to(meta)) for k, t in qt.data.items()})
    try:
        read = [t for t in cuda_gemv._weights(fmt, held, p) if isinstance(t, torch.Tensor)]
        assert len(read) >= 3 and all(t.device == meta for t in read), [t.device for t in read]
    finally:
        cuda_gemv._LAYOUTS.pop(id(host), None)
