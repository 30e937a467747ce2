"""Probe: why does act-order help GPTQ so much on the bundled SmolLM2 (Q4_0 27.9 -> 26.0)? Column order, or the
group scales it implies (act-order fits every group's scale on the original weights: "static groups")?

    LOWBIT_KERNELS=reference python benchmarks/gptq_order_probe.py [--nsamples 128 --max-windows 0]  # GPU: minutes

Prints lowbit's perplexity table for rtn, gptq (natural order, scales fitted on updated weights), gptq with
static groups (natural order), gptq_act (act-order, static groups).

Measured (H100, 128 x 2048 calibration tokens, whole eval split; benchmarks/results/gptq-order-probe-h100.txt):
rtn 26.35, gptq 27.87, gptq static groups 29.83, gptq_act 26.00 (fp16 21.75). Static groups alone make GPTQ
worse: act-order's gain here is the column order (massive-activation columns first), not the group scales.
"""
import argparse
import copy

import lowbit
from lowbit.comparison import compare, rows_table

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--format", default="q4_0")
ap.add_argument("--nsamples", type=int, default=128)
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--max-windows", type=int, default=0, help="0: the whole eval split")
a = ap.parse_args()
m, tok = lowbit.load()  # on the GPU if any: compare quantizes and scores where the model is
calib = lowbit.CalibConfig(a.nsamples, a.seqlen)
windows = a.max_windows or None
RUNS = (("default", lowbit.GPTQConfig(), [f"rtn:{a.format}", f"gptq:{a.format}", f"gptq_act:{a.format}"]),
        ("static groups", lowbit.GPTQConfig(static_groups=True), [f"gptq:{a.format}"]))
for label, cfg, variants in RUNS:
    rows, proto = compare(copy.deepcopy(m), tok, variants, max_windows=windows, calib=calib, gptq=cfg,
                          progress=False)
    print(f"{label}: {proto}", flush=True)
    print(rows_table(rows), flush=True)
