"""lowbit beside llama.cpp CUDA, gemlite and torchao in one command (issue 16's side-by-side benchmark).

    pip install gemlite torchao                      # the peers that install from the package registry
    python benchmarks/side_by_side.py --tag h200 --llama-src LLAMA_CPP_TREE_OR_TGZ
    python benchmarks/side_by_side.py --tag h200 --steps table       # the table again, from the tag's files

Steps, each a script of its own run as a child process (a step that fails is reported; the table uses what the
others wrote):

* ``peers``: ``peers.py`` -- lowbit's GEMVs and gemlite's / torchao's in one process, timed the same way, at the
  shapes of ``gemv_speed.py``, batch 1 and 8 -> ``kernels-peers-<tag>.json``;
* ``llamacpp``: ``llamacpp_cuda.py`` -- llama.cpp built with CUDA on the machine, its own MUL_MAT timing at
  the five large shapes (its perf set's 4096x14336 and four cases added to it) and ``llama-bench`` TG-128 of a
  random Llama-2-7B-shaped GGUF -> ``llamacpp-<tag>.json`` (needs ``--llama-src``: the llama-cpp-python sdist
  vendors a tree);
* ``decode``: ``decode.py --compile`` -- lowbit's TG-128 of the same shape -> ``decode-<tag>.json``;
* ``table``: one table of all of them -> ``side-by-side-<tag>.json``, printed as markdown: µs at 4096x14336 per
  format family and tool, each lowbit format against the fastest peer with as many bits per weight or more at
  every shape (llama.cpp's where its file has the shape: files written before the added cases have 4096x14336
  alone), decode tok/s with the issue's ratios, and the issue's targets read from those rows (:func:`targets`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf

HERE = Path(__file__).parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from gemv_speed import LARGE, summarize  # noqa: E402 - the issue's five large shapes, where its targets are set

STEPS = ("peers", "llamacpp", "decode", "table")
LOWBIT_GEMV = "q5_0,q5_k,int4_g128_sym,q4_0,q4_k,int3_g128_sym,q3_k,int2_g64_sym,nz2_ch,q2_k,e8p_ch,iq2_xxs"
LOWBIT_DECODE = "fp16,q4_0,q4_k,Q4_K_M,int3_g128_sym,int2_g64_sym,nz2_ch,q2_k,e8p_ch+rht,iq2_xxs"
SHAPE = (4096, 14336)  # [out, in]: Llama-3-8B down_proj
_LLAMA_BITS = re.compile(r"^i?q(?P<bits>\d)_")  # a llama.cpp type's bit family: q3_k_m -> 3, iq2_xxs -> 2
FAMILIES = (  # (family, lowbit formats, peer formats (kernels rows), llama.cpp types)
    ("16-bit", (), (), ("f16",)),
    ("5-bit", ("q5_0", "q5_1", "q5_k"), (), ("q5_0", "q5_1", "q5_K")),
    ("4-bit", ("int4_g128_sym", "q4_0", "q4_k"), ("gemlite W4 g128", "torchao int4 g128"), ("q4_0", "q4_K")),
    ("3-bit", ("int3_g128_sym", "q3_k"), (), ("q3_K",)),
    ("2-bit scalar", ("int2_g64_sym", "nz2_ch", "q2_k"), ("gemlite W2 g64",), ("q2_K",)),
    ("IQ2_XXS", ("iq2_xxs",), (), ("iq2_xxs",)),
    ("E8P", ("e8p_ch",), (), ()),
)


def llama_bpw(ggml_type: str) -> float | None:
    """Bits per weight of a llama.cpp type as ggml stores it (gguf-py's block sizes), None for a name it lacks."""
    qtype = gguf.GGMLQuantizationType.__members__.get(ggml_type.upper())
    if qtype is None:
        return None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def run(cmd: list[str]) -> bool:
    print("+", " ".join(cmd), flush=True)
    ok = subprocess.run(cmd, cwd=HERE.parent).returncode == 0
    if not ok:
        print(f"step failed: {' '.join(cmd)}", flush=True)
    return ok


def _is_lowbit(row: dict) -> bool:
    return not any(row["format"].startswith(p) for p in ("gemlite", "torchao"))


def gemv_table(kernel_rows: list[dict], llama: dict | None) -> list[dict]:
    """Rows {family, tool, format, batch, bpw, us} at :data:`SHAPE`: cuBLAS fp16, lowbit, the peers, llama.cpp."""
    out = []
    for m in sorted({r["batch"] for r in kernel_rows} | {k["batch"] for k in (llama or {}).get("kernels", [])}):
        at = [r for r in kernel_rows if tuple(r["shape"]) == SHAPE and r["batch"] == m]
        if at:
            out.append({"family": "16-bit", "tool": "cuBLAS", "format": "fp16", "batch": m, "bpw": 16.0,
                        "us": 1e3 * at[0]["fp16_ms"]})
        for family, ours, theirs, llama_types in FAMILIES:
            for r in at:
                if r["format"] in ours or r["format"] in theirs:
                    tool = "lowbit" if _is_lowbit(r) else r["format"].split()[0]
                    out.append({"family": family, "tool": tool, "format": r["format"], "batch": m,
                                "bpw": r["bpw"], "us": 1e3 * r["ms"]})
            for k in (llama or {}).get("kernels", []):
                if k["type"] in llama_types and k["batch"] == m and (k["rows"], k["cols"]) == SHAPE:
                    out.append({"family": family, "tool": "llama.cpp", "format": k["type"], "batch": m,
                                "bpw": llama_bpw(k["type"]), "us": k["us"]})
    return out


def versus_peers(kernel_rows: list[dict], llama: dict | None) -> list[dict]:
    """Each lowbit format at each of the five large shapes and each batch against the fastest peer with as many
    bits per weight or more (peers.py's rows; llama.cpp's quantized types at every shape its file has): {format,
    batch, shapes, wins, worst (lowbit µs / peer µs)}."""
    peers = [r for r in kernel_rows if not _is_lowbit(r)]
    theirs = [(k, bpw) for k in (llama or {}).get("kernels", []) if (bpw := llama_bpw(k["type"])) and bpw < 16]
    out: dict[tuple, dict] = {}
    for r in (r for r in kernel_rows if _is_lowbit(r) and tuple(r["shape"]) in LARGE):
        rivals = [1e3 * p["ms"] for p in peers if p["shape"] == r["shape"] and p["batch"] == r["batch"]
                  and p["bpw"] >= r["bpw"] - 1e-3]
        rivals += [k["us"] for k, bpw in theirs if (k["rows"], k["cols"]) == tuple(r["shape"])
                   and k["batch"] == r["batch"] and bpw >= r["bpw"] - 1e-3]
        if not rivals:
            continue
        ratio = 1e3 * r["ms"] / min(rivals)
        o = out.setdefault((r["format"], r["batch"]), {"format": r["format"], "batch": r["batch"], "shapes": 0,
                                                       "wins": 0, "worst": 0.0})
        o["shapes"] += 1
        o["wins"] += ratio < 1
        o["worst"] = max(o["worst"], ratio)
    return list(out.values())


def decode_label(row: dict) -> str:
    """A decode row's name in the table: its variant, and its LM head's format where that is not fp16 (an
    nz2_ch step with an nz2_ch head is another row than one with the fp16 head)."""
    head = row.get("lm_head")
    return row["variant"] if head in (None, "fp16") else f"{row['variant']} (LM head {head})"


def llama_bits(ggml_type: str) -> int | None:
    """The bit family of a llama.cpp decode type (q2_k, iq2_xxs: 2; q3_k_m: 3; q5_0: 5; f16: 16), None if unknown."""
    if ggml_type in ("f16", "bf16"):
        return 16
    m = _LLAMA_BITS.match(ggml_type)
    return int(m["bits"]) if m else None


def decode_table(decode: dict | None, llama: dict | None) -> list[dict]:
    """lowbit's TG-128 rows with the issue's ratios: vs lowbit's compiled fp16 step, and vs llama.cpp's fastest
    type of the same bit family (whole bits per weight: 2-bit rows against its fastest 2-bit type, the issue's
    ratio; 3.125-3.44 against its Q3_K types, 4.5 against Q4_0 or Q4_K_M, 16 against F16); llama.cpp's own rows
    after them."""
    rows = (decode or {}).get("rows", [])
    ours = {decode_label(r): r["tok_s"] for r in rows if r.get("tok_s")}
    theirs = {r["type"]: r["tok_s"] for r in (llama or {}).get("decode", [])}
    out = []
    for variant, tok_s in ours.items():
        bpw = next(r["bpw"] for r in rows if decode_label(r) == variant)
        family = 16 if bpw >= 8 else int(bpw)
        peer = max((v for t, v in theirs.items() if llama_bits(t) == family), default=None)
        out.append({"tool": "lowbit", "variant": variant, "family": family, "tok_s": tok_s,
                    "vs_fp16": tok_s / ours["fp16"] if "fp16" in ours else None,
                    "vs_llamacpp": tok_s / peer if peer else None})
    out += [{"tool": "llama.cpp", "variant": t, "tok_s": v, "vs_fp16": v / theirs["f16"] if "f16" in theirs else None,
             "vs_llamacpp": None} for t, v in theirs.items()]
    return out


def _listed(values: Mapping[str, float], fmt: str, unit: str = "") -> str:
    return ", ".join(f"{k} {format(v, fmt)}{unit}" for k, v in values.items()) or "-"


def _met(values: Mapping[str, float], at_least: float) -> bool | None:
    """Whether every measured value reaches ``at_least`` (None: nothing measured)."""
    return min(values.values()) >= at_least if values else None


def _summary(kernel_rows: list[dict]) -> list[dict]:
    """gemv_speed's summary lines of lowbit's rows (% of copy bandwidth, batch 8 against batch 1), each with its
    format's bits per weight."""
    ours = [r for r in kernel_rows if _is_lowbit(r) and "frac_of_copy_bw" in r]
    bpw = {r["format"]: r["bpw"] for r in ours}
    return [s | {"bpw": bpw[s["format"]]} for s in summarize(ours)]


def _peers_met(versus: list[dict]) -> bool | None:
    """False where a lowbit format lost at a shape; True where each won at all five shapes; None (not settled)
    where every comparison was won but some format met no peer at some shape."""
    if any(r["wins"] < r["shapes"] for r in versus):
        return False
    return True if versus and all(r["shapes"] == len(LARGE) for r in versus) else None


def targets(kernel_rows: list[dict], versus: list[dict], decode: list[dict], llama: dict | None) -> list[dict]:
    """The issue's targets, {target, measured, met (None: not settled)}, from the table's own rows: GEMV means of
    copy bandwidth at batch 1, batch 8 against batch 1, lowbit against the fastest peer, and TG-128 ratios."""
    lines = _summary(kernel_rows)
    gemv2, gemv4 = ({s["format"]: s["mean"] for s in lines  # batch-1 means of formats measured at all five shapes
                     if s["batch"] == 1 and int(s["bpw"]) == bits and s["shapes"] == len(LARGE)} for bits in (2, 4))
    within = {s["format"]: s["within_1_5x"] for s in lines if s["batch"] == 8
              and s.get("shapes_with_batch1") == len(LARGE)}
    ours = [r for r in decode if r["tool"] == "lowbit"]
    vs_fp16 = {r["variant"]: r["vs_fp16"] for r in ours if r["family"] == 2 and r["vs_fp16"]}
    vs_peer = {r["variant"]: r["vs_llamacpp"] for r in ours if r["family"] == 2 and r["vs_llamacpp"]}
    q4_0 = next((r["tok_s"] for r in (llama or {}).get("decode", []) if r["type"] == "q4_0"), None)
    vs_q4_0 = {r["variant"]: r["tok_s"] / q4_0 for r in ours if r["family"] == 4 and q4_0}
    percent = {k: 100 * v for k, v in gemv2.items()}, {k: 100 * v for k, v in gemv4.items()}
    won = ", ".join(f"{r['format']} (batch {r['batch']}) {r['wins']}/{r['shapes']}" for r in versus) or "-"
    rows = [
        ("batch-1 GEMV >= 60% of copy bandwidth, every 2-bit format (mean of the five large shapes)",
         _listed(percent[0], ".0f", "%"), _met(gemv2, 0.60)),
        ("batch-1 GEMV >= 70%, 4-bit", _listed(percent[1], ".0f", "%"), _met(gemv4, 0.70)),
        ("batch 8 within 1.5x of batch 1 (shapes of five)", _listed(within, "d", f"/{len(LARGE)}"),
         _met(within, len(LARGE))),
        ("faster than the fastest peer with as many bits or more, every shape (shapes won / compared)", won,
         _peers_met(versus)),
        ("TG-128, 2-bit >= 4x the compiled fp16 step", _listed(vs_fp16, ".2f", "x"), _met(vs_fp16, 4.0)),
        ("TG-128, 2-bit >= 2.5x llama.cpp's fastest 2-bit type", _listed(vs_peer, ".2f", "x"), _met(vs_peer, 2.5)),
        ("TG-128, 4-bit >= 2x llama.cpp's Q4_0", _listed(vs_q4_0, ".2f", "x"), _met(vs_q4_0, 2.0)),
    ]
    return [{"target": a, "measured": b, "met": c} for a, b, c in rows]


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(t: dict) -> str:
    lines = [f"GEMV at {SHAPE[0]}x{SHAPE[1]}, µs", "", "| family | tool | format | bpw | batch | µs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['tool']} | {r['format']} | {_f(r['bpw'], '.3g')} | {r['batch']} | "
              f"{r['us']:.1f} |" for r in t["gemv"]]
    lines += ["", "lowbit against the fastest peer with as many bits per weight or more, five large shapes", "",
              "| format | batch | shapes won | worst ratio (lowbit / peer) |", "|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['batch']} | {r['wins']} / {r['shapes']} | {r['worst']:.2f} |"
              for r in t["versus_peers"]]
    lines += ["", "TG-128, batch 1, tok/s", "", "| tool | variant | tok/s | vs fp16 | vs llama.cpp |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['tool']} | {r['variant']} | {r['tok_s']:.1f} | {_f(r['vs_fp16'], '.2f')} | "
              f"{_f(r['vs_llamacpp'], '.2f')} |" for r in t["decode"]]
    lines += ["", "Targets (issue 16)", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']} | {'-' if r['met'] is None else 'yes' if r['met'] else 'no'} |"
              for r in t.get("targets", [])]
    return "\n".join(lines)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _merged(paths: list[Path], name: Callable[[dict], str | None]) -> list[dict]:
    """The files' rows, a later file's row replacing an earlier one of the same name, shape and batch."""
    rows: dict[tuple, dict] = {}
    for p in paths:
        for r in (_load(p) or {}).get("rows", []):
            rows[(name(r), str(r.get("shape")), r.get("batch"))] = r
    return list(rows.values())


def table(kernels: list[Path], llamacpp: Path, decode: list[Path]) -> dict:
    kernel_rows = _merged(kernels, lambda r: r.get("format"))
    llama = _load(llamacpp)
    versus = versus_peers(kernel_rows, llama)
    decode_rows = decode_table({"rows": _merged(decode, decode_label)}, llama)
    return {"sources": [p.name for p in [*kernels, llamacpp, *decode] if p.exists()],
            "gemv": gemv_table(kernel_rows, llama), "versus_peers": versus, "decode": decode_rows,
            "targets": targets(kernel_rows, versus, decode_rows, llama)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--llama-src", type=Path, default=None, help="llama.cpp source tree or .tgz (llamacpp step)")
    ap.add_argument("--llama-args", default="", help="more arguments for llamacpp_cuda.py (e.g. --no-flash-attn)")
    ap.add_argument("--gemv-formats", default=LOWBIT_GEMV)
    ap.add_argument("--decode-formats", default=LOWBIT_DECODE)
    ap.add_argument("--kernels", type=Path, nargs="*", default=None,
                    help="kernels JSON files for the table (default: kernels-peers-<tag>.json)")
    ap.add_argument("--llamacpp", type=Path, default=None, help="default: llamacpp-<tag>.json")
    ap.add_argument("--decode", type=Path, nargs="*", default=None, help="default: decode-<tag>.json")
    args = ap.parse_args(argv)
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        ap.error(f"unknown steps {sorted(unknown)}; known: {','.join(STEPS)}")
    py = sys.executable
    if "peers" in steps:
        run([py, str(HERE / "peers.py"), "--tag", args.tag, "--batch", "1,8", "--lowbit", args.gemv_formats])
    if "llamacpp" in steps:
        if args.llama_src is None:
            print("llamacpp step skipped: no --llama-src", flush=True)
        else:
            run([py, str(HERE / "llamacpp_cuda.py"), "--src", str(args.llama_src), "--tag", args.tag,
                 *args.llama_args.split()])
    if "decode" in steps:
        run([py, str(HERE / "decode.py"), "--tag", args.tag, "--compile", "--formats", args.decode_formats,
             "--repeats", "3", "--eager-repeats", "0", "--check-tokens", "8"])
    if "table" in steps:
        t = table(args.kernels or [RESULTS / f"kernels-peers-{args.tag}.json"],
                  args.llamacpp or RESULTS / f"llamacpp-{args.tag}.json",
                  args.decode or [RESULTS / f"decode-{args.tag}.json"])
        (RESULTS / f"side-by-side-{args.tag}.json").write_text(json.dumps(t, indent=2))
        print(markdown(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
