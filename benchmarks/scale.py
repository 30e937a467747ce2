"""Scale benchmark (issue 18): streamed quantization of real model shapes, time and peak memory per shape x method.

    PYTHONPATH=src python benchmarks/scale.py --shape llama-2-7b --method gptq_act            # the 7B target run
    PYTHONPATH=src python benchmarks/scale.py --shape llama-2-7b,llama-3-70b --method rtn,gptq_act
    PYTHONPATH=src python benchmarks/scale.py --shape llama-2-7b --layers 1 --method rtn,gptq_act \\
        --nsamples 4 --seqlen 128 --device cpu                                                # CPU smoke test
    PYTHONPATH=src python benchmarks/scale.py --source path/to/Llama-2-7b-hf --method gptq_act   # real shards
    PYTHONPATH=src python benchmarks/scale.py --shape llama-2-7b --method gptq_act --procs 1,2   # 1 vs 2 GPUs
    PYTHONPATH=src python benchmarks/scale.py --shape llama-2-7b --method gptq_act+ft            # streamed +ft

Each (shape, method) runs in a fresh process, so its peak host memory is its own. Source: the synthetic generator
of the shape (lowbit.io.synthetic, no files) or ``--source DIR`` (memory-mapped safetensors shards). Calibration:
``--nsamples`` x ``--seqlen`` token ids drawn uniformly from the vocabulary (seed 0), the same for both sources.
The run is lowbit's streamed pipeline as ``lowbit quantize --stream`` runs it (algorithms/streamed.py): skeleton,
capture of layer 0's inputs, every layer read / quantized / committed to a checkpoint in a temporary work folder
(its writes included), then the final checkpoint assembled into a temporary folder (full runs only).

Figures: ``seconds`` is wall time measured end to end for what ran (``layers_run`` of ``layers_total`` layers);
with ``--layers N`` below the total, ``seconds_extrapolated`` = setup + capture + mean layer time x layers_total
(the final write is not in it) is given beside it, clearly labelled, and ``seconds`` stays the measured figure.
``--procs N``: the run is N processes started by torchrun, one per GPU (gloo processes with ``--device cpu``),
sharing the calibration windows as ``torchrun --nproc-per-node N -m lowbit.cli quantize`` does
(algorithms/distributed.py); its peaks are rank 0's, and ``gpus`` is N. Every run sets its CPU threads as the CLI
does (lowbit/cpu.py: with N processes, each gets 1/N of the host's CPUs).
``setup_seconds`` (source opened, calibration drawn; ``group_seconds`` of it joining the process group and its
first collective), ``capture_seconds``, ``layer_seconds_mean`` and ``save_seconds`` split ``seconds``.
``peak_host_gb``: the process's peak resident memory (getrusage ru_maxrss); ``peak_gpu_gb``: torch's peak
allocated CUDA memory (``peak_gpu_reserved_gb``: its peak reserved memory, what nvidia-smi would show less the
context). Peaks do not grow with the number of layers (one layer at a time). Rows are merged into
benchmarks/results/scale-<tag>.json (tag: ``h200``-style GPU name, or ``cpu``), replacing rows of the same shape,
method, format, device, layers and calibration size.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b",
                    help="comma-separated synthetic shapes: tiny, llama-2-7b, llama-2-13b, llama-3-8b, llama-3-70b")
    ap.add_argument("--source", default=None, help="a safetensors model directory instead of a synthetic shape")
    ap.add_argument("--method", default="gptq_act",
                    help="comma-separated: rtn, gptq, gptq_act, imatrix; +ft appended tunes each layer (streamed +ft)")
    ap.add_argument("--format", default="q4_0", help="weight format (default q4_0)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="run only the first N decoder layers and extrapolate")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    ap.add_argument("--offload", default="auto", choices=["auto", "device", "host"])
    ap.add_argument("--procs", default="1", help="comma-separated process counts (one GPU each), e.g. 1,2")
    ap.add_argument("--work", default=None, help="folder for the work checkpoint and output (default: a temp dir)")
    ap.add_argument("--tag", default=None, help="results file tag (default: the GPU's short name, or cpu)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/scale-<tag>.json)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one run, JSON row on stdout
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(args: argparse.Namespace) -> dict:
    """One (source, method) run in this process; the row."""
    import torch

    from lowbit.algorithms import distributed
    from lowbit.algorithms.finetune import FinetuneConfig
    from lowbit.algorithms.plans import uniform_plan
    from lowbit.algorithms.streamed import peak_gpu_gb, peak_host_gb, quantize_streamed, save_streamed
    from lowbit.io.sources import open_source
    from lowbit.io.synthetic import random_tokens

    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    procs, group = 1, 0.0
    if distributed.launched():
        ranks, name = distributed.init_from_env(args.device)
        device, procs = torch.device(name), ranks.world
        ranks.barrier()  # the first collective sets up the communicator: timed apart from the rest of the setup
        group = time.perf_counter() - t0
    source = open_source(args.source or f"synthetic:{args.shape}")
    plan = uniform_plan(source.skeleton(), args.format)
    method, _, ft = args.method.partition("+")
    samples = random_tokens(source.config.vocab_size, args.nsamples, args.seqlen) if method != "rtn" else None
    ranks = distributed.current()
    lead = ranks is None or ranks.lead
    work = Path(tempfile.mkdtemp(prefix="lowbit-scale-", dir=args.work)) if lead else None
    work = Path(ranks.from_lead(str(work))) if ranks else work  # the checkpoint is one folder all ranks write
    try:
        setup = time.perf_counter() - t0
        report = quantize_streamed(source, plan, work / "ckpt", rounding=method, device=device, samples=samples,
                                   offload=args.offload, max_layers=args.layers, progress=lead,
                                   finetune=FinetuneConfig() if ft == "ft" else None)
        save_seconds = None
        if report.complete and lead:
            t1 = time.perf_counter()
            save_streamed(source, report.layer_files, work / "out", meta={"source": source.name}, progress=False)
            save_seconds = time.perf_counter() - t1
        seconds = time.perf_counter() - t0
    finally:
        if ranks:
            ranks.barrier()
        if lead:
            shutil.rmtree(work, ignore_errors=True)
    run = len(report.layer_seconds)
    mean_layer = sum(report.layer_seconds) / max(1, run)
    row = {
        "shape": args.shape if args.source is None else Path(args.source).name, "method": args.method,
        "format": args.format, "gpus": procs if device.type == "cuda" else 0, "processes": procs,
        "seconds": round(seconds, 2), "peak_host_gb": _r(peak_host_gb()), "peak_gpu_gb": _r(peak_gpu_gb(device)),
        "layers_run": run, "layers_total": report.layers_total,
        "seconds_extrapolated": (None if report.complete else
                                 round(setup + report.capture_seconds + mean_layer * report.layers_total, 1)),
        "extrapolated_from_layers": None if report.complete else run,
        "setup_seconds": round(setup, 2), "group_seconds": round(group, 2),
        "capture_seconds": round(report.capture_seconds, 2),
        "layer_seconds_mean": round(mean_layer, 2), "save_seconds": None if save_seconds is None else round(
            save_seconds, 2),
        "peak_gpu_reserved_gb": _r(torch.cuda.max_memory_reserved(device) / 1e9) if device.type == "cuda" else None,
        "offload": report.offload, "nsamples": args.nsamples if samples is not None else 0,
        "seqlen": args.seqlen if samples is not None else 0, "source": source.name, "device": _device_name(device),
    }
    return row


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _device_name(device: object) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def default_tag(device: str | None) -> str:
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"\b([a-z]\d{2,4})\b", name)  # "nvidia h200" -> h200
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        from lowbit.cpu import configure

        configure()  # the CLI's CPU threads (one host's CPUs shared by its processes), before torch loads
        row = run_one(args)
        from lowbit.algorithms import distributed

        if distributed.current() is None or distributed.current().lead:
            print(json.dumps(row))
        return 0
    import torch

    import lowbit

    shapes = [args.source] if args.source else args.shape.split(",")
    rows = []
    for shape in shapes:
        for method, procs in ((m, int(p)) for m in args.method.split(",") for p in args.procs.split(",")):
            launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
            cmd = [sys.executable, *launch, __file__, "--one", "--method", method, "--format", args.format,
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--offload", args.offload,
                   *(["--source", shape] if args.source else ["--shape", shape]),
                   *(["--layers", str(args.layers)] if args.layers else []),
                   *(["--device", args.device] if args.device else []), *(["--work", args.work] if args.work else [])]
            log(f"{shape} {method}:{args.format}" + (f" ({procs} processes)" if procs > 1 else ""))
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                log(f"{shape} {method}: failed (exit {done.returncode})")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(json.dumps(row))
    tag = args.tag or default_tag(args.device)
    out = Path(args.out) if args.out else RESULTS / f"scale-{tag}.json"
    merge(out, rows, {"command": " ".join(["python", "benchmarks/scale.py", *(argv or sys.argv[1:])]),
                      "lowbit": lowbit.__version__, "torch": torch.__version__, "python": platform.python_version(),
                      "host": f"{platform.system()} {platform.machine()}"})
    print(table(rows))
    log(f"wrote {out}")
    return 0 if len(rows) == len(shapes) * len(args.method.split(",")) * len(args.procs.split(",")) else 1


_KEY = ("shape", "method", "format", "device", "layers_run", "nsamples", "seqlen", "processes")


def merge(out: Path, rows: list[dict], meta: dict) -> None:
    """Add ``rows`` to the results file, replacing rows measured with the same settings."""
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    new = {tuple(r[k] for k in _KEY) for r in rows}
    kept = [r for r in data["rows"] if tuple(r.get(k) for k in _KEY) not in new]
    data["rows"] = kept + [{**r, "command": meta["command"]} for r in rows]
    data["meta"] = {k: v for k, v in meta.items() if k != "command"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def table(rows: list[dict]) -> str:
    head = ("| shape | method | processes | layers | seconds (measured) | seconds (all layers, extrapolated) | host GB "
            "| GPU GB |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = "-" if r["seconds_extrapolated"] is None else f"{r['seconds_extrapolated']}"
        lines.append(f"| {r['shape']} | {r['method']}:{r['format']} | {r.get('processes', 1)} | "
                     f"{r['layers_run']}/{r['layers_total']} | "
                     f"{r['seconds']} | {extra} | {r['peak_host_gb']} | {r['peak_gpu_gb'] or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
