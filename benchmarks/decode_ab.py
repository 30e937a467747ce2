"""A kernel switch against the default in the decode step, on one GPU start (needs CUDA): benchmarks/decode.py run
without and with the switch, alternately, and each variant's tok/s compared.

    python benchmarks/decode_ab.py --set LOWBIT_CUDA_WARPS=8 -- --compile --formats nz2_ch,e8p_ch+rht --repeats 3 \\
        --eager-repeats 0 --check-tokens 8

Everything after ``--`` goes to decode.py as it is. Side A is the environment as it is, side B the same with every
``--set`` (``LOWBIT_*`` switches are read at import, so each run is a process of its own) and, with ``--tree``,
lowbit imported from another checkout (benchmarks/gemv_ab.py); ``--repeats`` runs of each side alternate A, B,
A, B, ... Prints per variant (and LM head) every run's tok/s, each side's best and B over A, and whether the runs'
first tokens agreed with the dynamic-cache loop where decode.py checked. Writes
benchmarks/results/decode-ab-<tag>.json (the device, every run's rows, the comparison); the runs' own files go.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gemv_ab import add_side_b, alternate, run_script, side_b

RESULTS = Path(__file__).parent / "results"


def run_side(side_env: dict[str, str], passthrough: list[str], tag: str) -> dict:
    """One decode.py process, writing to a temporary file: its results (no rows if it failed before writing them)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"decode-{tag}.json"
        return run_script("decode.py", ["--tag", tag, "--out", str(out), *passthrough], out, side_env, tag)


def compare(a_runs: list[list[dict]], b_runs: list[list[dict]]) -> list[dict]:
    """Per (variant, LM head) both sides measured: every run's tok/s, B's best over A's (above 1: the switch decodes
    faster), every run's prefill ms (the prompt's time) and the token checks."""
    def by_key(runs: list[list[dict]]) -> dict[tuple, list[dict]]:
        out: dict[tuple, list[dict]] = {}
        for rows in runs:
            for r in rows:
                out.setdefault((r["variant"], r.get("lm_head", "fp16")), []).append(r)
        return out

    a, b = by_key(a_runs), by_key(b_runs)
    return [{"variant": k[0], "lm_head": k[1], "a_tok_s": [r["tok_s"] for r in a[k]],
             "b_tok_s": [r["tok_s"] for r in b[k]],
             "b_over_a": max(r["tok_s"] for r in b[k]) / max(r["tok_s"] for r in a[k]),
             "a_prefill_ms": [r["prefill_ms"] for r in a[k] if "prefill_ms" in r],
             "b_prefill_ms": [r["prefill_ms"] for r in b[k] if "prefill_ms" in r],
             "agree": sorted({r["reference_agree"] for r in a[k] + b[k] if "reference_agree" in r})}
            for k in a if k in b]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_side_b(ap)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--tag", default="ab")
    args = ap.parse_args(ours)
    sets, b_is = side_b(ap, args)
    runs, results = alternate(run_side, sets, passthrough, args.tag, args.repeats, args.tree)
    meta = next((d["meta"] for d in results if d.get("meta")), {})
    rows = compare(runs["a"], runs["b"])
    if not rows:
        print("no variant was measured on both sides", file=sys.stderr)
        return 2
    print(f"\nB = A + {b_is}; runs alternating, {args.repeats} a side")
    print("| variant | LM head | A tok/s | B tok/s | B / A (best) | A prefill ms | B prefill ms | tokens agree |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (", ".join(f"{v:.1f}" for v in r.get(k, [])) or "-" for k in
                 ("a_tok_s", "b_tok_s", "a_prefill_ms", "b_prefill_ms"))
        runs_a, runs_b, pre_a, pre_b = cells
        print(f"| {r['variant']} | {r['lm_head']} | {runs_a} | {runs_b} | {r['b_over_a']:.3f} | {pre_a} | {pre_b} | "
              f"{', '.join(r['agree']) or '-'} |")
    command = "python benchmarks/decode_ab.py " + " ".join(argv)
    sides = {side: [r | {"side": side, "run": i} for i, rs in enumerate(runs[side]) for r in rs] for side in runs}
    (RESULTS / f"decode-ab-{args.tag}.json").write_text(json.dumps(
        {"device": meta.get("device"), "set": sets, "tree": args.tree, "repeats": args.repeats, "command": command,
         "decode_args": passthrough, "rows": sides["a"] + sides["b"], "compare": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
