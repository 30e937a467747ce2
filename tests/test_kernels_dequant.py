"""The Triton dequantize kernels that serve a prompt's matmuls (:func:`lowbit.kernels.dispatch.dequantize`: each
format's GEMV decode written out as a dense weight, then cuBLAS, in pieces of rows past a size) against
each format's own decode, on fresh random weights: under Triton's interpreter on CPU and on CUDA when there is a
GPU. The weight must be the reference's, rounded once to the activations' dtype: bit for bit."""

import pytest
import torch

from conftest import run_in_interpreter
from lowbit.formats import get_format
from lowbit.kernels.dispatch import triton_available

# shapes off every block size: rows off the row block, E8P rows with codes past the last whole 8-code chunk and
# groups that are not a power of two, IQ2_XXS rows ending in a short superblock, k-quant rows of 1-3 superblocks,
# scalar grids with codes across bytes and rows ending in a short group
CASES = [("q2_k", (6, 256)), ("q3_k", (5, 512)), ("q4_k", (9, 768)), ("q5_k", (3, 256)), ("q6_k", (17, 512)),
         ("e8p_ch", (6, 96)), ("e8p_g32", (9, 160)), ("e8p_g24", (5, 96)), ("e8p_ch", (3, 576)),
         ("iq2_xxs", (7, 256)), ("iq2_xxs", (5, 352)),
         ("int4_g128_sym", (5, 384)), ("int3_g64_asym", (6, 200)), ("q4_0", (3, 96)), ("nz2_ch", (9, 160)),
         ("int6_g32_asym", (4, 96)), ("int2_g64_sym", (5, 100))]
IDS = [f"{n}-{r}x{c}" for n, (r, c) in CASES]

_SCRIPT = r"""
import json, sys
import torch
from lowbit.formats import get_format
from lowbit.kernels import dispatch
from lowbit.kernels.dispatch import dequant_matmul, dequantize
g = torch.Generator().manual_seed(21)
out = {}
for name, shape in json.loads(sys.argv[1]):
    fmt = get_format(name)
    w = torch.randn(*shape, generator=g)
    w[:, ::29] *= 5  # a few large columns: scales of very different sizes
    qt = fmt.quantize(w)
    ref = fmt.dequantize(qt).float()
    same = {str(dt): bool(torch.equal(dequantize(fmt, qt, dt), ref.to(dt))) for dt in (torch.float32, torch.float16)}
    x = torch.randn(2, 12, shape[1], generator=g)  # 24 rows: past the GEMV's, the prompt path
    want = torch.nn.functional.linear(x, ref)
    same["matmul"] = bool(torch.equal(dequant_matmul(x, fmt, qt), want))
    whole = dispatch.DENSE_PIECE_BYTES
    dispatch.DENSE_PIECE_BYTES = 2 * 4 * shape[1]  # the dense weight in pieces of two rows (float32)
    pieces = [torch.nn.functional.linear(x, ref[r:r + 2]) for r in range(0, shape[0], 2)]
    same["pieces"] = bool(torch.equal(dequant_matmul(x, fmt, qt), torch.cat(pieces, -1)))
    dispatch.DENSE_PIECE_BYTES = whole
    out[f"{name}:{shape[0]}x{shape[1]}"] = same
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    return run_in_interpreter(_SCRIPT, CASES)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_dequantize_kernel_in_interpreter_is_the_format_decode(interpreter_results, name, shape):
    same = interpreter_results[f"{name}:{shape[0]}x{shape[1]}"]
    # (bfloat16 only on the GPU: Triton 3.6's interpreter truncates float32 -> bfloat16 where the GPU rounds to
    # nearest even, as torch does)
    assert same == {"torch.float32": True, "torch.float16": True, "matmul": True, "pieces": True}


def test_dequantize_refuses_a_weight_of_another_width():
    if not triton_available():
        pytest.skip("triton not installed")
    from lowbit.kernels import triton_e8p, triton_iq2xxs, triton_kquants

    g = torch.Generator().manual_seed(5)
    q6 = get_format("q6_k").quantize(torch.randn(4, 512, generator=g))
    with pytest.raises(ValueError, match="does not match"):
        triton_kquants.dequantize(q6.data["qs"], get_format("q6_k"), 256, torch.float16)
    iq = get_format("iq2_xxs").quantize(torch.randn(4, 256, generator=g))
    with pytest.raises(ValueError, match="does not match"):
        triton_iq2xxs.dequantize(iq.data["qs"], 512, torch.float16)
    e8 = get_format("e8p_ch").quantize(torch.randn(4, 64, generator=g))
    with pytest.raises(ValueError, match="do not make"):
        triton_e8p.dequantize(e8.data["codes"], e8.data["scale"], 64, 128, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize(("name", "shape"), [*CASES, ("q4_k", (1024, 4096)), ("e8p_ch", (256, 11008)),
                                             ("iq2_xxs", (64, 14336))], ids=[*IDS, "q4_k-big", "e8p-big", "iq2-big"])
def test_dequantize_kernel_on_gpu_is_the_format_decode(name: str, shape: tuple[int, int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import dispatch, verified
    from lowbit.kernels.dispatch import dequant_matmul, dequantize

    monkeypatch.setattr(verified, "GPU_UNVERIFIED", frozenset())  # the prompt path through the kernel
    fmt = get_format(name)
    g = torch.Generator().manual_seed(8)
    qt = fmt.quantize(torch.randn(*shape, generator=g)).to("cuda")
    ref = fmt.dequantize(qt).float()
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(dequantize(fmt, qt, dt), ref.to(dt)), dt
    x = torch.randn(40, shape[1], generator=g).half().cuda()  # past the CUDA GEMV's 16 rows
    assert torch.equal(dequant_matmul(x, fmt, qt), torch.nn.functional.linear(x, ref.half()))
    monkeypatch.setattr(dispatch, "DENSE_PIECE_BYTES", 3 * 2 * shape[1])  # pieces of three fp16 rows
    pieces = [torch.nn.functional.linear(x, ref.half()[r:r + 3]) for r in range(0, shape[0], 3)]
    assert torch.equal(dequant_matmul(x, fmt, qt), torch.cat(pieces, -1))


_SWITCHED_OFF = r"""
import json
import torch
from lowbit.formats import get_format
from lowbit.kernels import dispatch, triton_uniform
from lowbit.kernels.reference import dequant_matmul_reference

def refuse(*args):
    raise AssertionError("dequantize called with LOWBIT_DEQUANTIZE=0")

dispatch.dequantize = refuse
g = torch.Generator().manual_seed(3)
out = {}
for name, cols in (("q4_k", 256), ("iq2_xxs", 256), ("q4_0", 96)):
    fmt = get_format(name)
    qt = fmt.quantize(torch.randn(4, cols, generator=g))
    x = torch.randn(24, cols, generator=g)
    y = dispatch.dequant_matmul(x, fmt, qt)
    if name == "q4_0":
        lut, _ = dispatch.decode_plan(fmt, x.device)
        want = triton_uniform.dequant_matmul(x, qt.data["codes"], qt.data["scale"], None, lut, 4, 32, cols)
    else:
        want = dequant_matmul_reference(x, fmt, qt)
    out[name] = bool(torch.equal(y, want))
print(json.dumps(out))
"""


def test_prompts_take_the_earlier_paths_with_the_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_DEQUANTIZE=0: a prompt's matmul of a scalar grid through triton_uniform's tiles, of a codebook or
    k-quant weight through the reference, and no dequantize kernel (the paths before it, for A/B timings)."""
    monkeypatch.setenv("LOWBIT_DEQUANTIZE", "0")
    assert run_in_interpreter(_SWITCHED_OFF) == {"q4_k": True, "iq2_xxs": True, "q4_0": True}


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("kernel", ["kquants", "iq2xxs", "e8p", "uniform3", "uniform4"])
def test_dequantize_kernels_compile_for_hopper(kernel: str) -> None:
    """The interpreter runs a kernel as Python; this compiles it for sm_90 without a GPU, where what Triton refuses
    to compile fails (a global that is not a constexpr, read inside the kernel, passed the interpreter once)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from lowbit.kernels import triton_e8p, triton_iq2xxs, triton_kquants, triton_uniform
    from lowbit.kernels.launch import EXACT

    i32 = "i32"
    fn, sig, const = {
        "kquants": (triton_kquants._kquant_dequant_kernel,
                    {"qs_ptr": "*u8", "w_ptr": "*fp16", "N": i32, "row_bytes": i32, "K": i32},
                    {"KIND": 4, "BLOCK_BYTES": 144, "BLOCK_N": 16}),
        "iq2xxs": (triton_iq2xxs._iq2xxs_dequant_kernel,
                   {"qs_ptr": "*i16", "grid_ptr": "*fp16", "ksigns_ptr": "*i32", "w_ptr": "*fp16", "N": i32, "K": i32,
                    "n_sub": i32, "row_words": i32}, {"BLOCK_N": 16, "BLOCK_S": 8}),
        "e8p": (triton_e8p._e8p_dequant_kernel,
                {"codes_ptr": "*i16", "scale_ptr": "*fp16", "table_ptr": "*fp16", "w_ptr": "*fp16", "N": i32,
                 "K": i32, "n_codes": i32, "whole": i32, "n_groups": i32, "group": i32},
                {"GROUP_SHIFT": 30, "BLOCK_N": 16, "BLOCK_W": 32}),
        **{f"uniform{bits}": (triton_uniform._dequantize_kernel,
                              {"codes_ptr": "*u8", "scale_ptr": "*fp16", "min_ptr": "*fp16", "lut_ptr": "*fp32",
                               "w_ptr": "*fp16", "N": i32, "K": i32, "row_bytes": i32, "n_groups": i32,
                               "group": i32}, {"BITS": bits, "HAS_MIN": True, "BLOCK_N": 16, "BLOCK_K": 128})
           for bits in (3, 4)},  # codes across bytes, whole codes per byte
    }[kernel]
    src = ASTSource(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const)
    assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **EXACT}).asm["cubin"]


def test_a_weights_rows_are_views_of_every_stored_tensor() -> None:
    """QuantizedTensor.rows: what the prompt path dequantizes a piece at a time."""
    from lowbit.formats import QuantizedTensor

    qt = get_format("q4_0").quantize(torch.randn(5, 64, generator=torch.Generator().manual_seed(6)))
    part = qt.rows(3, 9)  # past the end: up to the last row
    assert part.shape == (2, 64) and part.format == "q4_0"
    for key, t in qt.data.items():
        assert torch.equal(part.data[key], t[3:5]) and part.data[key].data_ptr() == t[3].data_ptr()
    table = QuantizedTensor("some_vq", (4, 8), {"codes": torch.zeros(4, 2), "codebook": torch.zeros(16, 8)})
    with pytest.raises(ValueError, match="one row per output feature"):
        table.rows(0, 2)
