"""``+rht`` with and without an output-side transform: the same input-side draw, the quality of each.

    python benchmarks/rotation_sides.py run --sides both --seed 0 --out rs-both-0.json -- \
        --device cpu --formats gptq+rht:e8p_ch --max-windows 16 --seqlen 512
    python benchmarks/rotation_sides.py table rs-*.json        # a markdown table of the runs, paired by seed
    python benchmarks/rotation_sides.py table benchmarks/results/rotation-sides-cpu-e8p.json   # the runs in docs/

``run`` is ``lowbit compare`` (everything after ``--``) with every ``+rht`` linear rotated on its input side only
(``--sides input``, what lowbit does) or on both sides (``--sides both``, what checkpoints written before carry),
the rotations drawn with ``--seed`` (the recipe's ``rotation_seed``): a pair of runs with one seed shares its
input-side transforms, so it isolates what the output side does. The draw itself moves the result a lot
(docs/formats.md), hence several seeds. ``table`` reads the files ``run`` wrote (``--out``), or one it combined
them into (``--json``). ``--only mlp.down_proj,self_attn.o_proj`` rotates only the linears whose names end so
(the others stay unrotated), to see which transforms of a decode step pay for themselves; ``--fold-norms``
multiplies the RMSNorm scales into the linears that read them first (what any rotation of the residual stream,
``+fused``, has to do); ``--blocks N`` drops the dense factor of size-N transforms (11008 = 43 x 256 in a 7B
model, whose 43 x 43 matmul is a kernel of its own in every rotated layer's decode step), leaving a block-diagonal
FWHT with random signs, to see what rounding loses without the mixing across blocks; ``--layout N`` draws every
transform in rotation layout N (:mod:`lowbit.rotations.hadamard`; layout 3: m FWHT blocks of the largest power of
two that divides the size, without a dense factor where those blocks hold at least 256 values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def run(sides: str, seed: int, out: str, compare_args: list[str], only: tuple[str, ...] = (),
        fold_norms: bool = False, blocks: int = 0, layout: int = 0) -> int:
    # sequential (GPTQ) and rtn draw the rotation through layer_rotation(name, rotation_seed)
    import lowbit.algorithms.rtn as rtn
    import lowbit.algorithms.sequential as sequential
    from lowbit import cli
    from lowbit.models.fused_linears import layer_rotation

    def drawn(name: str, base: int) -> object:
        # "" is the fingerprint's sample draw (sequential), not a linear
        if only and name and not name.endswith(only):
            return None
        rot = layer_rotation(name, base + seed, output_side=sides == "both")
        return dataclasses.replace(rot, layout=layout) if layout else rot

    for module in (sequential, rtn):
        module.layer_rotation = drawn
    if fold_norms:  # the RMSNorm scales multiplied into q/k/v and gate/up before quantizing, as +fused does
        import lowbit.comparison as comparison
        from lowbit.models.fused_rotation import fold_layer_norms

        quantize = comparison.quantize
        comparison.quantize = lambda model, *a, **k: quantize(fold_layer_norms(model), *a, **k)
    if blocks:
        _block_diagonal(blocks)
    rc = cli.main(["compare", *compare_args, "--json", out])
    data = json.loads(Path(out).read_text())
    data["rotation"] = ({"sides": sides, "seed": seed} | ({"only": list(only)} if only else {})
                        | ({"fold_norms": True} if fold_norms else {}) | ({"blocks": blocks} if blocks else {})
                        | ({"layout": layout} if layout else {}))
    Path(out).write_text(json.dumps(data, indent=1))
    return rc


def _block_diagonal(n: int) -> None:
    """Size-n transforms (drawn through ``incoherence.hadamard_of`` by quantizers and QuantLinear alike) keep their
    signs and FWHT blocks but not their dense factor: R = (I_m kron H_p) diag(signs)."""
    import copy
    from functools import cache

    import torch

    import lowbit.rotations.incoherence as incoherence

    drawn = incoherence.hadamard_of

    @cache  # as hadamard_of is: one object per (size, seed, layout) for every user of the transform
    def blockwise(size: int, seed: int, layout: int):  # noqa: ANN202
        h = drawn(size, seed, layout)
        if size != n or h.m == 1:
            return h
        b = copy.copy(h)
        b.factor, b.dense, b.kind = torch.eye(h.m), False, f"{h.m} blocks of fwht {h.p}"
        return b

    incoherence.hadamard_of = blockwise


def load_runs(paths: list[str]) -> list[dict]:
    """The runs of ``run``'s files, or of files ``table --json`` combined them into (``{"runs": [...]}``)."""
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        runs += data["runs"] if "runs" in data else [data]
    return runs


def table(runs: list[dict]) -> str:
    """Rows: seed, then per (variant, sides) ppl / KL / top-1; and the mean over the seeds of each column."""
    cells: dict[tuple[int, str, str], dict] = {}
    for r in runs:
        rot = r["rotation"]
        sides = (f"{rot['sides']} sides" + (f", {' and '.join(rot['only'])} only" if rot.get("only") else "")
                 + (", norms folded" if rot.get("fold_norms") else "")
                 + (f", size {rot['blocks']} block-diagonal" if rot.get("blocks") else "")
                 + (f", layout {rot['layout']}" if rot.get("layout") else ""))
        for row in r["rows"]:
            if row["variant"] != "fp16":
                cells[(rot["seed"], row["variant"], sides)] = row
    seeds = sorted({k[0] for k in cells})
    cols = sorted({(k[1], k[2]) for k in cells})
    lines = ["| seed | " + " | ".join(f"{v}, {s}: ppl / KL / top-1" for v, s in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]

    def fmt(rows: list[dict]) -> str:
        if not rows:
            return "-"
        n = len(rows)
        ppl, kl, top1 = (sum(r[k] for r in rows) / n for k in ("ppl", "kl", "top1"))
        return f"{ppl:.2f} / {kl:.3f} / {100 * top1:.1f}%"

    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(fmt([cells[(s, *c)]] if (s, *c) in cells else []) for c in cols) + " |")
    lines.append("| mean | " + " | ".join(fmt([cells[k] for k in cells if k[1:] == c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="lowbit compare (the arguments after --) with these rotations")
    r.add_argument("--sides", choices=("input", "both"), required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    r.add_argument("--only", default="", help="comma-separated name endings: rotate only these linears")
    r.add_argument("--fold-norms", action="store_true",
                   help="multiply the RMSNorm scales into q/k/v and gate/up first, as +fused does")
    r.add_argument("--blocks", type=int, default=0, help="transforms of this size drop their dense factor")
    r.add_argument("--layout", type=int, default=0, help="draw every transform in this rotation layout")
    t = sub.add_parser("table", help="a markdown table of run's files")
    t.add_argument("files", nargs="+")
    t.add_argument("--json", default=None, help="also write every run of the files into this one file")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args.sides, args.seed, args.out, rest, tuple(filter(None, args.only.split(","))), args.fold_norms,
                   args.blocks, args.layout)
    runs = load_runs(args.files)
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
