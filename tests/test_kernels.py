"""The packed-matmul kernel against its torch reference, on fresh random inputs.

The Triton kernels (GEMV for M <= 8, tl.dot GEMM above, E8P GEMV) are checked on CPU through Triton's interpreter
(one subprocess with TRITON_INTERPRET=1 for all cases, skipped when triton is not installed; autotuning is bypassed
there) and on CUDA when there is a GPU; the reference is checked everywhere."""


import pytest
import torch

from conftest import run_in_interpreter
from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul, triton_available
from lowbit.kernels.reference import decode_lut, dequant_matmul_reference

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


# (format, [out, in], batch rows): M <= 8 runs the GEMV kernels, larger M the tl.dot kernel (E8P: the reference).
# Covers: 4-bit words with groups smaller than / equal to / spanning the tile, a ragged last group (576 = 4 x 128 +
# 64), per-channel scales, K not a multiple of the tile, 2-bit int16 words, 8-bit, affine and non-affine level
# sets, straddling widths (3, 5 bits), a group that is not a power of two, a 4-bit row that is not whole words,
# 3-bit rows of whole 32-code units (read as three words each: groups of 32, 64 and 128, a ragged last group, one
# per row) and rows that are not (200 columns: bytes).
GEMV_CASES = [("int4_g32_sym", (12, 128), 1), ("q4_1", (10, 96), 3), ("int4_g128_asym", (6, 576), 2),
              ("int4_ch_sym", (9, 200), 1), ("int2_g64_sym", (12, 200), 1), ("int2_g32_asym", (6, 104), 8),
              ("nz2_ch", (9, 96), 8), ("pm12_g32", (5, 160), 5), ("std2m_g64", (8, 128), 1),
              ("int8_g32_sym", (8, 64), 1), ("int3_g64_sym", (6, 200), 3), ("int5_g32_asym", (5, 96), 4),
              ("int4_g24_sym", (5, 96), 2), ("int4_g32_sym", (5, 36), 1), ("int3_g64_sym", (6, 192), 3),
              ("int3_g32_asym", (5, 96), 1), ("int3_ch_sym", (7, 160), 1), ("int3_g128_asym", (6, 576), 2),
              ("int3_g32_sym", (5, 200), 1), ("q5_0", (5, 128), 1), ("int6_g64_asym", (6, 192), 3),
              ("int7_g32_sym", (5, 96), 8)]
GEMM_CASES = [("int4_g32_sym", (40, 128), 33), ("int3_g64_sym", (24, 200), 20), ("q4_1", (20, 96), 9)]
E8P_CASES = [("e8p_ch", (8, 96), 1), ("e8p_g32", (6, 160), 3), ("e8p_g24", (5, 96), 8), ("e8p_g128", (5, 576), 2),
             ("e8p_ch", (6, 64), 33)]
# a second GEMV tiling (two row groups, unrolled K loop) on the word-path cases
ALT_CONFIG = {"BLOCK_N": 2, "BLOCK_W": 8, "UNROLL": 2, "ROW_GROUPS": 2}
ALT_CASES = [("int4_g32_sym", (12, 128), 1), ("int4_g128_asym", (6, 576), 1), ("int2_g64_sym", (12, 200), 1),
             ("nz2_ch", (9, 96), 4), ("int8_g32_sym", (8, 64), 1), ("int3_g64_sym", (12, 192), 1)]
# split-K: the K steps in 3 runs per row block added atomically into a float32 y (ragged and empty runs included)
SPLIT_CONFIG = {"BLOCK_N": 4, "BLOCK_W": 8, "UNROLL": 1, "ROW_GROUPS": 1, "SPLIT_K": 3}
SPLIT_CASES = [("int4_g128_asym", (6, 576), 1), ("int2_g64_sym", (12, 200), 1), ("q4_1", (10, 96), 3),
               ("int3_g64_sym", (6, 200), 3), ("nz2_ch", (9, 96), 8), ("int4_g24_sym", (5, 96), 2),
               ("pm12_g32", (5, 160), 5), ("int3_g128_sym", (6, 576), 1)]
# batch 1 on 2- to 7-bit affine grids runs triton_gemv_affine under "default": the general kernel must still be right
GENERAL_CASES = [c for c in GEMV_CASES if c[2] == 1]
# its own cases: asym / level-set offsets, per-row scales, ragged tiles, 3- and 5- to 7-bit units (32 codes in
# 3-7 words, codes straddling words) at batch 1 and in batches (programs of 2 activation rows; 3 or 5 rows: a
# program with one); and split-K over 3 runs of words (batches: programs of 4 rows)
AFFINE_CASES = [("q4_1", (10, 96), 1), ("int2_g64_sym", (12, 192), 1), ("nz2_ch", (9, 96), 1),
                ("int2_g32_asym", (6, 160), 1), ("int4_g128_asym", (6, 576), 1), ("q4_0", (7, 520), 1),
                ("int3_g64_sym", (12, 192), 1), ("int3_g128_asym", (6, 576), 1), ("int3_ch_sym", (7, 160), 1),
                ("q5_1", (6, 160), 1), ("int6_g64_sym", (5, 192), 1), ("int7_ch_asym", (5, 96), 1),
                ("int3_g128_asym", (6, 576), 8), ("int5_g64_sym", (6, 256), 3), ("int3_g32_sym", (7, 96), 2),
                ("int6_ch_asym", (5, 160), 5), ("int7_g64_asym", (4, 128), 4)]
AFFINE_SPLIT = {"BLOCK_N": 4, "BLOCK_W": 4, "BLOCK_M": 4, "SPLIT_K": 3}
ALL_CASES = ([("default", c) for c in GEMV_CASES + GEMM_CASES + E8P_CASES] + [("alt", c) for c in ALT_CASES]
             + [("split", c) for c in SPLIT_CASES] + [("general", c) for c in GENERAL_CASES]
             + [("default", c) for c in AFFINE_CASES] + [("affine_split", c) for c in AFFINE_CASES])
# triton_gemv_affine keeps >= 16 bits of every product c x (its window of mantissa positions), so its error is
# ~1e-4 relative: below the float16 output's rounding (2^-11), and far from what a decoding bug gives
AFFINE_TOL = 1e-3

_INTERPRETER_SCRIPT = r"""
import json, sys, time
import torch
from lowbit.formats import get_format
from lowbit.kernels import triton_gemv, triton_gemv_affine
from lowbit.kernels.dispatch import dequant_matmul
cases = json.loads(sys.argv[1])
configs = json.loads(sys.argv[2])
affine_split = configs.pop("affine_split")
configs["default"] = configs["general"] = configs["affine_split"] = dict(triton_gemv.INTERPRET_CONFIG)
affine_default = dict(triton_gemv_affine.INTERPRET_CONFIG)
g = torch.Generator().manual_seed(3)
out = {}
for tag, (name, shape, m) in cases:
    triton_gemv.INTERPRET_CONFIG = configs[tag]
    fmt = get_format(name)
    qt = fmt.quantize(torch.randn(*shape, generator=g))  # fresh random weights and inputs per case
    x = torch.randn(m, shape[1], generator=g)
    triton_gemv.AFFINE_FAST = tag != "general"
    triton_gemv_affine.INTERPRET_CONFIG = dict(affine_split if tag == "affine_split" else affine_default)
    calls = triton_gemv_affine.calls
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    err = ((y.double() - ref).norm() / ref.norm()).item()
    ok = tuple(y.shape) == tuple(ref.shape) and bool(torch.isfinite(y).all())
    out[f"{tag}:{name}:{shape[0]}x{shape[1]}:{m}"] = [err if ok else float("inf"), triton_gemv_affine.calls > calls]
triton_gemv.AFFINE_FAST = True
triton_gemv.INTERPRET_CONFIG = configs["default"]
# leading dims are flattened by the dispatch; QuantLinear's forward goes through it (rotation and bias around)
fmt = get_format("int4_g32_sym")
qt = fmt.quantize(torch.randn(16, 64, generator=g))
x = torch.randn(2, 3, 64, generator=g)
ref = x.double() @ fmt.dequantize(qt).double().T
out["lead_dims"] = ((dequant_matmul(x, fmt, qt).double() - ref).norm() / ref.norm()).item()
from lowbit.models.quant_linear import QuantLinear
from lowbit.rotations.incoherence import Rotation
rot = Rotation.for_layer("layer", 0)
w = torch.randn(16, 64, generator=g)
q = QuantLinear.from_quantized(fmt.quantize(rot.rotate_weight(w)), torch.randn(16, generator=g), rot)
x = torch.randn(5, 64, generator=g)
ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double())
out["quant_linear"] = ((q(x).double() - ref).norm() / ref.norm()).item()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    """Runs every kernel case once under TRITON_INTERPRET=1 (a subprocess: the flag is read at import)."""
    return run_in_interpreter(_INTERPRETER_SCRIPT, ALL_CASES,
                              {"alt": ALT_CONFIG, "split": SPLIT_CONFIG, "affine_split": AFFINE_SPLIT})


@pytest.mark.parametrize("tag,case", ALL_CASES, ids=[f"{t}-{c[0]}-{c[1][0]}x{c[1][1]}-m{c[2]}" for t, c in ALL_CASES])
def test_triton_kernels_in_interpreter_match_reference(interpreter_results, tag, case):
    name, shape, m = case
    err, affine = interpreter_results[f"{tag}:{name}:{shape[0]}x{shape[1]}:{m}"]
    assert err < (AFFINE_TOL if affine else 1e-5)
    assert not (affine and tag == "general")


def test_affine_gemv_serves_batch_one_affine_formats_and_batches_of_units(interpreter_results):
    served = {k.split(":", 1)[1] for k, v in interpreter_results.items() if isinstance(v, list) and v[1]}
    names = {k.split(":")[0] for k in served}
    assert {c[0] for c in AFFINE_CASES} | {"int4_g32_sym", "int4_ch_sym"} <= names
    # 4 levels, 8 bits, g24
    assert not names & {"pm12_g32", "int8_g32_sym", "int4_g24_sym"}
    assert {"int3_g64_sym:6x192:3", "int5_g32_asym:5x96:4", "int6_g64_asym:6x192:3", "int7_g32_sym:5x96:8"} <= served
    # batches of 2- and 4-bit words stay with the general kernel; so do 3-bit rows that are not whole units of 32
    # codes
    assert not served & {"q4_1:10x96:3", "int2_g32_asym:6x104:8", "nz2_ch:9x96:8", "int3_g64_sym:6x200:3",
                         "int3_g32_sym:5x200:1"}


def test_dispatch_in_interpreter_flattens_and_serves_quant_linear(interpreter_results):
    assert interpreter_results["lead_dims"] < 1e-5
    assert interpreter_results["quant_linear"] < 1e-5


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_three_bit_rows_are_read_in_units_of_three_words():
    """Where a 3-bit row is whole 32-code units inside its scale groups, the GEMV reads 12-byte units at batch 1
    (the cases above check their decode); anything else keeps the per-column path."""
    from lowbit.kernels.triton_gemv import word_bytes

    def codes(cols: int) -> torch.Tensor:
        return torch.zeros(4, cols * 3 // 8, dtype=torch.uint8)

    assert word_bytes(codes(192), 3, 64, 192) == 12
    assert word_bytes(codes(576), 3, 128, 576) == 12
    assert word_bytes(codes(160), 3, 160, 160) == 12  # one group per row
    assert word_bytes(codes(200), 3, 64, 200) == 0  # not whole units
    assert word_bytes(codes(192), 3, 48, 192) == 0  # a unit would cross a group
    assert word_bytes(torch.zeros(4, 74, dtype=torch.uint8)[:, 2:], 3, 64, 192) == 0  # rows off a word boundary
    assert word_bytes(codes(192), 3, 64, 192, m=2) == 0  # batches: the units' accumulators spill
    assert word_bytes(codes(192), 5, 64, 192) == 0
    assert word_bytes(torch.zeros(4, 64, dtype=torch.uint8), 4, 32, 128) == 4


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
def test_word_gemvs_compile_for_hopper(bits):
    """The interpreter runs the kernels as Python; this compiles them (sm_90, no GPU needed), which is where a
    constexpr that reaches a helper as a runtime value, or a type mismatch, fails."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from lowbit.kernels.launch import FUSED
    from lowbit.kernels.triton_gemv import _gemv_kernel
    from lowbit.kernels.triton_gemv_affine import BATCH_BITS, _gemv_affine_kernel

    def build(fn, sig: dict, const: dict, warps: int = 4) -> None:  # noqa: ANN001
        src = ASTSource(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const)
        assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **FUSED}).asm["cubin"]

    ptrs = dict.fromkeys(["x_ptr", "scale_ptr", "min_ptr", "y_ptr"], "*fp16") | {"codes_ptr": "*i32"}
    ints = dict.fromkeys(["M", "N", "row_words", "n_groups", "stride_xm", "stride_ym", "mask_bits", "one_bits"], "i32")
    for block_m in (1, 4) if bits in BATCH_BITS else (1,):
        build(_gemv_affine_kernel, ptrs | ints | {"lut_a": "fp32", "lut_b": "fp32"},
              {"BITS": bits, "HAS_MIN": True, "GROUP_SHIFT": 7, "BLOCK_M": block_m, "BLOCK_N": 8 // block_m,
               "BLOCK_W": 64, "SPLIT_K": 1})
    if bits > 4:
        return  # the general kernel reads these per column
    ints = dict.fromkeys(["M", "N", "K", "row_stride", "n_groups", "group", "stride_xm", "stride_ym"], "i32")
    floats = dict.fromkeys(["lut_a", "lut_b", "l0", "l1", "l2", "l3"], "fp32")
    for decode, block_m in ((0, 1), (2, 8)):
        build(_gemv_kernel, ptrs | {"codes_ptr": "*i16" if bits == 2 else "*i32", "lut_ptr": "*fp32"} | ints | floats,
              {"BITS": bits, "WORDS": True, "DECODE": decode, "HAS_MIN": True, "BLOCK_M": block_m, "BLOCK_N": 4,
               "BLOCK_W": 32, "PER": 32 if bits == 3 else 32 // bits, "UNROLL": 1, "GROUP_SHIFT": 6,
               "ROW_GROUPS": 1, "WORD_MULT": 2 if bits == 2 else 1, "SPLIT_K": 1})


def test_decode_plan_modes():
    from lowbit.kernels.dispatch import decode_plan
    from lowbit.kernels.triton_gemv import AFFINE, TABLE4

    for name, mode, a, b in [("int4_g32_sym", AFFINE, 1.0, -8.0), ("q4_1", AFFINE, 1.0, 0.0),
                             ("nz2_ch", AFFINE, 1.0, -1.5), ("std2_g32", AFFINE, 1.0, -2.0)]:
        _, plan = decode_plan(get_format(name), torch.device("cpu"))
        assert plan[:3] == (mode, a, b), name
    _, plan = decode_plan(get_format("pm12_g32"), torch.device("cpu"))
    assert plan[0] == TABLE4 and plan[3] == (-2.0, -1.0, 1.0, 2.0)


def test_kernel_mode_setter():
    from lowbit.kernels import dispatch

    before = dispatch.kernel_mode()
    try:
        dispatch.set_kernel_mode("reference")
        fmt, qt, x = _problem("int4_g32_sym", (16, 64), 2, seed=5)
        assert torch.equal(dequant_matmul(x, fmt, qt), dequant_matmul_reference(x, fmt, qt))
        with pytest.raises(ValueError):
            dispatch.set_kernel_mode("fast")
    finally:
        dispatch.set_kernel_mode(before)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                               reason="needs a CUDA GPU and triton")


@pytest.fixture
def triton_only(monkeypatch):
    """The Triton kernels on a GPU, also for the calls the CUDA tensor-core GEMV plans (tests/test_cuda_gemv.py)."""
    from lowbit.kernels import dispatch

    monkeypatch.setattr(dispatch, "_CUDA_GEMV", False)


@needs_gpu
@pytest.mark.parametrize("name,shape,m", CASES + GEMV_CASES + GEMM_CASES + E8P_CASES)
def test_triton_kernel_on_gpu(name, shape, m, triton_only):
    fmt, qt, x = _problem(name, shape, m, seed=4)
    qt, x = qt.to("cuda"), x.to("cuda", torch.float16)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    assert y.shape == ref.shape and ((y.double() - ref).norm() / ref.norm()) < 1e-2


@needs_gpu
@pytest.mark.parametrize("name", ["int4_g128_sym", "q4_0", "q4_1", "int2_g64_sym", "nz2_ch", "int3_g128_sym",
                                  "e8p_ch", "q5_0", "int6_g64_asym"])
@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_triton_kernel_on_gpu_model_shapes(name, m, triton_only):
    fmt, qt, x = _problem(name, (1024, 4096), m, seed=6)
    qt, x = qt.to("cuda"), x.to("cuda", torch.float16)
    y = dequant_matmul(x, fmt, qt)
    ref = x.double() @ fmt.dequantize(qt).double().T
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_every_triton_launch_states_its_fp_fusion():
    """Each kernel launch in lowbit passes launch.EXACT (no FMA contraction: bits equal to the torch reference's) or
    launch.FUSED (contraction on, as the kernels were measured) rather than Triton's default, which Triton 3.10 turns
    off. A launch is a call of a subscripted kernel or autotuner, ``kernel[grid](...)``, in a module that imports
    Triton."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "lowbit"
    launches, unstated = 0, []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        if "import triton" not in text:  # elsewhere a subscript call is a registry's, not a launch
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                spread = {ast.unparse(k.value) for k in node.keywords if k.arg is None}
                if not spread & {"EXACT", "FUSED"}:
                    unstated.append(f"{path.relative_to(src)}:{node.lineno}")
    assert launches >= 20, launches  # the scan finds lowbit's launches
    assert not unstated, unstated


def test_launch_lookups_compile_without_dynamo_warnings():
    """torch.compile traces what a kernel launch reads before the kernel (the dispatch's Triton check, the device's
    SMs, shared memory and architecture): none is an lru_cache-wrapped function, at which Dynamo warns (as it did in
    every compiled decode step)."""
    import warnings

    from lowbit.kernels import dispatch
    from lowbit.kernels.device import hopper, shared_memory, sm_count

    def step(x: torch.Tensor) -> torch.Tensor:
        sizes = sm_count(x.device) + shared_memory(x.device)[0] + int(hopper(x.device))
        return x * sizes if dispatch.triton_runs(x) else x + sizes

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = torch.compile(step, backend="eager", fullgraph=True)(torch.ones(3))
    assert torch.equal(y, step(torch.ones(3)))
    assert not [str(w.message) for w in seen if "lru_cache" in str(w.message)]
