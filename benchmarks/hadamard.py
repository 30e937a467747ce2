"""Speed of the online randomized Hadamard (:mod:`lowbit.kernels.triton_hadamard`): butterfly kernel vs tensor-core
kernel vs the torch reference (needs CUDA).

    python benchmarks/hadamard.py                          # n = 4096, 11008, 14336 (+ 14336 as 7 x 2048), rows 1, 8
    python benchmarks/hadamard.py --sizes 4096,14336:7 --rows 1 --dtype bfloat16 --tc-targets 1,32,128

Each size n is split as ``RandomizedHadamard(n)`` splits it for new rotations (its current layout); ``n:m`` forces
the split m x n/m with a random orthogonal F_m (any split the class may give). For each size and row count: the
median µs per call of ``rotate`` forced to each kernel (``triton_hadamard.PATH``) and of the torch reference
(signs, ``fwht``, dense factor, with device-resident signs and F_m), timed as CUDA-graph replays of many calls as in
benchmarks/kernels.py (graph decode: launch overhead excluded). The inverse is timed too (output-side rotations).
``--tc-targets`` times the tensor-core kernel once per value of TC_TARGET_PROGRAMS (how far a chunk's columns are
split over programs at small batch). Every output is first checked against the float64 reference. The tensor-core
kernel needs p >= 256 and a 16-bit dtype ("-" otherwise). Writes benchmarks/results/hadamard-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowbit.rotations import hadamard as rh
from lowbit.rotations.hadamard import RandomizedHadamard, fwht

sys.path.insert(0, str(Path(__file__).parent))
from kernels import bench  # noqa: E402

SIZES = "4096,11008,14336,14336:7"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def rotation(spec: str, seed: int = 0) -> RandomizedHadamard:
    """``n`` as the class splits it for new rotations, or ``n:m`` with the split forced to m x n/m."""
    n, _, m = spec.partition(":")
    n = int(n)
    layout = getattr(rh, "LAYOUT", None)
    rot = RandomizedHadamard(n, seed=seed) if layout is None else RandomizedHadamard(n, seed=seed, layout=layout)
    if m and int(m) != rot.m:
        m = int(m)
        if n % m or (n // m) & (n // m - 1):
            raise ValueError(f"{spec}: n / m must be a power of two")
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        rot.m, rot.p, rot.factor = m, n // m, (q * torch.sign(torch.diagonal(r))).float()
    return rot


def torch_reference(rot: RandomizedHadamard, signs: torch.Tensor, factor: torch.Tensor):  # noqa: ANN201
    """``rot.apply`` / ``rot.inverse`` with signs and F_m already on the device in x's dtype (the class's own
    methods copy its CPU signs per call, which a CUDA graph cannot capture)."""
    m, p = rot.m, rot.p

    def kron(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        y = fwht(x.reshape(*x.shape[:-1], m, p))
        return torch.einsum("ij,...jb->...ib", f, y).reshape(x.shape)

    def apply(x: torch.Tensor, inverse: bool) -> torch.Tensor:
        return kron(x, factor.t()) * signs if inverse else kron(x * signs, factor)

    return apply


def check(y: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """y's relative error vs the float64 reference (raises past 16-bit rounding)."""
    err = float((y.double() - want).norm() / want.norm())
    if not err < 2e-2:
        raise RuntimeError(f"{what}: relative error {err:.2e} vs reference")
    return err


def one(spec: str, rows: int, dtype: torch.dtype, targets: list[int]) -> dict:
    from lowbit.kernels import triton_hadamard as th

    rot = rotation(spec)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, rot.n, device="cuda", generator=g).to(dtype)
    ref_fn = torch_reference(rot, rot.signs.to("cuda", dtype), rot.factor.to("cuda", dtype))
    row = {"n": rot.n, "m": rot.m, "p": rot.p, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
           "kind": rot.kind, "layout": getattr(rot, "layout", None)}
    saved = (th.PATH, th.TC_TARGET_PROGRAMS)
    try:
        for inverse in (False, True):
            key = "inverse" if inverse else "apply"
            want = (rot.inverse if inverse else rot.apply)(x.double().cpu()).cuda()
            where = f"{spec} rows={rows} {key}"
            row[f"{key}_torch_us"] = 1e3 * bench(lambda i, inv=inverse: ref_fn(x, inv), 1)
            check(ref_fn(x, inverse), want, f"{where} torch")
            th.PATH = "butterfly"
            row[f"{key}_butterfly_err"] = check(th.rotate(rot, x, inverse=inverse), want, f"{where} butterfly")
            row[f"{key}_butterfly_us"] = 1e3 * bench(lambda i, inv=inverse: th.rotate(rot, x, inverse=inv), 1)
            row[f"{key}_tc_us"], row["tc_config"] = {}, {}
            if th.tensor_core_supported(rot.p, dtype):
                th.PATH = "tensor_core"
                a, b = th._tc_shape(rot.p)
                for t in targets:
                    th.TC_TARGET_PROGRAMS = t
                    row[f"{key}_tc_err"] = check(th.rotate(rot, x, inverse=inverse), want,
                                                   f"{where} tensor core (target {t})")
                    row[f"{key}_tc_us"][t] = 1e3 * bench(lambda i, inv=inverse: th.rotate(rot, x, inverse=inv), 1)
                    block_n, num_warps = th._tc_config(rows * rot.m, a, b)
                    row["tc_config"][t] = {"a": a, "b": b, "block_n": block_n, "num_warps": num_warps,
                                           "grid": [rows * rot.m, b // block_n]}
    finally:
        th.PATH, th.TC_TARGET_PROGRAMS = saved
    return row


def fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=SIZES, help="n or n:m (forced split), comma-separated")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--tc-targets", default=None,
                    help="values of triton_hadamard.TC_TARGET_PROGRAMS to time (default: the module's)")
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/hadamard.py needs a CUDA GPU (none visible to torch)", file=sys.stderr)
        return 2
    try:
        from lowbit.kernels import triton_hadamard as th
    except ImportError as e:
        print(f"benchmarks/hadamard.py needs triton: {e}", file=sys.stderr)
        return 2
    targets = ([int(t) for t in args.tc_targets.split(",")] if args.tc_targets else [th.TC_TARGET_PROGRAMS])
    dtype = DTYPES[args.dtype]
    t0 = time.time()
    print(f"{torch.cuda.get_device_name(0)}, {args.dtype}; µs per call (CUDA-graph replay), apply / inverse")
    tc_cols = " | ".join(f"tensor core µs (target {t})" for t in targets)
    print(f"| n | m x p | rows | torch µs | butterfly µs | {tc_cols} | best tc vs butterfly |")
    print("|---|---|---|---|---|" + "---|" * len(targets) + "---|")
    rows = []
    for spec in args.sizes.split(","):
        for r in (int(b) for b in args.rows.split(",")):
            row = one(spec, r, dtype, targets)
            rows.append(row)
            cells = []
            for t in targets:
                cells.append(" / ".join(fmt_us(row[f"{k}_tc_us"].get(t)) for k in ("apply", "inverse")))
            tc_best = [min(row[f"{k}_tc_us"].values(), default=None) for k in ("apply", "inverse")]
            speed = ("-" if tc_best[0] is None else
                     " / ".join(f"{row[f'{k}_butterfly_us'] / b:.2f}x" for k, b in zip(("apply", "inverse"), tc_best,
                                                                                      strict=True)))
            print(f"| {row['n']} | {row['m']} x {row['p']} | {r} | "
                  f"{fmt_us(row['apply_torch_us'])} / {fmt_us(row['inverse_torch_us'])} | "
                  f"{fmt_us(row['apply_butterfly_us'])} / {fmt_us(row['inverse_butterfly_us'])} | "
                  f"{' | '.join(cells)} | {speed} |", flush=True)
    print(f"total {time.time() - t0:.0f} s")
    out = Path(__file__).parent / "results" / f"hadamard-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "dtype": args.dtype, "targets": targets,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
