"""Command line: flags -> a Recipe and settings -> one call of lowbit's Python API per command. ``lowbit -h``."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lowbit import __version__
from lowbit.cpu import configure as configure_cpu
from lowbit.errors import LowbitError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, cached hub id, or lowbit directory (default: bundled smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def _add_decode_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="what the model computes in (default auto: on CUDA float16 for a lowbit checkpoint, whose "
                        "packed GEMVs take float16 activations, a float model's own float16 or bfloat16; float32 on "
                        "a CPU)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 2048 or the model's max)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (faster)")
    p.add_argument("--text", default=None, help="evaluate on this UTF-8 text file instead of the bundled eval split "
                   "(or `factbook`: the bundled out-of-domain text, World Factbook country profiles)")
    p.add_argument("--no-progress", action="store_true")


GPU_CALIB = (128, 2048)  # calibration windows x tokens by default on a GPU
# ... and on a CPU: 8k tokens as many short windows rather than few long ones, measured against 16 x 512 on a 2-core
# CPU: the IQ2_XXS preset better on both texts, Q4_0 level in perplexity and closer to F16 (docs/gguf.md)
CPU_CALIB = (64, 128)
# GPTQ's Hessian shrink toward its diagonal at every calibration size: measured on the bundled model (docs/gguf.md), it
# helps most with few tokens (CPU) and, with the GPU's 128 x 2048, still on prose of another domain than the calibration
HESSIAN_SHRINK = 0.5
# +ft's passes over the calibration windows: on the GPU's 128 x 2048, 3 measured closer to F16 than 2 on both texts at
# Q4_0 and Q2_K (lower KL and perplexity), 4 lower KL again but not perplexity (docs/gguf.md); a CPU keeps 2 (time)
GPU_FT_EPOCHS, CPU_FT_EPOCHS = 3.0, 2.0
# +ft's Adam rate: the CPU's 64 x 128 windows make batches of 512 tokens, on which 3e-3 raised the first batch's KL at
# Q4_0, Q2_K and Q4_K_M (the guard then re-ran the tuning at 3e-4); 1e-3 was kept at once at Q4_0 and Q2_K and scored
# better on both texts in half the time; Q4_K_M and Q3_K_M refused both, and retried at 3e-4 (finetune.retry_lr) from
# either rate give the same file (docs/gguf.md)
GPU_FT_LR, CPU_FT_LR = 3e-3, 1e-3


def _add_calib(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (GPTQ)")
    g.add_argument("--nsamples", type=int, default=None,
                   help=f"calibration windows (default {GPU_CALIB[0]} on a GPU, {CPU_CALIB[0]} on a CPU)")
    g.add_argument("--calib-seqlen", type=int, default=None,
                   help=f"tokens per window (default {GPU_CALIB[1]} on a GPU, {CPU_CALIB[1]} on a CPU; at most the "
                        "model's context)")
    g.add_argument("--calib-text", default=None, help="UTF-8 text file instead of the bundled calib split")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (default 0.01)")
    g.add_argument("--shrink", type=float, default=None,
                   help="pull H's off-diagonal part toward zero, H' = (1 - s) H + s diag(H): a Hessian from few "
                        "tokens, or tokens of one kind of text, trusts their correlations less (default "
                        f"{HESSIAN_SHRINK})")
    g.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block (default 128)")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on a GPU, run the calibration passes' float32 matmuls exactly instead of in TF32 (GPTQ's "
                        "own arithmetic is always exact)")


def _add_finetune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("end-to-end tuning (--finetune)")
    g.add_argument("--finetune", action="store_true",
                   help="after rounding, tune the stored float scales and the norms against the float model "
                        "(KL on the calibration windows; codes fixed, same storage; GPU recommended)")
    g.add_argument("--ft-epochs", type=float, default=None,
                   help=f"passes over the calibration windows (default {GPU_FT_EPOCHS:g} on a GPU, "
                        f"{CPU_FT_EPOCHS:g} on a CPU)")
    g.add_argument("--ft-lr", type=float, default=None,
                   help=f"Adam learning rate on log-scales (default {GPU_FT_LR:g} on a GPU, {CPU_FT_LR:g} on a CPU)")
    g.add_argument("--ft-batch", type=int, default=4, help="windows per step (default 4)")
    g.add_argument("--ft-mode", choices=["auto", "model", "blocks"], default="auto",
                   help="model: KL through the whole network (float teacher on the device); blocks: a few decoder "
                        "layers at a time against the float model's hidden states (bounded memory); auto (default): "
                        "model when it fits the device's free memory, else blocks")
    g.add_argument("--ft-block-layers", type=int, default=2, help="decoder layers per block (default 2)")
    g.add_argument("--ft-tail-layers", type=int, default=None,
                   help="blocks mode and --stream: the last decoder layers tuned again with the final norm by KL on "
                        "the logits after the layer-wise pass (default 4; 0: the final norm alone)")


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
    p.add_argument("--head", default=None, metavar="FORMAT",
                   help="also round the LM head to nearest in FORMAT, e.g. q6_k or q4_k, after the rest (a k-quant "
                        "takes llama.cpp's fallback where its superblocks do not divide the rows; a head tied to "
                        "the embeddings is untied, the embeddings stay 16-bit; default: keep it 16-bit)")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--checkpoint", default=None,
                   help="GPTQ resume directory (default: OUT.partial); rerun the same command to resume")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the weights one decoder layer at a time from the safetensors shards instead of "
                        "loading the model (same result; default: when the float model would take more than half "
                        "of the memory, and for synthetic:<shape> sources; docs/scale.md)")
    p.add_argument("--offload", default="auto", choices=["auto", "device", "host"],
                   help="streaming: keep calibration activations on the device or in host memory (default: auto, "
                        "host when they do not fit on the device)")
    p.add_argument("--no-progress", action="store_true")
    _add_calib(p)
    _add_finetune(p)

    p = sub.add_parser("synth", help="write a synthetic model of a real shape (random weights) as an HF checkpoint")
    p.add_argument("--shape", required=True,
                   help="tiny | llama-2-7b | llama-2-13b | llama-3-8b | llama-3-70b (docs/scale.md)")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--layers", type=int, default=None, help="write only the first N decoder layers")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="stored dtype")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GB (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="perplexity of a model (float or quantized), and KL to a reference")
    _add_model(p)
    _add_eval(p)
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="also report KL divergence and top-1 agreement to this (16-bit) model")

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
    _add_decode_dtype(p)
    _add_fast(p, "The default on CUDA, where --no-fast runs the dynamic-cache loop")
    _add_sampling(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model(p)
    _add_decode_dtype(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: the model's folder name)")
    p.add_argument("--max-concurrency", type=int, default=1, help="generations run at once (default 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests allowed to wait for a slot; more are refused with 429 (default 16)")
    p.add_argument("--shutdown-timeout", type=float, default=10,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 10)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes; larger ones get 413 before they are read (default 1 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens, refused before it takes a queue slot (default: the context)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host name (NAME or NAME:PORT; '*' = any), repeatable; by "
                        "default only the bound address (and loopback names when bound to loopback)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request but /health "
                        "(default: $LOWBIT_API_KEY; unset = no key)")
    _add_fast(p, "The default on CUDA (--no-fast: the dynamic-cache loop, as on a CPU unless --compile or "
                 "--fast-cache asks for this)")
    p.add_argument("--fast-cache", type=int, default=None, metavar="TOKENS",
                   help="with --fast: positions of each decoder's static KV cache (default: the model's context, at "
                        "most 4096); longer generations run the ordinary loop")
    _add_weight_cache(p)
    _add_report_plan(sub)
    _add_export_gguf(sub)
    _add_export_hf(sub)
    _add_demo(sub)
    threads = ("CPU threads for PyTorch (default: OMP_NUM_THREADS if set, else the CPUs this process may use, shared "
               "by the processes of a torchrun; idle "
               "threads sleep instead of spinning, so a busy machine does not stall every operation: docs/formats.md)")
    ap.add_argument("--threads", type=int, default=None, help=threads)
    for p in sub.choices.values():  # also after the command; there it wins
        p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=threads)
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
    p.add_argument("--results-pages", action="store_true",
                   help="write the docs' results pages (one markdown page per results family) from --results-dir "
                        "into --out instead of a quality report")
    p.add_argument("--results-dir", default="benchmarks/results", help="with --results-pages (default %(default)s)")
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


def _add_fast(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with a static KV cache and one CUDA graph per token, from the packed weights (CUDA; "
                        f"no weight cache). On a CPU: the static cache, with the weight cache. {default}")
    p.add_argument("--compile", action="store_true",
                   help="with --fast: torch.compile the decode step too (fuses the small ops between matmuls "
                        "and, on Hopper and later, launches kernels with programmatic dependent launch; compiling "
                        "takes ~1 min, worth it for long generations)")


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


def _add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a GGUF file for llama.cpp (a lowbit, GPTQ, AWQ or compressed-tensors "
                       "checkpoint, or quantize first)")
    _add_model(p)
    p.add_argument("--out", "-o", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--format", "-f", default=None,
                   help="quantize a float model into this format first (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, "
                        "iq2_xxs, q2_k..q6_k map to GGUF types; f16 keeps it float); omit for a lowbit, GPTQ, AWQ "
                        "or compressed-tensors checkpoint")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq_act", "imatrix"],
                   help="rounding when quantizing first (default rtn)")
    p.add_argument("--fallback", default=None, metavar="FORMAT",
                   help="re-quantize linears GGUF cannot hold as stored (no GGUF type, rows not whole blocks, "
                        "rotations; a GPTQ / AWQ / compressed-tensors linear no ggml type holds exactly, e.g. "
                        "group size 128) from their dequantized weights into this format, e.g. q8_0 or q4_k "
                        "(default: error)")
    p.add_argument("--embed-type", default=None,
                   help="token embeddings / output matrix type: f16 (default, exact) or a GGUF-typed format "
                        "(q8_0, q4_0, iq4_nl, ...), rounded to nearest")
    p.add_argument("--like", default=None, metavar="GGUF",
                   help="give every tensor the type it has in this GGUF of the same model (e.g. one written by "
                        "llama.cpp's quantizer), so the files compare at equal size; replaces --format")
    p.add_argument("--preset", default=None, metavar="TYPE",
                   help="give every tensor the type llama.cpp's quantizer chooses for this preset (Q4_K_M, Q5_K_M, "
                        "Q6_K, Q3_K_M, Q3_K_S, Q2_K, IQ2_XXS, Q4_0); replaces --format, excludes --like")
    p.add_argument("--fuse-rotation", action="store_true",
                   help="fold norms and a randomized Hadamard rotation of the residual stream into the weights "
                        "before quantizing (QuaRot-style; llama.cpp runs the result unchanged)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: detected as convert_hf_to_gguf.py does)")
    p.add_argument("--no-progress", action="store_true")
    _add_calib(p)
    _add_finetune(p)


def _add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a GPTQ or compressed-tensors checkpoint that transformers and vLLM "
                       "load (a lowbit checkpoint, or quantize first)")
    _add_model(p)
    p.add_argument("--to", required=True, choices=["gptq", "compressed-tensors"], help="checkpoint layout")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--format", "-f", default=None,
                   help="quantize a float model into this format first: int{2,3,4,8}_{gN|ch}_sym (q4_0, q8_0) or "
                        "int{b}_{gN|ch}_zp (asymmetric, integer zero point); omit for a lowbit checkpoint")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "gptq_act", "imatrix"],
                   help="rounding when quantizing first (default rtn)")
    p.add_argument("--fuse-rotation", action="store_true",
                   help="fold norms and a randomized Hadamard rotation into the weights before quantizing (the "
                        "result is an ordinary model, unlike +rht)")
    p.add_argument("--no-progress", action="store_true")
    _add_calib(p)
    _add_finetune(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the point of lowbit in ~5 minutes on a CPU: 2, 3 and 4 bits, lowbit's recipe "
                       "vs round-to-nearest, then text from the smallest good model")
    _add_model(p)
    p.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: the demo's)")
    p.add_argument("--prompt", default=None, help="prompt for the closing sample")
    p.add_argument("--no-progress", action="store_true")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds like Ctrl-C: atomic writes remove their
    temporaries on the way out instead of leaving them half-written."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds(enabled: bool) -> Iterator[None]:
    # Only from the main thread (signal's rule), and never for `serve`, whose server handles SIGTERM itself.
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is None):  # None: a handler set outside Python, left alone
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports quote the command that made them
    try:
        configure_cpu(args.threads)  # before anything imports torch (lowbit/cpu.py)
        with _sigterm_unwinds(args.cmd != "serve"):
            return COMMANDS[args.cmd](args)
    except (LowbitError, FileExistsError) as e:
        print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


# ------------------------------------------------------------------------------------ flags -> recipe and settings


def _calib(args: argparse.Namespace):  # noqa: ANN202
    from lowbit.algorithms.sequential import CalibConfig, GPTQConfig

    nsamples, seqlen = calib_size(args)
    shrink = getattr(args, "shrink", None)
    if shrink is None:
        shrink = HESSIAN_SHRINK
    return (CalibConfig(nsamples, seqlen, args.calib_text, args.seed),
            GPTQConfig(args.blocksize, args.damp, shrink=shrink, tf32=getattr(args, "tf32", True)))


def calib_size(args: argparse.Namespace) -> tuple[int, int]:
    """--nsamples x --calib-seqlen, by default sized for the device: on a 2-core CPU, GPTQ act-order on 64 x 128
    tokens takes about as long as llama.cpp's imatrix workflow on its 128 x 512 (docs/gguf.md), 128 x 2048 hours."""
    nsamples, seqlen = CPU_CALIB if _on_cpu(args) else GPU_CALIB
    return (nsamples if args.nsamples is None else args.nsamples,
            seqlen if args.calib_seqlen is None else args.calib_seqlen)


def ft_epochs(args: argparse.Namespace) -> float:
    """--ft-epochs, by default sized for the device as the calibration is (GPU_FT_EPOCHS, CPU_FT_EPOCHS)."""
    return _given_or_device(args, args.ft_epochs, GPU_FT_EPOCHS, CPU_FT_EPOCHS)


def ft_lr(args: argparse.Namespace) -> float:
    """--ft-lr, by default the device's (GPU_FT_LR, CPU_FT_LR)."""
    return _given_or_device(args, args.ft_lr, GPU_FT_LR, CPU_FT_LR)


def _given_or_device(args: argparse.Namespace, given: float | None, gpu: float, cpu: float) -> float:
    return given if given is not None else cpu if _on_cpu(args) else gpu


def _on_cpu(args: argparse.Namespace) -> bool:
    from lowbit.models.walker import default_device

    return str(getattr(args, "device", None) or default_device()) == "cpu"


def _recipe(args: argparse.Namespace, fmt: str):  # noqa: ANN202
    from lowbit.algorithms.finetune import FinetuneConfig
    from lowbit.recipe import Recipe

    calib, gptq = _calib(args)
    tail = {} if args.ft_tail_layers is None else {"tail_layers": args.ft_tail_layers}  # None: the config's default
    finetune = FinetuneConfig(ft_epochs(args), ft_lr(args), args.ft_batch, seed=args.seed, mode=args.ft_mode,
                              block_layers=args.ft_block_layers, **tail) if args.finetune else None
    return Recipe(fmt, args.method, rotate=getattr(args, "rotate", False), fuse_rotation=args.fuse_rotation,
                  finetune=finetune, calib=calib, gptq=gptq, head=getattr(args, "head", None))


def _load(args: argparse.Namespace):  # noqa: ANN202
    import torch

    import lowbit

    dtype = getattr(args, "dtype", "float32")  # generate and serve take --dtype; evaluating computes in float32
    return lowbit.load(args.model, device=args.device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))


# ------------------------------------------------------------------------------------------------------ commands


def cmd_quantize(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.algorithms import distributed

    recipe = _recipe(args, args.format)
    device, lead = args.device, True
    if distributed.launched():  # torchrun --nproc-per-node N: one process per GPU (or gloo CPU processes)
        if recipe.finetune or not recipe.needs_calibration:
            raise LowbitError("several processes share the calibration of GPTQ/imatrix; run +ft and rtn recipes "
                              "in one process")
        ranks, device = distributed.init_from_env(args.device)
        lead = ranks.lead
    result = lowbit.convert(args.model, recipe, args.out, device=device, checkpoint_dir=args.checkpoint,
                            overwrite=args.overwrite, progress=lead and not args.no_progress, stream=args.stream,
                            offload=args.offload)
    if lead:
        print(f"saved {args.out}: {result.summary()}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import torch

    from lowbit.io.synthetic import write_synthetic

    out = write_synthetic(args.shape, args.out, seed=args.seed, num_layers=args.layers,
                          dtype=getattr(torch, args.dtype), shard_bytes=int(args.shard_gb * 1e9),
                          overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _check_preset_args(args: argparse.Namespace) -> None:
    from lowbit.io.gguf_presets import check_preset

    if args.like or args.format:
        raise LowbitError("--preset sets every tensor's type: drop --like and --format")
    check_preset(args.preset)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.io.hf_quant import checkpoint_method

    if args.like and args.format:
        raise LowbitError("--like takes every tensor's type from the given GGUF: drop --format")
    if args.preset:
        _check_preset_args(args)
    float_export = (args.format or "").lower() in ("f16", "fp16")
    quantizing = bool(args.like or args.preset or (args.format and not float_export))
    recipe = _recipe(args, args.format or "q8_0") if quantizing else None  # with --like the format is replaced
    src = lowbit.resolve(args.model)
    if args.format and checkpoint_method(src):  # f16 included: such a checkpoint is converted as stored
        raise LowbitError(f"{src} is already quantized ({checkpoint_method(src)}): drop --format (--fallback sets "
                          "the type of the linears no ggml type holds exactly)")
    if not quantizing and not float_export and not lowbit.is_quantized_dir(src) and not checkpoint_method(src):
        raise LowbitError(f"{args.model or 'the bundled model'} is a float model: pass --format (e.g. q4_0, or f16 "
                          "to keep it float) or --like FILE.gguf to quantize it before export")
    report = lowbit.convert_gguf(args.model, args.out, recipe, like=args.like, preset=args.preset,
                                 embed_type=args.embed_type,
                                 fallback=args.fallback, fuse_rotation_only=float_export and args.fuse_rotation,
                                 tokenizer_pre=args.tokenizer_pre, device=args.device, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    print(report.summary())
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    import lowbit

    recipe = _recipe(args, args.format) if args.format else None
    report = lowbit.convert_hf(args.model, args.out, recipe, to=args.to, device=args.device,
                               overwrite=args.overwrite, progress=not args.no_progress)
    print(report.summary())
    return 0


def _check_texts(args: argparse.Namespace) -> None:
    """Fail on a bad --text / --calib-text (missing, a directory, not UTF-8, empty) before loading the model."""
    from lowbit.data.corpus import bundled_name, read_text_file

    for path in (getattr(args, "text", None), getattr(args, "calib_text", None)):
        if path is not None and bundled_name(path) is None:
            read_text_file(path)


def cmd_eval(args: argparse.Namespace) -> int:
    import lowbit

    _check_texts(args)
    model, tok = _load(args)
    reference = lowbit.load(args.reference, device=args.device)[0] if args.reference else None
    print(lowbit.evaluate(model, tok, text_file=args.text, seqlen=args.seqlen, max_windows=args.max_windows,
                          reference=reference, progress=not args.no_progress))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.comparison import parse_variants, rows_table

    calib, gptq = _calib(args)
    variants = parse_variants([v for v in args.formats.split(",") if v.strip()], calib=calib, gptq=gptq)
    _check_texts(args)
    model, tok = _load(args)
    rows, protocol = lowbit.compare(model, tok, variants, seqlen=args.seqlen, max_windows=args.max_windows,
                                    text_path=args.text, progress=not args.no_progress)
    print(rows_table(rows))
    print(f"\nprotocol: {protocol['windows']} windows x {protocol['seqlen']} tokens "
          f"({protocol['predicted_tokens']} predicted tokens; {protocol['eval_tokens_available']} available), "
          f"model {args.model or 'smollm2-135m'}, eval text {args.text or 'bundled SOTU 2000-2021'}")
    if args.json:
        from lowbit.comparison import write_rows_json

        write_rows_json(args.json, rows, protocol)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import describe

    print(describe(args.path))
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    from lowbit.eval.report import markdown_table
    from lowbit.formats import bpw_rows

    try:
        shape = tuple(int(x) for x in args.shape.lower().split("x"))
        assert len(shape) == 2
    except (ValueError, AssertionError):
        raise LowbitError(f"--shape must look like 4096x11008, got {args.shape!r}") from None
    print(markdown_table(("format", f"bits/weight at {shape[0]}x{shape[1]}"), bpw_rows(shape)))
    return 0


def _model_id(model: str | None) -> str:
    """The name a served model goes by: the bundled alias, a directory's name, or the hub id."""
    from lowbit.data.assets import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    p = Path(model).expanduser()
    return p.resolve().name if p.exists() else model


def cmd_generate(args: argparse.Namespace) -> int:
    import lowbit
    from lowbit.serve.generate import SamplingParams

    try:  # undecodable bytes arrive as a decode error or as lone surrogates, which no tokenizer accepts
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt.encode("utf-8")
    except UnicodeError:
        raise LowbitError("the prompt is not valid UTF-8 text") from None
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    model, tok = _load(args)
    stream = lowbit.generate(model, tok, prompt, chat=args.chat, system=args.system, params=params, fast=args.fast,
                             compile=args.compile, weight_cache=not args.no_weight_cache)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{stream.stats_line()}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from lowbit.serve.app import serve, serves_fast
        from lowbit.serve.guard import AllowedHosts
    except ImportError as e:
        raise LowbitError(f"lowbit serve needs the serve extra: pip install 'lowbit[serve]' ({e})") from None

    if args.max_body_bytes < 1 or (args.max_prompt_tokens is not None and args.max_prompt_tokens < 1):
        raise LowbitError("--max-body-bytes and --max-prompt-tokens must be >= 1")
    if (args.compile or args.fast_cache is not None) and args.fast is False:
        raise LowbitError("--compile and --fast-cache go with --fast")
    if args.fast_cache is not None and args.fast_cache < 2:
        raise LowbitError(f"--fast-cache needs >= 2 positions, got {args.fast_cache}")
    AllowedHosts(args.allowed_host)  # a malformed name fails now, not after loading the model
    api_key = args.api_key or os.environ.get("LOWBIT_API_KEY") or None
    model, tok = _load(args)
    name = args.model_name or _model_id(args.model)
    if serves_fast(model, args.fast, args.compile, args.fast_cache):
        print(f"preparing {args.max_concurrency} fast decoder(s)" + (" (compiling: ~1 min each)" if args.compile
                                                                    else ""), file=sys.stderr)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max concurrency {args.max_concurrency}, "
          f"queue {args.max_queue}, API key {'required' if api_key else 'off'}); Ctrl+C stops", file=sys.stderr)
    serve(model, tok, name, host=args.host, port=args.port, max_concurrency=args.max_concurrency,
          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, weight_cache=not args.no_weight_cache,
          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
          allowed_hosts=args.allowed_host, api_key=api_key, fast=args.fast, compile=args.compile,
          fast_cache=args.fast_cache)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.comparison import quality_report

    if args.results_pages:
        from lowbit.eval.results_docs import write_results_pages

        pages = write_results_pages(args.results_dir, args.out)
        print(f"wrote {len(pages)} pages to {args.out}: " + ", ".join(p.name for p in pages))
        return 0

    calib, gptq = _calib(args)
    summary = quality_report(args.out, model=args.model, variants=args.variants, variant_set=args.set,
                             from_results=args.from_results, title=args.title, command=f"lowbit {' '.join(args.argv)}",
                             device=args.device, seqlen=args.seqlen, max_windows=args.max_windows,
                             text_path=args.text, calib=calib, gptq=gptq, progress=not args.no_progress)
    print(summary)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from lowbit import planner

    print(planner.run_plan(args.models or [None], args.memory, context=args.context, formats=args.formats,
                           results=args.results, fp16_ppl=args.fp16_ppl, show_all=args.all))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import run_demo

    run_demo(args.model, device=args.device, max_windows=args.max_windows, prompt=args.prompt,
             progress=not args.no_progress)
    return 0


COMMANDS = {"quantize": cmd_quantize, "synth": cmd_synth, "eval": cmd_eval, "compare": cmd_compare, "info": cmd_info,
            "formats": cmd_formats, "generate": cmd_generate, "serve": cmd_serve, "report": cmd_report,
            "plan": cmd_plan, "export-gguf": cmd_export_gguf, "export-hf": cmd_export_hf, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
