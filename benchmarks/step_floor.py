"""How fast a decode step's weights can stream on this GPU, by how the step launches its matrices (needs CUDA).

    python benchmarks/step_floor.py                      # Llama-2-7B's 129 matrices at 2 bits per weight
    python benchmarks/step_floor.py --bits 2,4 --out benchmarks/results/step-floor-h200.json

A decode step of the 7B shape runs 129 GEMVs (per layer: q/k/v fused, o, gate/up fused, down; then the LM head), each
its own launch, and every GEMV takes a few µs more than its bytes need (docs/kernels.md, "Where the speed stands").
This times kernels that only read (``lowbit.kernels.cuda_read``: nothing decoded, no activations) over the same
bytes, laid out back to back, launched each way a step could launch them:

* ``per matrix, one pass``: a launch per matrix, one block per 256 x unroll units (gemv_speed's read-only yardstick)
* ``per matrix, resident``: a launch per matrix, the blocks that stay resident looping over it (the GEMVs' RESIDENT
  grids); ``+ early``: programmatic dependent launches, first loads before the wait (as the compiled step's GEMVs);
  ``+ early + ahead``: each thread's first 8 units copied into shared memory before the wait instead; ``+ early +
  L2``: the block's whole share of the matrix requested into L2 (bulk prefetches) before the wait
* ``per layer, barrier``: a launch per layer, a grid barrier after each of its matrices (a layer kernel)
* ``one launch, barrier``: the whole step, a grid barrier after each matrix (a step kernel, whose matrices feed each
  other); ``+ prefetch``: each thread's first loads of the next matrix issued before the barrier; ``+ ahead``: its
  first 8 units of the next matrix copied into shared memory (cp.async) before the barrier; ``+ L2``: the block's
  whole share of the next matrix requested into L2 before the barrier
* ``one launch, no barrier``: the bytes alone

Each way's steps are timed as gemv_speed times calls (CUDA graphs of four steps, replayed, the median per step);
for each, the fastest of the unrolls and blocks per SM tried is kept, and its time per step, bandwidth as a share
of the measured copy bandwidth, and cost per matrix beyond the bytes alone are printed. Bytes are the packed codes
(rows x cols x bits / 8): no scales, no activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemv_speed import bench, device_bandwidth  # noqa: E402
from lowbit.kernels import cuda_read  # noqa: E402

# Llama-2-7B's decode GEMVs, fused as lowbit's compiled step runs them: per layer q/k/v, o, gate/up, down
LAYER = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
HEAD = (32000, 4096)
UNROLLS = (4, 8, 16)
PER_SM = (1, 2, 4)


def matrix_units(layers: int, bits: int) -> list[int]:
    """16-byte units of each matrix of a step, in launch order."""
    return [-(-rows * cols * bits // 8 // 16) for rows, cols in LAYER * layers + [HEAD]]


def ways(buf: torch.Tensor, bounds: torch.Tensor, units: list[int], sms: int) -> dict:
    """{way: callable(unroll, per_sm) -> the step's launches} for every way of launching the step (module doc)."""
    n, sync = len(units), torch.zeros(2, dtype=torch.int32, device=buf.device)
    early_ok = torch.cuda.get_device_capability(buf.device) >= (9, 0)

    def per_matrix(one_pass: bool, early: bool = False, prefetch: int = 0):  # noqa: ANN202
        def run(unroll: int, per_sm: int) -> None:
            for i, u in enumerate(units):
                blocks = -(-u // (256 * unroll)) if one_pass else sms * per_sm
                cuda_read.stream_phases(buf, bounds, blocks, first=i, phases=1, unroll=unroll, early=early,
                                        prefetch=prefetch, per_sm=per_sm)
        return run

    def per_layer(unroll: int, per_sm: int) -> None:
        for i in range(0, n, len(LAYER)):
            cuda_read.stream_phases(buf, bounds, sms * per_sm, first=i, phases=min(len(LAYER), n - i),
                                    unroll=unroll, barrier=True, sync=sync, per_sm=per_sm)

    def whole(barrier: bool, prefetch: int = 0):  # noqa: ANN202
        return lambda unroll, per_sm: cuda_read.stream_phases(buf, bounds, sms * per_sm, unroll=unroll,
                                                              barrier=barrier, prefetch=prefetch, sync=sync,
                                                              per_sm=per_sm)
    out = {"per matrix, one pass": per_matrix(True), "per matrix, resident": per_matrix(False)}
    if early_ok:
        out["per matrix, one pass + early"] = per_matrix(True, early=True)
        out["per matrix, resident + early"] = per_matrix(False, early=True)
        out["per matrix, resident + early + ahead"] = per_matrix(False, early=True, prefetch=2)
        out["per matrix, resident + early + L2"] = per_matrix(False, early=True, prefetch=3)
    out |= {"per layer, barrier": per_layer, "one launch, barrier": whole(True),
            "one launch, barrier + prefetch": whole(True, prefetch=1),
            "one launch, barrier + ahead": whole(True, prefetch=2), "one launch, barrier + L2": whole(True, prefetch=3),
            "one launch, no barrier": whole(False)}
    return out


def timed(launch, unroll: int, per_sm: int) -> tuple[float, int, int] | None:  # noqa: ANN001
    """(ms a step, unroll, per_sm), or None where a barrier's grid of ``per_sm`` blocks an SM cannot all be resident
    on this GPU. Four steps a graph: a 2-bit step is ~0.5-0.8 ms of its own."""
    try:
        return bench(lambda _: launch(unroll, per_sm), 1, calls=4), unroll, per_sm
    except ValueError as e:
        if "not all resident" not in str(e):  # only stream_phases' residency check skips a configuration
            raise
        return None


def check(buf: torch.Tensor, bounds: torch.Tensor, sms: int) -> None:
    """The one-launch kernels read every unit once (their XOR is the buffer's), before anything is timed."""
    want = int(cuda_read.xor_all(buf))
    for barrier, prefetch in ((False, 0), (True, 0), (True, 1), (True, 2), (True, 3)):
        got = int(cuda_read.xor_all(cuda_read.stream_phases(buf, bounds, sms, barrier=barrier, prefetch=prefetch)))
        if got != want:
            raise SystemExit(f"stream_phases (barrier={barrier}, prefetch={prefetch}) read the wrong bytes")


def run_bits(bits: int, layers: int, bw: float) -> list[dict]:
    units = matrix_units(layers, bits)
    bounds = torch.tensor([0] + units, dtype=torch.int64).cumsum(0).cuda()
    total = int(bounds[-1])
    buf = torch.randint(-(2**31), 2**31 - 1, (total * 4,), dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    check(buf, bounds, sms)
    nbytes, rows = 16 * total, []
    print(f"\n{bits} bits per weight: {len(units)} matrices, {nbytes / 1e9:.3f} GB a step, "
          f"{nbytes / bw * 1e6:.0f} µs at copy bandwidth")
    print("| way | unroll | blocks per SM | µs per step | % of copy BW | µs per matrix beyond the bytes alone |")
    print("|---|---|---|---|---|---|")
    floor = None
    for name, launch in reversed(list(ways(buf, bounds, units, sms).items())):  # the bytes alone first
        ms, unroll, per_sm = min(t for u in UNROLLS for s in PER_SM if (t := timed(launch, u, s)) is not None)
        floor = ms if floor is None else floor
        row = {"bits": bits, "way": name, "unroll": unroll, "per_sm": per_sm, "us_per_step": 1e3 * ms,
               "pct_copy_bw": 100 * nbytes / (ms * 1e-3) / bw, "matrices": len(units), "bytes": nbytes,
               "us_per_matrix_over_floor": 1e3 * (ms - floor) / len(units)}
        rows.append(row)
        print(f"| {name} | {unroll} | {per_sm} | {row['us_per_step']:.1f} | {row['pct_copy_bw']:.0f}% | "
              f"{row['us_per_matrix_over_floor']:.2f} |")
    del buf
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2", help="bits per weight, comma-separated (2: 1.6 GB a step, 4: 3.3 GB)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the step (32: Llama-2-7B)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    bw = device_bandwidth()
    if bw is None:
        return []
    rows = [r for bits in args.bits.split(",") for r in run_bits(int(bits), args.layers, bw)]
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_bw": bw, "rows": rows},
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()
