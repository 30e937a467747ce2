"""Static instruction count of the CUDA GEMV's main loop, per format, without a GPU.

    python benchmarks/sass_count.py --formats nz2_ch,e8p_ch,iq2_xxs,q4_0 --cols 4096 --batch 1

NVRTC compiles the kernel the planner would build (sm_90, as dispatch launches it) and ``nvdisasm`` (shipped in
Triton's wheel) lists its SASS; the innermost backward-branch loop with MMAs is the step loop (one or two steps a
pass). Printed: its instructions per step, the weights one lane decodes per step (two rows of a 16-byte chunk),
instructions per weight, those of the two math pipes the decode loads (per step, as Nsight Compute's ``pipe_alu``
and ``pipe_fma`` count them: :data:`ALU`, :data:`FMA`), local-memory accesses (spills: per step in the loop, and in
the whole kernel) and the opcode mix (per step). The GEMV is bound by instruction issue, latency and a fixed cost
per call (docs/kernels.md): fewer instructions have not always measured faster (E8P's two-word tables, the sums of
raw magic numbers), so a timing on a GPU (``benchmarks/gemv_speed.py``) decides a change.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.formats import get_format
from lowbit.kernels import cuda_gemv, cuda_jit

# The opcodes of Hopper's ALU and FMA pipes (IMAD in every form, and the fp16 pairs, issue to the FMA pipe)
ALU = {"LOP3", "SHF", "PRMT", "IADD3", "VIADD", "ISETP", "LEA", "SEL", "MOV", "IMNMX", "FSETP", "FMNMX"}
FMA = {"IMAD", "IMUL", "FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2"}


def nvdisasm_found() -> Path | None:
    """Triton's wheel's nvdisasm, or None without it."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return path if path.exists() else None


def source_sass(source: str) -> str:
    """The SASS of a gemv_mma.cu ``source`` compiled for sm_90 (as dispatch launches it on Hopper)."""
    path = nvdisasm_found()
    if path is None:
        raise SystemExit("nvdisasm not found (it comes with Triton's wheel)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cuda_jit.compile_cubin(source, "gemv_mma.cu", "sm_90"))
        f.flush()
        return subprocess.run([str(path), "-c", f.name], capture_output=True, text=True, check=True).stdout


def kernel_sass(name: str, cols: int, m: int, resident: bool | None = None) -> str:
    """The SASS of the kernel dispatch builds for ``name`` at ``cols`` columns and batch ``m``; ``resident``: blocks
    that loop over row blocks (None: as dispatch launches it, at 16 warps)."""
    p = cuda_gemv.plan(get_format(name), (64, cols))
    if p is None:
        raise SystemExit(f"{name} at {cols} columns is not served by the CUDA GEMV")
    warps = cuda_gemv.warps_for(p, cols)
    xs = cuda_gemv.staging(m, cols, p)
    full = cols % (4 * cuda_gemv.half_per_chunk(p)) == 0
    if resident is None:
        resident = warps >= cuda_gemv.WARPS_MANY and cuda_gemv._resident_grid()
    return source_sass(cuda_gemv._source(p, xs, warps, cuda_gemv.min_blocks_for(warps, m), False, full,
                                         resident=resident))


def local_accesses(instructions: list[str]) -> int:
    """Loads and stores of local memory (spills: LDL, STL) among ``instructions``."""
    return sum(bool(re.search(r"\b(LDL|STL)\b", t)) for t in instructions)


_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);")  # nvdisasm: /*offset*/ instruction ;


def instructions(sass: str) -> list[str]:
    return [m.group(1).strip() for line in sass.splitlines() if (m := _INSTRUCTION.match(line))]


def main_loop(sass: str) -> list[str]:
    """Instructions of the innermost loop with tensor-core MMAs in it (a label and a backward branch to it)."""
    labels: dict[str, int] = {}
    ins: list[str] = []
    for line in sass.splitlines():
        if m := re.match(r"\.(L_x_\d+):", line.strip()):
            labels[m.group(1)] = len(ins)
        if m := _INSTRUCTION.match(line):
            ins.append(m.group(1).strip())
    loops = [(labels[m.group(1)], j) for j, t in enumerate(ins)
             if (m := re.search(r"BRA\s+`\(\.(L_x_\d+)\)", t)) and labels.get(m.group(1), j) < j]
    loops = [(a, b) for a, b in loops if any(t.startswith("HMMA") for t in ins[a:b + 1])]
    a, b = min(loops, key=lambda ab: ab[1] - ab[0])  # the innermost: a resident block's loop over row blocks holds it
    return ins[a:b + 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="nz2_ch,e8p_ch,iq2_xxs,q4_0")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resident", choices=["auto", "0", "1"], default="auto",
                    help="blocks that loop over row blocks: as dispatch launches them (auto), never or always")
    args = ap.parse_args(argv)
    resident = None if args.resident == "auto" else args.resident == "1"
    try:
        cuda_jit._nvrtc()
    except cuda_jit.CudaJitError:
        print("needs NVRTC (the nvidia-cuda-nvrtc wheel of the test extra)", file=sys.stderr)
        return 2
    print("| format | loop instructions | weights per lane and step | per weight | ALU pipe | FMA pipe | "
          "spills: loop / kernel | top opcodes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.formats.split(","):
        sass = kernel_sass(name, args.cols, args.batch, resident)
        body = main_loop(sass)
        ops = collections.Counter(re.sub(r"^@!?U?P[T\d]+\s+", "", t).split()[0].split(".")[0] for t in body)
        weights = 2 * cuda_gemv.half_per_chunk(cuda_gemv.plan(get_format(name), (64, args.cols)))
        # a step is weights / 8 MMAs of the lane (m16n8k16: 8 weights each); the two-step loop (PAIRED) has two
        steps = ops["HMMA"] * 8 // weights
        top = ", ".join(f"{k} {v // steps}" for k, v in ops.most_common(8))
        per_step = len(body) / steps
        alu, fma = (sum(v for k, v in ops.items() if k in pipe) / steps for pipe in (ALU, FMA))
        spills = f"{local_accesses(body) / steps:g} / {local_accesses(instructions(sass))}"
        print(f"| {name} | {per_step:g} | {weights} | {per_step / weights:.2f} | {alu:g} | {fma:g} | {spills} "
              f"| {top} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
