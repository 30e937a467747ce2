"""The CUDA GEMV's own source, run on the CPU (kernels/cuda_host.py: g++ compiles gemv_mma.cu after cuda/host.h,
each GPU thread a std::thread, PRMT / LOP3 / fp16 arithmetic emulated bit for bit, the MMA in fp32), against the
float64 reference on fresh random inputs: every served format, and the kernel's variants (staged rows or not, the
norm prologue and residual epilogue, gated, two row blocks per warp, blocks looping over row blocks, ragged K, and
the experimental switches). What needs a GPU is only how fast it runs (tests/test_cuda_gemv.py has the GPU runs).
"""

from __future__ import annotations

import zlib
from functools import cache

import pytest
import torch

from lowbit.formats import QuantizedTensor, get_format
from lowbit.kernels import cuda_gemv, cuda_host
from lowbit.kernels.reference import dequant_matmul_reference, rms_norm_reference
from test_cuda_gemv import SERVED  # every format the CUDA GEMV plans

pytestmark = pytest.mark.skipif(not cuda_host.available(), reason="needs g++ to run the CUDA source on the CPU")



@cache
def _packed(name: str, shape: tuple[int, int], seed: int) -> tuple:
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[:, ::97] *= 8  # a few large columns, as real weights have
    qt = fmt.quantize(w)
    return fmt, QuantizedTensor(qt.format, qt.shape, dict(qt.data))


def _inputs(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).half()
    return x, torch.randn(m, n, generator=g).half()


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _check(name: str, shape: tuple[int, int], m: int, *, gated: bool = False, norm: bool = False,
           residual: bool = False) -> None:
    fmt, qt = _packed(name, shape, zlib.crc32(f"{name}{shape}".encode()) % 1000)
    p = cuda_gemv.plan(fmt, shape)
    assert p is not None, f"{name} at {shape} is not served"
    x, res = _inputs(m, shape[1], shape[0] // 2 if gated else shape[0], seed=m)
    x[:, [5, 77]] = torch.tensor([3000.0, -2500.0], dtype=torch.float16)  # a residual stream's outlier channels
    nw = (1 + 0.3 * torch.randn(shape[1], generator=torch.Generator().manual_seed(1))).half()
    xin = rms_norm_reference(x, nw, 1e-5) if norm else x
    ref = dequant_matmul_reference(xin.double(), fmt, qt)
    y = cuda_gemv.gemv(x, fmt, qt, p, gated=gated, norm=(nw, 1e-5) if norm else None,
                       residual=res if residual else None)
    assert torch.isfinite(y).all()
    if gated:
        gate, up = ref.chunk(2, dim=-1)
        assert _err(y, torch.nn.functional.silu(gate) * up) < 3e-3
    elif residual:
        assert _err(y.double() - res.double(), ref) < 3e-3
    else:
        assert _err(y, ref) < 2e-3


@pytest.mark.parametrize("name", SERVED)
def test_every_format_on_the_cpu(name: str) -> None:
    """Batch 3, ragged rows (40), K = 1024: the kernel's decode, scales and MMA fragments for each format."""
    _check(name, (40, 1024), 3)


@pytest.mark.parametrize("name", ["nz2_ch", "q4_0", "e8p_ch", "iq2_xxs", "q3_k", "int3_g128_sym", "q5_1"])
@pytest.mark.parametrize("variant", ["norm+residual", "norm+gated", "two-per-warp", "rows-from-l2", "looping",
                                     "ragged-k"])
def test_kernel_variants_on_the_cpu(name: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 with the norm in the staging and a residual (or gated); batch 8 with two row blocks per warp, staged
    or read from L1/L2; 16-warp blocks looping over row blocks (on the CPU one "SM": two resident blocks); K = 576,
    not a whole number of steps (iq2_xxs: 2304; q3_k, whole superblocks only: 2304 over 8 warps)."""
    if variant == "norm+residual":
        _check(name, (64, 1024), 1, norm=True, residual=True)
    elif variant == "norm+gated":
        _check(name, (64, 1024), 1, norm=True, gated=True)
    elif variant in ("two-per-warp", "rows-from-l2"):
        monkeypatch.setattr(cuda_gemv, "ROW_TILES", "2")
        monkeypatch.setattr(cuda_gemv, "STAGED_ROWS", 8 if variant == "two-per-warp" else 1)
        _check(name, (72, 1024), 8, residual=True)
    elif variant == "looping":
        monkeypatch.setattr(cuda_gemv, "RESIDENT_GRID", "1")
        fmt = get_format(name)
        assert cuda_gemv.warps_for(cuda_gemv.plan(fmt, (8, 8192)), 8192) == cuda_gemv.WARPS_MANY
        _check(name, (72, 8192), 1)
    else:
        _check(name, (40, 2304 if name in ("iq2_xxs", "q3_k") else 576), 3)


@pytest.mark.parametrize("name", ["iq2_xxs", "int4_g128_sym", "e8p_g256", "int5_g128_sym"])
@pytest.mark.parametrize("m", [1, 8])
def test_step_scale_on_the_cpu(name: str, m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group scales once per step, plain and with two row blocks per warp (batch 8): the weights' scales reach the
    fp32 sums unrounded (IQ2_XXS's weights are ggml's exactly), so the output is as close to the exact product as
    its fp16 rounding."""
    if m == 8:
        monkeypatch.setattr(cuda_gemv, "ROW_TILES", "2")
    shape = (72, 2304 if name == "iq2_xxs" else 1024)
    fmt, qt = _packed(name, shape, 3)
    p = cuda_gemv.plan(fmt, shape)
    assert p.step_scaled()
    x, _ = _inputs(m, shape[1], shape[0], seed=m)
    ref = dequant_matmul_reference(x.double(), fmt, qt)
    err, rounding = _err(cuda_gemv.gemv(x, fmt, qt, p), ref), _err(ref.half(), ref)
    assert err <= 1.05 * rounding, (err, rounding)
    _check(name, (64, 1024), 1, gated=True)  # the gated epilogue too


@pytest.mark.parametrize(("name", "m", "cols"), [("nz2_ch", 1, 14336), ("q4_0", 1, 11008), ("e8p_ch", 3, 2048),
                                                ("iq2_xxs", 8, 2048)])
def test_staging_rows_of_several_passes_on_the_cpu(name: str, m: int, cols: int) -> None:
    """Staging takes several passes of the block's threads: rows of 3.5 passes (14336, 8 warps), odd ones (11008)
    and several staged rows, plain and normalized."""
    _check(name, (24, cols), m)
    if m == 1:
        _check(name, (24, cols), 1, norm=True, residual=True)


@pytest.mark.parametrize(("name", "shape", "m", "looped"), [("e8p_ch", (96, 11008), 8, True),
                                                       ("nz2_ch", (40, 14336), 8, False),
                                                       ("int2_g64_sym", (96, 4096), 5, True)])
def test_batch_rows_staged_past_64_kb_on_the_cpu(name: str, shape: tuple[int, int], m: int, looped: bool) -> None:
    """Batch rows staged in all the shared memory a Hopper block may have (8 rows of 11008 and of 14336; 5 rows of
    4096 in 8-warp blocks), the warps' partial sums after them where blocks loop over row blocks and over them where
    each block has one tile (8 rows of 14336 leave no room for both): the launch the CPU-run kernel gets (one SM)."""
    at = cuda_gemv.launch(cuda_gemv.plan(get_format(name), shape), m, shape[1], shape[0], torch.device("cpu"))
    assert (at.xs, at.per_warp) == (2, 2) and (at.grid < at.tiles) == looped
    assert at.shared == cuda_gemv.staged_bytes(m, shape[1]) + (cuda_gemv.part_bytes(at.warps) if looped else 0)
    _check(name, shape, m)


_PROBE = """
extern "C" __global__ void probe(unsigned* out) {
    if (threadIdx.x != 0) return;
    out[0] = prmt_host(0x44332211u, 0x88776655u, 0x7150u);  // bytes 0, 5, 1, 7 of {b, a}
    out[1] = prmt_host(0x00008000u, 0u, 0x0009u);  // nibble 9: byte 1's sign replicated
    out[2] = lop3(0xF0F0F0F0u, 0xCCCCCCCCu, 0xAAAAAAAAu, 0xEAu);  // (a & b) | c: the LUT itself
    out[3] = hfma2_host(0x40003C00u, 0x38004200u, 0xBC003C00u);  // (1 x 3 + 1, 2 x 0.5 - 1)
    out[4] = hfma2_host(0x3C013C01u, 0x3C013C01u, 0x80000000u);  // (1 + 2^-10)^2: one rounding, to 1 + 2^-9
    out[5] = hmul2_host(0x7BFF0001u, 0x40003800u);  // (2^-24 x 0.5: a tie, to even 0; 65504 x 2: inf)
}
"""


def test_emulated_operations_are_the_gpus() -> None:
    """The host emulation's PRMT (with sign replication), LOP3 and fp16 HFMA2 / HMUL2 (one rounding to nearest
    even, subnormals and overflow) against values worked out by hand from the PTX manual."""
    out = torch.zeros(6, dtype=torch.int32)
    cuda_host.HostKernel(_PROBE, "probe")((1, 1, 1), (32, 1, 1), [out])
    got = [int(v) & 0xFFFFFFFF for v in out]
    assert got == [0x88226611, 0x000000FF, 0xEAEAEAEA, 0x00004400, 0x3C023C02, 0x7C000000]


def test_cpu_kernels_take_cpu_tensors_and_flat_launches() -> None:
    kern = cuda_host.HostKernel(_PROBE, "probe")
    with pytest.raises(ValueError, match="CPU tensors"):
        kern((1, 1, 1), (32, 1, 1), [torch.zeros(6, dtype=torch.int32, device="meta")])
    with pytest.raises(ValueError, match="one-dimensional"):
        kern((2, 2, 1), (32, 1, 1), [torch.zeros(6, dtype=torch.int32)])


def test_formats_without_a_layout_decode_elsewhere_when_layouts_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_CUDA_LAYOUTS=0: the formats the kernel reads from a layout (K-quants, IQ2_XXS, 3-, 5-, 6-bit grids)
    are not served, so they keep their stored size on the device; the ones read as stored still are."""
    monkeypatch.setattr(cuda_gemv, "LAYOUTS", False)
    for name in ("q3_k", "iq2_xxs", "int3_g128_sym", "q5_0", "q4_0", "nz2_ch", "e8p_ch"):
        fmt, qt = _packed(name, (16, 256), 5)
        p = cuda_gemv.plan(fmt, qt.shape)
        assert cuda_gemv.layout_ready(fmt, qt, p) == (name in ("q4_0", "nz2_ch", "e8p_ch")), name


def test_a_layout_without_memory_leaves_the_weight_to_the_other_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a layout cannot be allocated the weight is refused once (a warning, no second try) and the dispatch
    computes it on the path that reads the stored bytes, with the same result."""
    from lowbit.kernels import dispatch

    builds = []

    def no_memory(*args: object) -> tuple:
        builds.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    fmt = get_format("int3_g128_sym")
    g = torch.Generator().manual_seed(7)
    qt = fmt.quantize(torch.randn(32, 512, generator=g))  # its own codes tensor: no layout cached for it yet
    monkeypatch.setattr(cuda_gemv, "affine_layout", no_memory)
    monkeypatch.setattr(cuda_gemv, "_refusal_warned", False)
    monkeypatch.setattr(dispatch, "cuda_gemv_plan", lambda x, f, shape: cuda_gemv.plan(f, shape))  # as on a GPU
    x = torch.randn(1, 512, generator=g).half()
    with pytest.warns(UserWarning, match="no GPU memory"):
        assert dispatch._cuda_plan(x, fmt, qt) is None
    assert dispatch._cuda_plan(x, fmt, qt) is None and len(builds) == 1
    y = dispatch.dequant_matmul(x, fmt, qt)
    assert _err(y, dequant_matmul_reference(x.double(), fmt, qt)) < 2e-3
    with pytest.raises(RuntimeError, match="no kernel layout"):
        cuda_gemv.gemv(x, fmt, qt, cuda_gemv.plan(fmt, qt.shape))


@pytest.mark.parametrize(("name", "m", "warps"), [("nz2_ch", 1, 24), ("e8p_ch", 8, 12), ("q4_0", 3, 4),
                                                  ("q3_k", 1, 32)])
def test_any_number_of_warps_on_the_cpu(name: str, m: int, warps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LOWBIT_CUDA_WARPS sets the warps of every block (for sweeps), powers of two or not: they split K and add
    their sums as the default 8 or 16 do, staged (batch 1, batch 8 of E8P) or not."""
    monkeypatch.setattr(cuda_gemv, "WARPS_SET", str(warps))
    shape = (40, 2304)
    at = cuda_gemv.launch(cuda_gemv.plan(get_format(name), shape), m, shape[1], shape[0], torch.device("cpu"))
    assert at.warps == warps
    _check(name, shape, m)


def test_the_pinned_row_address_is_chosen_as_lowbit_cuda_pin_xs_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda_gemv.PIN_XS: "0" never, "1" always (the CPU build reads the row as before, and still matches the
    reference), "auto" where the pinned kernel spills no more than the plain one (the driver's local-memory size,
    faked here) for the affine grids only, the plain one compiled only where the pinned one spills, any other value
    refused."""
    from lowbit.kernels import cuda_jit

    fmt, qt = _packed("nz2_ch", (40, 1024), 7)
    p = cuda_gemv.plan(fmt, qt.shape)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for setting, define in (("0", "#define PIN_XS 0"), ("1", "#define PIN_XS 1")):
        monkeypatch.setattr(cuda_gemv, "PIN_XS", setting)
        assert define in cuda_gemv._call(p, 1, 1024, 40, cpu, False, False, False).source
        _check("nz2_ch", (40, 1024), 1)

    plain, pinned = cuda_gemv._source(p, 1), cuda_gemv._source(p, 1, pin=True)
    spills: dict[bool, int] = {}
    compiled: list[bool] = []  # the kernels whose spills the choice read: pinned (True) or plain

    class Kernel:  # what cuda_jit.kernel returns on a GPU, as far as the choice reads it
        def __init__(self, source: str) -> None:
            self.pinned = source == pinned

        def attribute(self, which: int) -> int:
            assert which == 3  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
            compiled.append(self.pinned)
            return spills[self.pinned]

    monkeypatch.setattr(cuda_jit, "kernel", lambda source, name, device: Kernel(source))
    monkeypatch.setattr(cuda_gemv, "PIN_XS", "auto")
    for plain_bytes, pinned_bytes, want in ((0, 0, True), (0, 8, False), (32, 0, True), (16, 16, True)):
        spills.update({False: plain_bytes, True: pinned_bytes})
        compiled.clear()
        assert cuda_gemv.pinned(p, plain, pinned, cuda) is want
        assert compiled == ([True] if pinned_bytes == 0 else [True, False])
    assert cuda_gemv.pinned(p, plain, pinned, cpu) is False  # the CPU build has nothing to pin
    spills.update({False: 0, True: 0})
    for name in ("e8p_ch", "iq2_xxs", "q4_k"):  # measured no faster pinned: "auto" leaves them plain
        assert cuda_gemv.pinned(cuda_gemv.plan(get_format(name), (40, 1024)), plain, pinned, cuda) is False
    monkeypatch.setattr(cuda_gemv, "PIN_XS", "yes")
    with pytest.raises(ValueError, match="LOWBIT_CUDA_PIN_XS"):
        cuda_gemv.pinned(p, plain, pinned, cuda)
