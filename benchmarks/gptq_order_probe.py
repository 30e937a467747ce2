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

from lowbit.algorithms.sequential import CalibConfig, GPTQConfig
from lowbit.models.loader import load_model
from lowbit.pipeline import compare, default_device, round_to_storage, rows_table

ap = argparse.ArgumentParser()
ap.add_argument("--format", default="q4_0")
ap.add_argument("--nsamples", type=int, default=128)
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--max-windows", type=int, default=0, help="0: the whole eval split")
a = ap.parse_args()
m, tok = load_model(None, device="cpu")
m = round_to_storage(m.float()).to(default_device())  # compare quantizes and scores where the model is
calib = CalibConfig(a.nsamples, a.seqlen)
windows = a.max_windows or None
for label, cfg, variants in (("default", GPTQConfig(), [f"rtn:{a.format}", f"gptq:{a.format}", f"gptq_act:{a.format}"]),
                             ("static groups", GPTQConfig(static_groups=True), [f"gptq:{a.format}"])):
    rows, proto = compare(copy.deepcopy(m), tok, variants, max_windows=windows, calib=calib, gptq=cfg,
                          progress=False)
    print(f"{label}: {proto}", flush=True)
    print(rows_table(rows), flush=True)
