"""Speed of the online randomized Hadamard of `+rht` linears (:mod:`lowbit.kernels.triton_hadamard`) against the
torch reference (needs CUDA).

    python benchmarks/hadamard.py                          # n = 4096, 11008, 14336 (+ 14336 as 7 x 2048), rows 1, 8
    python benchmarks/hadamard.py --sizes 4096,14336:7 --rows 1 --dtype bfloat16

Each size n is split as new rotations split it (``RandomizedHadamard(n, layout=LAYOUT)``); ``n:m`` forces the split
m x n/m with a random orthogonal F_m. For each size and row count: the median µs per call of the kernel and of the
torch reference (signs, ``fwht``, dense factor, with device-resident signs and F_m), timed as CUDA-graph replays of
many calls as in benchmarks/gemv_speed.py (launch overhead excluded), forward (input side) and inverse (output side).
Every output is first checked against the float64 reference. Power-of-two sizes also time a rotated layer's
junction (output side, residual, RMSNorm, input side: ``triton_hadamard.residual_norm``).
Writes benchmarks/results/hadamard-<tag>.json.
(``hadamard-h200.json`` also holds a tensor-core variant's columns, ``*_tc_us``, and ``hadamard-h200-cuda.json`` a
CUDA C++ variant's, ``*_cuda_us``, from the commits that had them.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowbit.rotations.hadamard import LAYOUT, RandomizedHadamard, fwht

sys.path.insert(0, str(Path(__file__).parent))
from gemv_speed import bench  # noqa: E402

SIZES = "4096,11008,14336,14336:7"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def rotation(spec: str, seed: int = 0) -> RandomizedHadamard:
    """``n`` as new rotations split it, or ``n:m`` with the split forced to m x n/m."""
    n, _, m = spec.partition(":")
    rot = RandomizedHadamard(int(n), seed=seed, layout=LAYOUT)
    if m and int(m) != rot.m:
        m, n = int(m), int(n)
        if n % m or (n // m) & (n // m - 1):
            raise ValueError(f"{spec}: n / m must be a power of two")
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        rot.m, rot.p, rot.factor = m, n // m, (q * torch.sign(torch.diagonal(r))).float()
        rot.seed = -m  # a key of its own in the kernel's caches
    return rot


def torch_reference(rot: RandomizedHadamard, signs: torch.Tensor, factor: torch.Tensor):  # noqa: ANN201
    """``rot.apply`` / ``rot.inverse`` with signs and F_m already on the device in x's dtype (the class's own
    methods copy its CPU signs per call, which a CUDA graph cannot capture)."""
    m, p = rot.m, rot.p

    def kron(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,...jb->...ib", f, fwht(x.reshape(*x.shape[:-1], m, p))).reshape(x.shape)

    def apply(x: torch.Tensor, inverse: bool) -> torch.Tensor:
        return kron(x, factor.t()) * signs if inverse else kron(x * signs, factor)

    return apply


def check(y: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """y's relative error vs the float64 reference (raises past 16-bit rounding)."""
    err = float((y.double() - want).norm() / want.norm())
    if not err < 2e-2:
        raise RuntimeError(f"{what}: relative error {err:.2e} vs reference")
    return err


def one(spec: str, rows: int, dtype: torch.dtype) -> dict:
    from lowbit.kernels import triton_hadamard as th

    rot = rotation(spec)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, rot.n, device="cuda", generator=g).to(dtype)
    ref_fn = torch_reference(rot, rot.signs.to("cuda", dtype), rot.factor.to("cuda", dtype))
    row = {"n": rot.n, "m": rot.m, "p": rot.p, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
           "kind": rot.kind, "layout": rot.layout}
    for inverse in (False, True):
        key = "inverse" if inverse else "apply"
        want = (rot.inverse if inverse else rot.apply)(x.double().cpu()).cuda()
        where = f"{spec} rows={rows} {key}"
        check(ref_fn(x, inverse), want, f"{where} torch")
        row[f"{key}_torch_us"] = 1e3 * bench(lambda i, inv=inverse: ref_fn(x, inv), 1)
        row[f"{key}_butterfly_err"] = check(th.rotate(rot, x, inverse=inverse), want, f"{where} kernel")
        row[f"{key}_butterfly_us"] = 1e3 * bench(lambda i, inv=inverse: th.rotate(rot, x, inverse=inv), 1)
    if rot.m == 1 and th.supported(rot.n):  # a rotated layer's junction: output side, residual, norm, input side
        v, r, w = rotation(spec, seed=1), torch.randn_like(x), torch.ones(rot.n, device="cuda", dtype=dtype)
        row["junction_triton_us"] = 1e3 * bench(lambda i: th.residual_norm(x, rot, r, w, 1e-5, v), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=SIZES, help="n or n:m (forced split), comma-separated")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/hadamard.py needs a CUDA GPU (none visible to torch)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    t0 = time.time()
    print(f"{torch.cuda.get_device_name(0)}, {args.dtype}; µs per call (CUDA-graph replay), apply / inverse")
    print("| n | m x p | rows | torch µs | kernel µs | junction µs |\n|---|---|---|---|---|---|")
    rows = []
    for spec in args.sizes.split(","):
        for r in (int(b) for b in args.rows.split(",")):
            row = one(spec, r, dtype)
            rows.append(row)
            us = [f"{row[f'{k}_{w}_us']:.1f}" for w in ("torch", "butterfly") for k in ("apply", "inverse")]
            junction = f"{row['junction_triton_us']:.1f}" if "junction_triton_us" in row else "-"
            cells = [f"{row['m']} x {row['p']}", str(r), f"{us[0]} / {us[1]}", f"{us[2]} / {us[3]}", junction]
            print(f"| {row['n']} | " + " | ".join(cells) + " |", flush=True)
    print(f"total {time.time() - t0:.0f} s")
    out = Path(__file__).parent / "results" / f"hadamard-{args.tag}.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "dtype": args.dtype, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
