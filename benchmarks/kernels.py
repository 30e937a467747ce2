"""GEMV/GEMM speed of the packed low-bit kernels vs the memory-bandwidth limit and fp16 cuBLAS (needs CUDA).

    python benchmarks/kernels.py                      # Llama-2-7B and Llama-3-8B shapes, batch 1, all formats
    python benchmarks/kernels.py --batch 1,8,512 --formats int4_g128_sym,nz2_ch

For each weight shape [out, in] and format: the kernel's median time (triton.testing.do_bench, CUDA events, L2
flushed by rotating among several weight copies), the bytes it must move (packed weight + scales + x + y), the
achieved bandwidth as a fraction of the measured device-to-device copy bandwidth, and the speedup over fp16
``F.linear``. Every kernel output is first checked against the torch reference on fresh random inputs.
Writes benchmarks/results/kernels-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.formats import get_format
from lowbit.kernels.dispatch import dequant_matmul
from lowbit.kernels.reference import dequant_matmul_reference

SHAPES = {  # [out, in]
    "llama2-7b qkvo": (4096, 4096), "llama2-7b gate/up": (11008, 4096), "llama2-7b down": (4096, 11008),
    "llama3-8b kv": (1024, 4096), "llama3-8b gate/up": (14336, 4096), "llama3-8b down": (4096, 14336),
}
FORMATS = ["int4_g128_sym", "q4_0", "q4_1", "int3_g128_sym", "int2_g64_sym", "nz2_ch"]
COPIES = 4  # weight copies rotated between timed calls so the 50 MB L2 does not serve repeats


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=500, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench(fn, n: int) -> float:  # noqa: ANN001
    import triton.testing

    state = {"i": 0}

    def call() -> None:
        fn(state["i"] % n)
        state["i"] += 1
    return triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median")


def one(shape: tuple[int, int], fmt_name: str, m: int, bw: float) -> dict:
    fmt = get_format(fmt_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(*shape, device="cuda", generator=g)
    qts = [fmt.quantize(w * (1 + 0.01 * i)) for i in range(COPIES)]
    x = torch.randn(m, shape[1], device="cuda", dtype=torch.float16, generator=g)
    y = dequant_matmul(x, fmt, qts[0])
    ref = dequant_matmul_reference(x.double(), fmt, qts[0])
    err = float((y.double() - ref).norm() / ref.norm())
    if not err < 1e-2:
        raise RuntimeError(f"{fmt_name} {shape} M={m}: relative error {err:.2e} vs reference")
    ms = bench(lambda i: dequant_matmul(x, fmt, qts[i]), COPIES)
    w16 = [w.half() * (1 + 0.01 * i) for i in range(COPIES)]
    ms16 = bench(lambda i: F.linear(x, w16[i]), COPIES)
    nbytes = qts[0].nbytes + 2 * x.numel() + 2 * m * shape[0]
    return {"shape": list(shape), "format": fmt_name, "batch": m, "bpw": qts[0].bits_per_weight, "ms": ms,
            "fp16_ms": ms16, "bytes": nbytes, "frac_of_copy_bw": nbytes / (ms * 1e-3) / bw,
            "speedup_vs_fp16": ms16 / ms, "rel_err": err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batch", default="1")
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: device copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    print("| shape | format | batch | bpw | µs | fp16 µs | % of copy BW | speedup vs fp16 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        for m in (int(b) for b in args.batch.split(",")):
            for f in args.formats.split(","):
                r = one(shape, f, m, bw) | {"label": label}
                rows.append(r)
                print(f"| {label} {shape[0]}x{shape[1]} | {f} | {m} | {r['bpw']:.3f} | {r['ms'] * 1e3:.1f} | "
                      f"{r['fp16_ms'] * 1e3:.1f} | {100 * r['frac_of_copy_bw']:.0f}% | {r['speedup_vs_fp16']:.2f}x |",
                      flush=True)
    out = Path(__file__).parent / "results" / f"kernels-{args.tag}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_bw": bw, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
