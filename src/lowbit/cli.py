"""Command line: thin argument parsing over lowbit.pipeline. Run ``lowbit -h``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lowbit import __version__
from lowbit.errors import LowbitError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, cached hub id, or lowbit directory (default: bundled smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 2048 or the model's max)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (faster)")
    p.add_argument("--text", default=None, help="evaluate on this UTF-8 text file instead of the bundled eval split")
    p.add_argument("--no-progress", action="store_true")


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (GPTQ)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window (default 2048 or model max)")
    g.add_argument("--calib-text", default=None, help="UTF-8 text file instead of the bundled calib split")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block (default 128)")


def _calib_configs(args: argparse.Namespace):  # noqa: ANN202
    from lowbit.algorithms.sequential import CalibConfig, GPTQConfig

    return (CalibConfig(args.nsamples, args.calib_seqlen, args.calib_text, args.seed),
            GPTQConfig(args.blocksize, args.damp))


def _add_finetune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("end-to-end tuning (--finetune)")
    g.add_argument("--finetune", action="store_true",
                   help="after rounding, tune the stored float scales and the norms against the float model "
                        "(KL on the calibration windows; codes fixed, same storage; GPU recommended)")
    g.add_argument("--ft-epochs", type=float, default=2.0, help="passes over the calibration windows (default 2)")
    g.add_argument("--ft-lr", type=float, default=3e-3, help="Adam learning rate on log-scales (default 3e-3)")
    g.add_argument("--ft-batch", type=int, default=4, help="windows per step (default 4)")


def _finetune_config(args: argparse.Namespace):  # noqa: ANN202
    from lowbit.algorithms.finetune import FinetuneConfig

    return FinetuneConfig(args.ft_epochs, args.ft_lr, args.ft_batch, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Low-bit post-training quantization of LLMs.")
    ap.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("quantize", help="quantize a model and save it")
    _add_model(p)
    p.add_argument("--format", "-f", required=True,
                   help="weight format, e.g. int4_g128_asym, q4_0 (see `lowbit formats`), or a mixed-precision "
                        "plan LOW/HIGH@<n>L|<x>bpw|<x>MB, e.g. nz2_ch/int4_g128_sym@2.5bpw")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq_act", "imatrix"],
                   help="rounding: rtn, gptq, gptq_act (GPTQ with act-order) or imatrix (nearest, weighted by "
                        "calibration activations as llama.cpp's imatrix) (default rtn)")
    p.add_argument("--rotate", action="store_true",
                   help="incoherence processing: randomized Hadamard on both sides of each weight (undone online)")
    p.add_argument("--fuse-rotation", action="store_true",
                   help="fold norms and a randomized Hadamard rotation of the residual stream into the float "
                        "weights first (no runtime cost; the model stays GGUF-exportable)")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--checkpoint", default=None,
                   help="GPTQ resume directory (default: OUT.partial); rerun the same command to resume")
    p.add_argument("--no-progress", action="store_true")
    _add_calib(p)
    _add_finetune(p)

    p = sub.add_parser("eval", help="perplexity of a model (float or quantized)")
    _add_model(p)
    _add_eval(p)

    p = sub.add_parser("compare", help="quantize into several formats and print a side-by-side table")
    _add_model(p)
    _add_eval(p)
    p.add_argument("--formats", default="fp16,int4_g128_asym,int3_g128_asym",
                   help="comma-separated [method:]format list; fp16 is the baseline (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write rows + protocol to this JSON file")
    _add_calib(p)

    p = sub.add_parser("info", help="describe a quantized model directory")
    p.add_argument("path")

    p = sub.add_parser("formats", help="list weight-format names with their exact bits per weight")
    p.add_argument("--shape", default="4096x4096", help="weight shape for the bpw column (default %(default)s)")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--fast", action="store_true",
                   help="decode from the packed weights with a static KV cache and one CUDA graph per token "
                        "(CUDA; no weight cache). On the CPU: the static cache only")
    p.add_argument("--compile", action="store_true",
                   help="with --fast: torch.compile the decode step too (fuses the small ops between matmuls; "
                        "compiling takes ~1 min, worth it for long generations)")
    _add_sampling(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: the model's folder name)")
    p.add_argument("--max-concurrency", type=int, default=1, help="generations run at once (default 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests allowed to wait for a slot; more are refused with 429 (default 16)")
    p.add_argument("--shutdown-timeout", type=int, default=10,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 10)")
    _add_weight_cache(p)
    _add_report_plan(sub)
    _add_export_gguf(sub)
    return ap


def _add_report_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="measure variants (or read measured JSON) and write report.md + pareto.png")
    _add_model(p)
    _add_eval(p)
    p.add_argument("--variants", default=None, help="comma-separated [method:]format list (overrides --set)")
    p.add_argument("--set", default="quick", help="predefined variant list: quick (RTN only), rtn, gptq, w2 "
                   "(default %(default)s)")
    p.add_argument("--from-results", nargs="+", default=None, metavar="JSON",
                   help="build the report from these results files (benchmarks/quality.py, compare --json) "
                        "instead of measuring")
    p.add_argument("--title", default=None, help="plot and report title")
    p.add_argument("--out", "-o", required=True, help="output directory for report.md and pareto.png")
    _add_calib(p)

    p = sub.add_parser("plan", help="which model x format fits a memory budget, with estimated perplexity")
    p.add_argument("models", nargs="*", help="HF directories or cached hub ids (default: bundled smollm2-135m); "
                   "only configs are read")
    p.add_argument("--memory", required=True, help="budget, e.g. 4GB, 512MB, 3.5GiB")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to reserve (default %(default)s)")
    p.add_argument("--formats", default=None, help="comma-separated [method:]format list to consider "
                   "(default: a built-in list from 2 to 16 bits)")
    p.add_argument("--results", nargs="*", default=None, metavar="JSON",
                   help="measured results files (default: benchmarks/results/quality-*.json when present)")
    p.add_argument("--fp16-ppl", action="append", default=[], metavar="MODEL=PPL",
                   help="known fp16 perplexity of a candidate model (repeatable); scales the estimates")
    p.add_argument("--all", action="store_true", help="also list the candidates that do not fit")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    _add_weight_cache(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9; 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_weight_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-weight-cache", action="store_true",
                   help="dequantize quantized weights on every token instead of keeping them in memory "
                        "(slower; saves 4 bytes per quantized weight)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports quote the command that made them
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "info": cmd_info,
                "formats": cmd_formats, "generate": cmd_generate, "serve": cmd_serve,
                "report": cmd_report, "plan": cmd_plan, "export-gguf": cmd_export_gguf}[args.cmd](args)
    except (LowbitError, FileExistsError) as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130


def _load(args: argparse.Namespace, device: str | None = None):  # noqa: ANN202
    from lowbit.models.loader import load_model
    from lowbit.pipeline import default_device, round_to_storage

    model, tok = load_model(args.model, device=device or args.device or default_device())
    return round_to_storage(model), tok


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import save_quantized
    from lowbit.models.loader import resolve
    from lowbit.pipeline import parse_variant, quantize

    method, fmt = parse_variant(f"{args.method}{'+rht' if args.rotate else ''}"
                                f"{'+fused' if args.fuse_rotation else ''}{'+ft' if args.finetune else ''}"
                                f":{args.format}")
    needs_calibration = not method.startswith("rtn") or args.finetune
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite to replace it")
    from lowbit.pipeline import default_device

    compute = args.device or default_device()
    # GPTQ keeps the model in CPU memory and moves one decoder layer at a time to the compute device.
    model, tok = _load(args, device="cpu" if needs_calibration else compute)
    calib, gptq = _calib_configs(args)
    finetune = _finetune_config(args)
    checkpoint = args.checkpoint or f"{out}.partial"
    t0 = time.perf_counter()
    stats = quantize(model, method, fmt, tok, calib=calib, gptq=gptq, device=compute,
                     checkpoint_dir=checkpoint if needs_calibration else None, progress=not args.no_progress,
                     finetune=finetune)
    seconds = time.perf_counter() - t0
    from lowbit.eval.sizes import model_size

    size = model_size(model)
    meta = {"method": method, "format": fmt, "source": resolve(args.model), "quantize_seconds": round(seconds, 2),
            "linear_bpw": size.linear_bpw, "total_bytes": size.total_bytes}
    from dataclasses import asdict

    if needs_calibration:
        meta["calibration"] = asdict(calib)
        meta["gptq"] = asdict(gptq)
    if "finetune" in stats:
        meta["finetune"] = {**asdict(finetune), **stats["finetune"]}
    save_quantized(model, tok, out, meta=meta, overwrite=args.overwrite)
    print(f"saved {out}: {fmt} ({method}), {size.linear_bpw:.4f} bits/weight in decoder linears, "
          f"{size.total_mb:.1f} MB total, quantized in {seconds:.1f}s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.data.corpus import load_text
    from lowbit.eval.perplexity import choose_seqlen, perplexity, tokenize_stream

    text = load_text("eval", args.text)  # fail on a bad path before loading the model
    model, tok = _load(args)
    seqlen = choose_seqlen(model, args.seqlen)
    ids = tokenize_stream(tok, text)
    res = perplexity(model, ids, seqlen, max_windows=args.max_windows, progress=not args.no_progress)
    print(f"perplexity {res.ppl:.4f}  (seqlen {res.seqlen}, {res.n_windows} windows, "
          f"{res.n_predicted} predicted tokens of {ids.numel()} available)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.pipeline import compare, rows_table

    variants = [v for v in args.formats.split(",") if v.strip()]
    from lowbit.pipeline import parse_variant

    for v in variants:
        parse_variant(v)
    model, tok = _load(args)
    calib, gptq = _calib_configs(args)
    rows, protocol = compare(model, tok, variants, seqlen=args.seqlen, max_windows=args.max_windows,
                             text_path=args.text, progress=not args.no_progress, calib=calib, gptq=gptq)
    print(rows_table(rows))
    print(f"\nprotocol: {protocol['windows']} windows x {protocol['seqlen']} tokens "
          f"({protocol['predicted_tokens']} predicted tokens; {protocol['eval_tokens_available']} available), "
          f"model {args.model or 'smollm2-135m'}, eval text {args.text or 'bundled SOTU 2000-2021'}")
    if args.json:
        from dataclasses import asdict

        from lowbit.io.atomic import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"rows": [asdict(r) for r in rows], "protocol": protocol}, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import read_info

    info = read_info(args.path)
    formats = info.pop("formats")
    counts: dict[str, int] = {}
    for f in formats.values():
        counts[f] = counts.get(f, 0) + 1
    for k, v in info.items():
        print(f"{k}: {v}")
    print("quantized linears: " + ", ".join(f"{n} x {f}" for f, n in counts.items()))
    size = (Path(args.path) / "model.safetensors").stat().st_size
    print(f"model.safetensors: {size / 1e6:.1f} MB")
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    from lowbit.eval.report import markdown_table
    from lowbit.formats import example_names, get_format

    try:
        shape = tuple(int(x) for x in args.shape.lower().split("x"))
        assert len(shape) == 2
    except (ValueError, AssertionError):
        raise LowbitError(f"--shape must look like 4096x11008, got {args.shape!r}") from None
    rows = [(n, _bpw_or_reason(get_format(n), shape)) for n in example_names()]
    print(markdown_table(("format", f"bits/weight at {shape[0]}x{shape[1]}"), rows))
    return 0


def _bpw_or_reason(fmt, shape: tuple[int, int]) -> float | str:  # noqa: ANN001
    """A format may not accept every shape (IQ2_XXS needs rows in multiples of 32): say so in its row."""
    try:
        return fmt.bits_per_weight(shape)
    except (ValueError, LowbitError) as e:
        return f"n/a ({e})"


def _model_id(model: str | None) -> str:
    """The name a served model goes by: the bundled alias, a directory's name, or the hub id."""
    from lowbit.data.assets import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    p = Path(model).expanduser()
    return p.resolve().name if p.exists() else model


def cmd_generate(args: argparse.Namespace) -> int:
    from lowbit.serve.generate import SamplingParams, TextStream, encode_chat, encode_prompt

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    model, tok = _load(args)
    extra_stop: tuple[str, ...] = ()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids, extra_stop = encode_chat(tok, [*messages, {"role": "user", "content": prompt}])
    else:
        ids = encode_prompt(tok, prompt)
    from lowbit.serve.generate import use_weight_cache

    decoder = None
    if args.fast:
        from lowbit.serve.fast_decode import StaticDecoder

        use_weight_cache(model, False)  # the point is the packed kernels; the graph removes the launch overhead
        decoder = StaticDecoder(model, max_cache_len=len(ids) + params.max_new_tokens, compile=args.compile)
    else:
        use_weight_cache(model, not args.no_weight_cache)
    stream = TextStream(model, tok, ids, params, extra_stop=extra_stop, decoder=decoder)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    first = stream.t_first - stream.t_start if stream.t_first else 0.0
    print(f"[{stream.completion_tokens} tokens in {stream.t_end - stream.t_start:.2f}s "
          f"({stream.tokens_per_second():.1f} tokens/s overall, {stream.decode_tokens_per_second():.1f} tokens/s "
          f"after the first); prompt {stream.prompt_tokens} tokens, first token after {first:.2f}s; "
          f"finish: {stream.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lowbit.serve.server import serve
    except ImportError as e:  # fastapi/uvicorn are dependencies, but a trimmed install may lack them
        raise LowbitError(f"lowbit serve needs fastapi and uvicorn: {e}") from None

    model, tok = _load(args)
    name = args.model_name or _model_id(args.model)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max concurrency {args.max_concurrency}, "
          f"queue {args.max_queue}); Ctrl+C stops", file=sys.stderr)
    serve(model, tok, name, host=args.host, port=args.port, max_concurrency=args.max_concurrency,
          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, weight_cache=not args.no_weight_cache)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.eval import report

    title = args.title or f"{_model_id(args.model)}: perplexity vs bits per weight"
    if args.from_results:
        points, meta = report.load_results(args.from_results)
        context = [f"command: `lowbit report --from-results {' '.join(args.from_results)} --out {args.out}`"]
        context += [f"{Path(m['file']).name}: `{m['command']}`; {m['header']}" for m in meta]
    else:
        points, context = _measure_report(args)
    md = report.write_report(points, args.out, title, context)
    front = report.pareto_front(points)
    print(f"wrote {md} and {Path(args.out) / 'pareto.png'}: {len(points)} rows, Pareto frontier: "
          + ", ".join(p.variant for p in front))
    return 0


def _measure_report(args: argparse.Namespace):  # noqa: ANN202
    from lowbit.eval import report
    from lowbit.pipeline import compare, parse_variant, split_sim

    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    elif args.set in report.REPORT_SETS:
        variants = report.REPORT_SETS[args.set]
    else:
        raise LowbitError(f"unknown --set {args.set!r}; known: {', '.join(report.REPORT_SETS)}")
    for v in variants:
        parse_variant(split_sim(v)[0])
    model, tok = _load(args)
    calib, gptq = _calib_configs(args)
    rows, protocol = compare(model, tok, variants, seqlen=args.seqlen, max_windows=args.max_windows,
                             text_path=args.text, progress=not args.no_progress, calib=calib, gptq=gptq)
    device = str(next(model.parameters()).device)
    context = [f"command: `lowbit {' '.join(args.argv)}`",
               f"model: {args.model or 'smollm2-135m (bundled)'}; eval text: {args.text or 'bundled SOTU 2000-2021'}",
               f"protocol: {protocol['windows']} windows x {protocol['seqlen']} tokens, "
               f"{protocol['predicted_tokens']} predicted tokens of {protocol['eval_tokens_available']} available; "
               f"GPTQ calibration {calib.nsamples} x {calib.seqlen} tokens (seed {calib.seed})",
               f"hardware: {report.hardware(device)}, float32 compute"]
    from dataclasses import asdict

    return [report.point_from_row(asdict(r)) for r in rows], context


def cmd_plan(args: argparse.Namespace) -> int:
    from lowbit.eval import planner

    print(planner.run_plan(args.models or [None], args.memory, context=args.context, formats=args.formats,
                           results=args.results, fp16_ppl=args.fp16_ppl, show_all=args.all))
    return 0


def _add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp (a lowbit checkpoint, or quantize first)")
    _add_model(p)
    p.add_argument("--out", "-o", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--format", "-f", default=None,
                   help="quantize a float model into this format first (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, "
                        "iq2_xxs map to GGUF types; f16 keeps it float); omit for a lowbit checkpoint")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq_act", "imatrix"],
                   help="rounding when quantizing first (default rtn)")
    p.add_argument("--fallback", default=None, metavar="FORMAT",
                   help="re-quantize linears GGUF cannot hold as stored (no GGUF type, rows not whole blocks, "
                        "rotations) from their dequantized weights into this format, e.g. q8_0 (default: error)")
    p.add_argument("--embed-type", default=None,
                   help="token embeddings / output matrix type: f16 (default, exact) or a GGUF-typed format "
                        "(q8_0, q4_0, iq4_nl, ...), rounded to nearest")
    p.add_argument("--like", default=None, metavar="GGUF",
                   help="give every tensor the type it has in this GGUF of the same model (e.g. one written by "
                        "llama.cpp's quantizer), so the files compare at equal size; replaces --format")
    p.add_argument("--fuse-rotation", action="store_true",
                   help="fold norms and a randomized Hadamard rotation of the residual stream into the weights "
                        "before quantizing (QuaRot-style; llama.cpp runs the result unchanged)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: detected as convert_hf_to_gguf.py does)")
    p.add_argument("--no-progress", action="store_true")
    _add_calib(p)
    _add_finetune(p)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_types import plan_like
    from lowbit.models.loader import is_quantized_dir, load_model, resolve
    from lowbit.pipeline import default_device, parse_variant, quantize
    from lowbit.rotations.fused import fuse_rotation

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite to replace it")
    if args.like and args.format:
        raise LowbitError("--like takes every tensor's type from the given GGUF: drop --format")
    embed_type = args.embed_type
    src = resolve(args.model)
    if is_quantized_dir(src):
        if args.format or args.like or args.fuse_rotation:
            raise LowbitError(f"{src} is already a quantized lowbit checkpoint: export it as is (no --format, "
                              "--like or --fuse-rotation)")
        model, tok = load_model(src, device="cpu")
    elif (args.format or "").lower() in ("f16", "fp16"):  # float export, as llama.cpp's convert_hf_to_gguf
        model, tok = _load(args, device="cpu")
        if args.fuse_rotation:
            fuse_rotation(model)
    else:
        if not (args.format or args.like):
            raise LowbitError(f"{args.model or 'the bundled model'} is a float model: pass --format (e.g. q4_0, "
                              "or f16 to keep it float) or --like FILE.gguf to quantize it before export")
        suffix = ("+fused" if args.fuse_rotation else "") + ("+ft" if args.finetune else "")
        method, fmt = parse_variant(f"{args.method}{suffix}:{args.format or 'q8_0'}")
        compute = args.device or default_device()
        model, tok = _load(args, device="cpu" if not method.startswith("rtn") else compute)
        if args.like:
            like = plan_like(model, args.like, searched=not method.startswith("rtn"))
            fmt, embed_type = like.plan, embed_type or like.embed_type
        calib, gptq = _calib_configs(args)
        quantize(model, method, fmt, tok, calib=calib, gptq=gptq, device=compute, progress=not args.no_progress,
                 finetune=_finetune_config(args))
    report = export_gguf(model.cpu(), tok, out, fallback=args.fallback, embed_type=embed_type or "f16",
                         tokenizer_pre=args.tokenizer_pre)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
