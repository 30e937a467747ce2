"""Quality table: perplexity and true bits/weight of every quantization variant on one model.

    python benchmarks/quality.py                         # bundled SmolLM2-135M, full eval split (GPU: ~1 min)
    python benchmarks/quality.py --max-windows 8         # CPU-friendly subset
    python benchmarks/quality.py --variants fp16,int4_g128_asym --model /path/to/hf-model

Prints a markdown table (variant, bpw of decoder linears, sizes, perplexity, delta vs fp16) with the command,
model, data, protocol and hardware, and writes the same to benchmarks/results/quality-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import lowbit
from lowbit.atomic import atomic_file
from lowbit.comparison import Row, compare, rows_table

# RTN rows (foundation issue), plus MSE-clipped variants at 3 and 2 bits.
RTN_VARIANTS = [
    "int4_g32_sym", "int4_g32_asym", "int4_g64_sym", "int4_g64_asym", "int4_g128_sym", "int4_g128_asym",
    "int3_g128_sym", "int3_g128_asym", "int3_g128_asym_mse", "int3_g64_sym", "int3_g64_asym",
    "int2_g64_sym", "int2_g64_asym", "int2_g64_asym_mse", "int2_g32_sym", "int2_g32_asym",
]
# GPTQ rows (GPTQ issue): W4 g128, W3 g128, W3 g64, W2 g64, W2 g32, sym and asym; act-order on two of them.
GPTQ_VARIANTS = [f"gptq:int{b}_g{g}_{k}" for b, g in ((4, 128), (3, 128), (3, 64), (2, 64), (2, 32))
                 for k in ("sym", "asym")] + ["gptq_act:int3_g128_sym", "gptq_act:int2_g64_asym"]
# W2 per-channel level sets x {no rotation, randomized Hadamard} x {RTN, GPTQ}, and the no-zero ratio sweep.
W2_VARIANTS = [f"{m}{r}:{f}_ch" for m in ("rtn", "gptq") for r in ("", "+rht") for f in ("std2", "pm12", "nz2")]
RATIO_SWEEP = [f"rtn+rht:nz2r{r}_ch" for r in (20, 25, 30, 35, 40)]
GPTQ_RATIO_SWEEP = [f"gptq+rht:nz2r{r}_ch" for r in (20, 25, 30, 40)]  # r = 1/3 is nz2_ch, in W2_VARIANTS
# Simulated 4-bit activations (+a4) and KV cache (+kv4): the best W2 rows vs W4A4/KV4 and W3A4 (rotated; one
# unrotated W4A4/KV4 row shows what the rotation buys). Each quantization is shared by its rows.
A4_VARIANTS = ["fp16+a4+kv4", "fp16+kv4",
               "gptq+rht:nz2_ch", "gptq+rht:nz2_ch+a4+kv4", "gptq+rht:pm12_ch+a4+kv4",
               "gptq+rht:int4_g128_sym", "gptq+rht:int4_g128_sym+a4+kv4", "rtn:int4_g128_sym+a4+kv4",
               "gptq+rht:int3_g128_sym", "gptq+rht:int3_g128_sym+a4"]
# Mixed precision: half of the 30 layers (the most sensitive) at 3 or 4 bits, and the planner at 2.5 / 3 bpw.
MIXED_VARIANTS = ["gptq+rht:nz2_ch/int4_g128_sym@15L", "gptq+rht:nz2_ch/int3_g128_sym@15L",
                  "gptq+rht:nz2_ch/int3_g128_sym/int4_g128_sym@2.5bpw",
                  "gptq+rht:nz2_ch/int3_g128_sym/int4_g128_sym@3bpw"]
# E8 lattice 2-bit codebooks (~2.06-2.08 bpw): nearest, importance-weighted (imatrix), block LDLQ, + rotation.
E8_VARIANTS = ["rtn:iq2_xxs", "imatrix:iq2_xxs", "gptq:iq2_xxs", "gptq+rht:iq2_xxs", "rtn+rht:e8p_ch",
               "gptq+rht:e8p_ch"]
SETS = {"rtn": ["fp16", *RTN_VARIANTS], "gptq": ["fp16", *GPTQ_VARIANTS], "w2": ["fp16", *W2_VARIANTS, *RATIO_SWEEP],
        "sweep": ["fp16", *GPTQ_RATIO_SWEEP], "a4": ["fp16", *A4_VARIANTS], "mixed": ["fp16", *MIXED_VARIANTS],
        "e8": ["fp16", *E8_VARIANTS], "all": ["fp16", *RTN_VARIANTS, *GPTQ_VARIANTS]}


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _finished_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["variant"]: r for r in json.loads(path.read_text())["rows"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: bundled smollm2-135m)")
    ap.add_argument("--set", choices=sorted(SETS), default="all", help="predefined variant list (default all)")
    ap.add_argument("--variants", default=None, help="comma-separated [method:]format list (overrides --set)")
    ap.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows (default 128)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--tag", default=None, help="results file suffix (default: device kind)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the results file, run the rest")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = lowbit.load(args.model, device=args.device)  # float32, weights rounded to float16 as stored
    device = str(next(model.parameters()).device)
    started = time.time()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else SETS[args.set]
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tag = args.tag or ("gpu" if device.startswith("cuda") else "cpu")
    out = Path(__file__).parent / "results" / f"quality-{tag}.json"
    done = _finished_rows(out) if args.resume else {}
    rows_by_variant = dict(done)

    def save(protocol: dict | None, header: str | None) -> None:
        rows = [rows_by_variant[v] for v in dict.fromkeys(["fp16", *variants]) if v in rows_by_variant]
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps({"command": command.strip(), "header": header, "protocol": protocol,
                                       "partial": protocol is None, "seconds": round(time.time() - started, 1),
                                       "rows": rows}, indent=2) + "\n")

    def on_row(row):  # noqa: ANN001, ANN202 - every finished row is saved at once: a crash loses nothing
        print(f"  {row.variant:<22} bpw {row.linear_bpw:6.3f}  ppl {row.ppl:9.3f}  ({row.delta_pct:+.2f}%)",
              file=sys.stderr, flush=True)
        rows_by_variant[row.variant] = asdict(row)
        save(None, None)

    todo = [v for v in variants if v not in done or v == "fp16"]
    calib = lowbit.CalibConfig(nsamples=args.nsamples)
    _, protocol = compare(model, tok, todo, seqlen=args.seqlen, max_windows=args.max_windows,
                          progress=not args.no_progress, calib=calib, on_row=on_row)
    header = (f"model: {args.model or 'smollm2-135m (bundled)'}; eval: bundled SOTU 2000-2021; GPTQ calibration "
              f"{args.nsamples} x 2048 tokens of SOTU before 2000, damp 0.01, block 128; "
              f"seqlen {protocol['seqlen']}, {protocol['windows']} windows, "
              f"{protocol['predicted_tokens']} predicted tokens; compute float32 on {hardware(device)}; "
              f"lowbit {lowbit.__version__}, torch {torch.__version__}")
    save(protocol, header)
    rows = [Row(**rows_by_variant[v]) for v in dict.fromkeys(["fp16", *variants]) if v in rows_by_variant]
    print(f"`{command.strip()}`\n\n{header}\n\n{rows_table(rows)}")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
