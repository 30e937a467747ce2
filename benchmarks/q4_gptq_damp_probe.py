"""Probe (CPU, minutes): why does GPTQ lose to RTN at Q4_0 on the bundled SmolLM2? Damping vs act-order.

    python benchmarks/q4_gptq_damp_probe.py      # 8 x 512 calibration tokens, 4 eval windows: a quick, rough look

Measured (2-core CPU, 2026-11-23): fp16 21.21; rtn 25.84; gptq damp 0.01 26.11, 0.1 25.87, 1.0 26.27;
gptq_act (damp 0.01) 23.99. Damping does not explain it; act-order does most of the work on this model.
"""
import argparse

import lowbit
from lowbit.comparison import compare, rows_table

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
m, tok = lowbit.load(device="cpu")
calib = lowbit.CalibConfig(8, 512)
RUNS = ((0.01, ["rtn:q4_0", "gptq:q4_0", "gptq_act:q4_0"]), (0.1, ["gptq:q4_0"]), (1.0, ["gptq:q4_0"]))
for damp, variants in RUNS:
    rows, proto = compare(m, tok, variants, max_windows=4, calib=calib, gptq=lowbit.GPTQConfig(percdamp=damp),
                          progress=False)
    print(f"damp {damp}: {proto}", flush=True)
    print(rows_table(rows), flush=True)
