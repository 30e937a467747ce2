"""A kernel switch against the default on one GPU start (needs CUDA): benchmarks/gemv_speed.py run without and with
the switch, alternately, and each side's fastest time per (shape, format, batch) compared.

    python benchmarks/gemv_ab.py --set LOWBIT_CUDA_STAGED_ROWS_BIG=0 --formats nz2_ch,e8p_ch,int2_g64_sym --batch 1,8
    python benchmarks/gemv_ab.py --set LOWBIT_CUDA_TILES=2 --repeats 3 --formats iq2_xxs --batch 8 --fused
    python benchmarks/gemv_ab.py --tree ../base --formats q3_k,q6_k --batch 1,8

Side A is the environment as it is, side B the same with every ``--set`` (``LOWBIT_*`` switches are read at import,
so each run is a process of its own) and, with ``--tree``, lowbit imported from another checkout, for a change no
switch selects (a kernel layout, say: ``git worktree add ../base HEAD~1``, then ``--tree ../base``; B is the base).
``--repeats`` runs of each side alternate A, B, A, B, ... Prints per row both times and B's over A's, then per
format and batch each side's mean % of copy bandwidth on the large shapes and, for batches above 1, how many of
them stay within 1.5x of batch 1. Writes benchmarks/results/gemv-ab-<tag>.json (the device, both sides' rows, the
comparison and the summaries); the runs' own kernels-<tag>-a<i>.json files are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gemv_speed

RESULTS = Path(__file__).parent / "results"


def fastest(runs: list[list[dict]]) -> dict[tuple, dict]:
    """Per (label, shape, format, batch): the row of the fastest run."""
    best: dict[tuple, dict] = {}
    for rows in runs:
        for r in rows:
            key = (r["label"], tuple(r["shape"]), r["format"], r["batch"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return best


def compare(a_runs: list[list[dict]], b_runs: list[list[dict]]) -> list[dict]:
    """Rows both sides measured: A's and B's fastest µs and B over A (below 1: the switch is faster)."""
    a, b = fastest(a_runs), fastest(b_runs)
    return [{"label": k[0], "shape": list(k[1]), "format": k[2], "batch": k[3], "a_us": 1e3 * a[k]["ms"],
             "b_us": 1e3 * b[k]["ms"], "b_over_a": b[k]["ms"] / a[k]["ms"]} for k in a if k in b]


def summary_lines(a: list[dict], b: list[dict]) -> list[str]:
    """One line per (format, batch) both summaries have: mean % of copy bandwidth A -> B, and for batches above 1
    the large shapes within 1.5x of batch 1 on each side."""
    by_b = {(line["format"], line["batch"]): line for line in b}
    out = []
    for la in a:
        lb = by_b.get((la["format"], la["batch"]))
        if lb is None:
            continue
        within = (f"; within 1.5x {la['within_1_5x']} -> {lb['within_1_5x']} of {la['shapes_with_batch1']}"
                  if "within_1_5x" in la and "within_1_5x" in lb else "")
        out.append(f"{la['format']:>14} batch {la['batch']}: {100 * la['mean']:.1f}% -> {100 * lb['mean']:.1f}%"
                   + within)
    return out


def with_tree(env: dict[str, str], tree: str) -> dict[str, str]:
    """``env`` importing lowbit from ``tree``'s ``src`` ahead of everything else on the path."""
    path = [str(Path(tree).resolve() / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return env | {"PYTHONPATH": os.pathsep.join(path)}


def add_side_b(ap: argparse.ArgumentParser) -> None:
    """The options that make side B: ``--set`` switches and ``--tree``."""
    ap.add_argument("--set", action="append", default=[], metavar="LOWBIT_NAME=VALUE",
                    help="a switch of side B (repeatable)")
    ap.add_argument("--tree", help="side B imports lowbit from this checkout's src (another commit: git worktree "
                                   "add DIR REV), for a change no switch selects")


def side_b(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """Side B's switches (:func:`parse_sets`) and how to name it; an error without a switch or a tree, or with a
    tree that holds no lowbit."""
    sets = parse_sets(args.set)
    if not sets and not args.tree:
        ap.error("side B needs a --set or a --tree")
    if args.tree and not (Path(args.tree) / "src" / "lowbit").is_dir():  # else B would import A's lowbit unnoticed
        ap.error(f"--tree {args.tree}: no src/lowbit there (a checkout of lowbit, e.g. git worktree add DIR REV)")
    return sets, " ".join([f"{k}={v}" for k, v in sets.items()] + ([f"lowbit from {args.tree}"] if args.tree else []))


def parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key.startswith("LOWBIT_"):
            raise SystemExit(f"--set takes LOWBIT_NAME=VALUE, got {s!r}")
        out[key] = value
    return out


def alternate(run: Callable[[dict[str, str], list[str], str], dict], sets: dict[str, str], passthrough: list[str],
              tag: str, repeats: int, tree: str | None = None) -> tuple[dict[str, list[list[dict]]], list[dict]]:
    """``repeats`` runs of each side, A, B, A, B, ...: ``run(env, passthrough, tag)``, side B with ``sets`` on top of
    the environment (and lowbit imported from ``tree``, :func:`with_tree`). Returns each side's rows per run and
    every run's whole result, in run order."""
    runs: dict[str, list[list[dict]]] = {"a": [], "b": []}
    env_b = with_tree(os.environ | sets, tree) if tree else os.environ | sets
    results = []
    for i in range(repeats):
        for side in ("a", "b"):
            results.append(run(env_b if side == "b" else dict(os.environ), passthrough, f"{tag}-{side}{i}"))
            runs[side].append(results[-1]["rows"])
    return runs, results


def run_script(script: str, args: list[str], out: Path, env: dict[str, str], tag: str) -> dict:
    """One process of benchmarks/``script`` that writes its results to ``out``: those results (no rows if it failed
    before writing any), the file removed."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *args], env=env, check=False)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    out.unlink(missing_ok=True)
    if proc.returncode:
        print(f"{script} exited with {proc.returncode} ({tag}); keeping the {len(data['rows'])} rows it wrote",
              file=sys.stderr)
    return data


def run_side(side_env: dict[str, str], passthrough: list[str], tag: str) -> dict:
    """One gemv_speed.py process: its results; its file removed."""
    return run_script("gemv_speed.py", ["--tag", tag, *passthrough], RESULTS / f"kernels-{tag}.json", side_env, tag)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_side_b(ap)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--tag", default="ab")
    ap.add_argument("--formats", default=",".join(gemv_speed.FORMATS))
    ap.add_argument("--batch", default="1")
    ap.add_argument("--fused", action="store_true", help="also the fused shapes a decode step runs")
    args = ap.parse_args(argv)
    sets, b_is = side_b(ap, args)
    passthrough = ["--formats", args.formats, "--batch", args.batch] + (["--fused"] if args.fused else [])
    runs, results = alternate(run_side, sets, passthrough, args.tag, args.repeats, args.tree)
    device = next(({k: d[k] for k in ("device", "copy_bw") if k in d} for d in results if "device" in d), {})
    rows = compare(runs["a"], runs["b"])
    if not rows:
        print("no row was measured on both sides", file=sys.stderr)
        return 2
    print(f"\nB = A + {b_is}; fastest of {args.repeats} runs each")
    print("| shape | format | batch | A µs | B µs | B / A |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} {r['shape'][0]}x{r['shape'][1]} | {r['format']} | {r['batch']} | {r['a_us']:.2f} | "
              f"{r['b_us']:.2f} | {r['b_over_a']:.3f} |")
    summary = {side: gemv_speed.summarize(list(fastest(runs[side]).values())) for side in ("a", "b")}
    print("\nper format and batch, large shapes: mean % of copy BW A -> B (batches above 1: shapes within 1.5x of "
          "batch 1, A -> B)")
    for line in summary_lines(summary["a"], summary["b"]):
        print("  " + line)
    sides = {side: [r | {"side": side, "run": i} for i, rs in enumerate(runs[side]) for r in rs] for side in runs}
    command = "python benchmarks/gemv_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (RESULTS / f"gemv-ab-{args.tag}.json").write_text(json.dumps(
        device | {"set": sets, "tree": args.tree, "repeats": args.repeats, "command": command,
                  "rows": sides["a"] + sides["b"], "compare": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
