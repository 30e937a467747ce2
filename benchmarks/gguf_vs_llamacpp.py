"""lowbit's GGUF files vs llama.cpp's own quantizer: same model, same types, same text, llama.cpp's perplexity.

    python benchmarks/gguf_vs_llamacpp.py --llama-bin DIR          # DIR holds llama-quantize/-imatrix/-perplexity
    python benchmarks/gguf_vs_llamacpp.py --llama-bin DIR --types iq2_xxs --methods gptq,gptq+fused --ppl-chunks 8
    python benchmarks/gguf_vs_llamacpp.py --llama-bin DIR --methods gptq_act+ft   # +ft: end-to-end scale tuning
    python benchmarks/gguf_vs_llamacpp.py --llama-bin DIR --methods gptq_act,imatrix,gptq_act+fused/q4_0  # /EMBED:
        # token_embd and output type (fused rotation unties the head: 2 x Q4_0 ~ llama.cpp's one tied Q8_0)

For each GGUF type T (q4_0, q4_1, iq2_xxs):
  * llama.cpp: ``llama-quantize [--imatrix] f16.gguf T`` (the F16 file is lowbit's float export, which loads in
    llama.cpp like convert_hf_to_gguf's); the importance matrix comes from ``llama-imatrix`` on the calibration
    split (the same text lowbit calibrates on, 128 x 2048 tokens by default, as lowbit's GPTQ);
  * lowbit: ``lowbit.convert_gguf(model, out, "M:q8_0", like=<llama.cpp's T file>)`` (what ``lowbit export-gguf
    --like FILE --method M [--fuse-rotation] [--finetune]`` runs): every tensor gets the type llama.cpp gave it
    (its own choices and fallbacks included), so the files have the same size and differ only in the rounding
    (RTN / GPTQ, block LDLQ for IQ2_XXS / + fused rotation / + end-to-end tuning).
Every file is scored twice on each --texts text (``eval``: the SOTU eval split, in the calibration's domain;
``factbook``: World Factbook country profiles, prose of another kind; a row's fields for a text other than eval
carry ``@TEXT``, e.g. ``ppl@factbook``):
  * ``ppl``: lowbit's protocol (as in every other lowbit table: non-overlapping --ctx windows over the whole split,
    every token scored), the file's tensors dequantized into the model (io/gguf_import.py), on the GPU if any;
    with ``kl`` (mean KL divergence from the F16 file's next-token distribution, nats per token) and ``top1``
    (how often both pick the same most likely token), as ``llama-perplexity --kl-divergence`` reports them;
  * ``llama_ppl``: stock ``llama-perplexity`` (its protocol: --ctx windows, second half of each scored) on the
    first --llama-ppl-chunks windows, on the CPU in a background thread while lowbit quantizes (0 = skip).
Rows are appended to benchmarks/results/gguf-<tag>.json as they finish; --resume skips those already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import torch

import lowbit
from lowbit.data.corpus import NAMED_TEXTS, load_text
from lowbit.eval.perplexity import Reference
from lowbit.io.gguf_import import load_gguf_weights
from lowbit.models.walker import default_device

RESULTS = Path(__file__).parent / "results"
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def sh(cmd: list[str], log: Path) -> str:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd[:1])} failed ({res.returncode}); see {log}\n{res.stderr[-2000:]}")
    print(f"  {Path(cmd[0]).name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return res.stdout + res.stderr


def llama_perplexity(exe: str, model: Path, text: Path, ctx: int, chunks: int, threads: int,
                     log: Path) -> tuple[float, float]:
    """Stock ``llama-perplexity`` of a GGUF file on a text file: (ppl, its ±), over the first ``chunks`` windows
    of ``ctx`` tokens (-1: all of them), the second half of each window scored (llama.cpp's protocol)."""
    text_out = sh([exe, "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
                   "-t", str(threads)], log)
    found = _PPL.search(text_out)
    if found is None:
        raise RuntimeError(f"no final estimate in {log}")
    ppl, err = map(float, found.groups())
    return ppl, err


def lowbit_options(extra: str) -> argparse.Namespace:
    """--lowbit-args: the calibration, GPTQ, tuning and export options of ``lowbit export-gguf`` (same names and
    defaults), for the ``lowbit.convert_gguf`` calls."""
    p = argparse.ArgumentParser(prog="--lowbit-args", add_help=False)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--calib-text", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--shrink", type=float, default=None, help="default: the CLI's (HESSIAN_SHRINK)")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--ft-epochs", type=float, default=None, help="default: the CLI's for the device (ft_epochs)")
    p.add_argument("--ft-lr", type=float, default=None, help="default: the CLI's for the device (ft_lr)")
    p.add_argument("--ft-batch", type=int, default=4)
    p.add_argument("--fallback", default=None)
    p.add_argument("--tokenizer-pre", default=None)
    p.add_argument("--device", default=None)
    return p.parse_args(shlex.split(extra))


def lowbit_recipes(methods: str, o: argparse.Namespace) -> dict[str, tuple[lowbit.Recipe, str | None]]:
    """``METHOD[+fused][+ft][/EMBED]`` -> (recipe, EMBED), all parsed before any work. The recipe's format is a
    placeholder: ``like=`` replaces it with the llama.cpp file's per-tensor types. ``none``: llama.cpp's files
    only."""
    from lowbit.cli import HESSIAN_SHRINK, ft_epochs, ft_lr

    shrink = HESSIAN_SHRINK if o.shrink is None else o.shrink  # as `lowbit export-gguf` decides it
    settings = {"calib": lowbit.CalibConfig(o.nsamples, o.calib_seqlen, o.calib_text, o.seed),
                "gptq": lowbit.GPTQConfig(o.blocksize, o.damp, shrink=shrink),
                "finetune": lowbit.FinetuneConfig(ft_epochs(o), ft_lr(o), o.ft_batch, seed=o.seed)}
    recipes = {}
    for method in [] if methods == "none" else methods.split(","):
        spec, _, embed = method.partition("/")
        recipes[method] = (lowbit.Recipe.parse(f"{spec}:q8_0", **settings), embed or None)
    return recipes


def suffixed(fields: dict, text: str) -> dict:
    """A row's fields for ``text``: as they are for the eval split, ``NAME@TEXT`` for another."""
    return fields if text == "eval" else {f"{k}@{text}": v for k, v in fields.items()}


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def file_stats(path: Path) -> dict:
    """File size, bits per weight over all tensors (header and vocabulary included), and per decoder linear."""
    tensors = gguf.GGUFReader(str(path)).tensors
    n = sum(int(t.n_elements) for t in tensors)
    lin = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    types: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    size = path.stat().st_size
    return {"file_mb": size / 1e6, "bpw_file": 8 * size / n,
            "bpw_linears": 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin),
            "matrix_types": types}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.bin = Path(args.llama_bin)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = RESULTS / f"gguf-{args.tag}.json"
        self.rows: list[dict] = json.loads(self.out.read_text())["rows"] if args.resume and self.out.exists() else []
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.options = lowbit_options(args.lowbit_args)
        self.reference: Reference | None = None  # the F16 file's model: KL and top-1 agreement of the others
        self.recipes = lowbit_recipes(args.methods, self.options)
        self.texts = args.texts.split(",")
        if "eval" not in self.texts or not set(self.texts) <= {"eval", *NAMED_TEXTS}:
            raise lowbit.LowbitError(f"--texts {args.texts}: eval and any of {NAMED_TEXTS}")

    def tool(self, name: str) -> str:
        exe = self.bin / name
        if not exe.exists():
            raise SystemExit(f"{exe} not found: build llama.cpp's tools (see README) and pass --llama-bin")
        return str(exe)

    def done(self, label: str, qtype: str) -> bool:
        return any(r["label"] == label and r["type"] == qtype for r in self.rows)

    def save(self, row: dict) -> None:
        with self.lock:
            old = next((r for r in self.rows if r["label"] == row["label"] and r["type"] == row["type"]), None)
            if old is not None:
                old.update(row)
                row = old
            else:
                self.rows.append(row)
            meta = {"model": self.args.model or "bundled SmolLM2-135M", "ctx": self.args.ctx,
                    "llama_ppl_chunks": self.args.llama_ppl_chunks, "device": _device_name(),
                    "max_windows": self.args.max_windows, "texts": self.texts,
                    "imatrix": f"{self.args.imatrix_chunks} x {self.args.imatrix_ctx} tokens",
                    "command": " ".join(sys.argv)}
            self.out.write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=1))
        cells = [row["label"], row["type"], f"{row.get('file_mb', float('nan')):.1f}", f"{row.get('quant_s', 0):.0f}"]
        for name in self.texts:
            at = "" if name == "eval" else f"@{name}"
            cells += [f"{row.get('ppl' + at, float('nan')):.3f}", f"{row.get('kl' + at, float('nan')):.4f}",
                      f"{row['llama_ppl' + at]:.3f}" if "llama_ppl" + at in row else "…"]
        print("| " + " | ".join(cells) + " |", flush=True)

    def perplexity_worker(self) -> None:
        while (job := self.jobs.get()) is not None:
            label, qtype, path, name = job
            try:
                ppl, err = llama_perplexity(self.tool("llama-perplexity"), path, self.work / f"{name}.txt",
                                            self.args.ctx, self.args.llama_ppl_chunks, self.args.threads,
                                            self.work / f"{path.stem}.{name}.ppl.log")
                self.save({"label": label, "type": qtype, **suffixed({"llama_ppl": ppl, "llama_ppl_err": err}, name)})
            except Exception as e:  # noqa: BLE001 - report and go on with the other files
                self.errors.append(f"{label}: {e}")
                print(f"ERROR {label}: {e}", flush=True)

    def score(self, label: str, qtype: str, path: Path, **extra: object) -> None:
        """lowbit-protocol perplexity on every text now (GPU; not with --max-windows 0), llama-perplexity queued for
        the CPU thread."""
        if self.done(label, qtype):
            return
        row = {"label": label, "type": qtype, "file": path.name, **file_stats(path), **extra}
        if self.args.max_windows != 0:
            row |= self.lowbit_protocol(label, path)
        self.save(row)
        for name in self.texts if self.args.llama_ppl_chunks else ():
            self.jobs.put((label, qtype, path, name))

    def lowbit_protocol(self, label: str, path: Path) -> dict:
        """ppl (with KL and top-1 to the F16 file) of the file's tensors in the model, each text, and eval_s."""
        if self.reference is None and label != "F16":  # resumed after the F16 row: its model is still the reference
            f16 = load_gguf_weights(copy.deepcopy(self.model), self.work / "f16.gguf").to(self.device)
            self.reference = Reference(f16, cache_bytes=6e9)
        t0 = time.perf_counter()
        model = load_gguf_weights(copy.deepcopy(self.model), path).to(self.device)
        row = {}
        for name in self.texts:
            res = lowbit.evaluate(model, self.tok, text_file=None if name == "eval" else name, seqlen=self.args.ctx,
                                  max_windows=self.args.max_windows, reference=self.reference, progress=False)
            kl = {} if res.kl is None else {"kl": res.kl, "top1": res.top1}
            row.update(suffixed({"ppl": res.ppl, "windows": res.n_windows, **kl}, name))
        if label == "F16":  # the F16 file, scored first, is every later file's KL reference
            self.reference = Reference(model, cache_bytes=6e9)  # every window of both texts, in float16
        return {**row, "eval_s": time.perf_counter() - t0}

    def make_imatrix(self, f16: Path, imatrix: Path) -> None:
        if not imatrix.exists():
            a = self.args
            t0 = time.perf_counter()
            sh([self.tool("llama-imatrix"), "-m", str(f16), "-f", str(self.work / "calib.txt"), "-o", str(imatrix),
                "-c", str(a.imatrix_ctx), "--chunks", str(a.imatrix_chunks), "-t", str(a.threads), "--no-ppl"],
               self.work / "imatrix.log")
            (self.work / "imatrix.seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")

    def llama_quantize(self, f16: Path, qtype: str, imatrix: Path | None) -> Path:
        name = f"llamacpp-{qtype}{'-imatrix' if imatrix else ''}"
        path, seconds = self.work / f"{name}.gguf", self.work / f"{name}.seconds"
        if not path.exists():
            t0 = time.perf_counter()
            sh([self.tool("llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []),
                str(f16), str(path), qtype.upper(), str(self.args.threads)], self.work / f"{name}.log")
            seconds.write_text(f"{time.perf_counter() - t0:.1f}\n")
        # wall-clock of the user's workflow: llama-imatrix (once per model) + llama-quantize
        quant_s = sum(float(f.read_text()) for f in (seconds, self.work / "imatrix.seconds")[:2 if imatrix else 1]
                      if f.exists())
        self.score(f"llama.cpp{' + imatrix' if imatrix else ''}", qtype, path, source="llama-quantize",
                   quant_s=quant_s)
        return path

    def lowbit_rows(self, qtype: str, like: Path) -> None:
        o = self.options
        for method, (recipe, embed) in self.recipes.items():
            if qtype == "iq2_xxs" and method.startswith("rtn"):
                continue  # plain rounding onto the E8 grid is ~10^5 perplexity: not a contender
            label = f"lowbit {method}"
            path = self.work / f"lowbit-{method.replace('+', '-').replace('/', '-')}-{qtype}.gguf"
            if self.done(label, qtype):
                continue
            # METHOD[+fused][+ft][/EMBED]: EMBED is the token_embd/output type (fused rotation unties the head, so a
            # file of llama.cpp's size stores both at ~half the bits of llama.cpp's one tied Q8_0 matrix)
            seconds = path.with_suffix(".seconds")  # a file made earlier (or by the CLI) keeps its wall-clock here
            if not path.exists():
                t0 = time.perf_counter()
                try:
                    lowbit.convert_gguf(self.args.model, path, recipe, like=like, embed_type=embed,
                                        fallback=o.fallback, tokenizer_pre=o.tokenizer_pre, device=o.device,
                                        progress=False)
                except (lowbit.LowbitError, FileExistsError) as e:
                    print(f"ERROR {label} {qtype}: {e}", flush=True)
                    self.errors.append(f"{label} {qtype}: export failed ({e})")
                    continue
                seconds.write_text(f"{time.perf_counter() - t0:.1f}\n")
            self.score(label, qtype, path, source=f"lowbit export-gguf --like {like.name}",
                       **({"quant_s": float(seconds.read_text())} if seconds.exists() else {}))

    def run(self) -> int:
        a = self.args
        for name in self.texts:
            (self.work / f"{name}.txt").write_text(load_text(name))
        (self.work / "calib.txt").write_text(load_text("calib"))
        worker = threading.Thread(target=self.perplexity_worker, daemon=True)
        worker.start()
        self.device = default_device()
        self.model, self.tok = lowbit.load(a.model, device="cpu")  # every weight is replaced by a file's
        if str(self.device) == "cpu":
            self.model.float()  # a CPU multiplies float16 many times slower; the files' values are exact in float32
        f16 = self.work / "f16.gguf"
        if not f16.exists():
            lowbit.convert_gguf(a.model, f16, progress=False)  # a float model, no recipe: float16 export
        self.score("F16", "F16", f16, source="lowbit float export")
        imatrix = self.work / "imatrix.gguf"
        imatrix_job = threading.Thread(target=self.make_imatrix, args=(f16, imatrix))
        imatrix_job.start()  # CPU, while the GPU quantizes the types that need no importance matrix
        types = a.types.split(",")
        for qtype in [t for t in types if t.startswith("q") and self.recipes]:  # none: imatrix files alone
            plain = self.llama_quantize(f16, qtype, None)
            self.lowbit_rows(qtype, like=plain)  # Q4_0/Q4_1 type choices do not depend on the imatrix
        imatrix_job.join()
        if not imatrix.exists():
            raise SystemExit(f"llama-imatrix failed: see {self.work / 'imatrix.log'}")
        for qtype in types:
            like = self.llama_quantize(f16, qtype, imatrix)
            if not qtype.startswith("q"):
                self.lowbit_rows(qtype, like=like)
        self.jobs.put(None)
        worker.join()
        print(f"wrote {self.out}" + (f"; {len(self.errors)} errors: {self.errors}" if self.errors else ""))
        return 1 if self.errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", required=True, help="folder with llama-quantize, llama-imatrix, llama-perplexity")
    ap.add_argument("--model", default=None, help="HF model dir or hub id (default: the bundled model)")
    ap.add_argument("--types", default="q4_0,q4_1,iq2_xxs")
    ap.add_argument("--methods", default="rtn,gptq,gptq+fused", help="lowbit's recipes; none: llama.cpp's files only")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--texts", default="eval,factbook",
                    help="held-out texts every file is scored on: eval (SOTU 2000-2021) and factbook (another kind)")
    ap.add_argument("--lowbit-args", default="",
                    help="extra `lowbit export-gguf` options for lowbit's files: calibration (--nsamples, "
                         "--calib-seqlen, --calib-text, --seed, --damp, --blocksize), tuning (--ft-epochs, --ft-lr, "
                         "--ft-batch), --fallback, --tokenizer-pre, --device; e.g. '--nsamples 16'")
    ap.add_argument("--max-windows", type=int, default=None,
                    help="lowbit-protocol windows (default: all; 0: none, stock llama-perplexity alone)")
    ap.add_argument("--llama-ppl-chunks", type=int, default=4,
                    help="llama-perplexity windows (of --ctx tokens) per file on the CPU; 0 skips it, -1: all")
    ap.add_argument("--imatrix-ctx", type=int, default=512, help="llama-imatrix window (llama.cpp's usual 512)")
    ap.add_argument("--imatrix-chunks", type=int, default=128, help="calibration windows for llama-imatrix")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2 - 1),
                    help="CPU threads per llama.cpp tool (imatrix and perplexity may run at the same time)")
    ap.add_argument("--work", default="gguf-bench", help="folder for the GGUF files and logs")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    args = ap.parse_args(argv)
    try:
        bench = Bench(args)  # every --methods recipe is parsed here, before any work
    except lowbit.LowbitError as e:
        ap.error(str(e))
    head = ["file", "type", "MB", "quant s"] + [f"{k} {t}" for t in bench.texts for k in ("ppl", "KL", "llama ppl")]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|", flush=True)
    return bench.run()


if __name__ == "__main__":
    sys.exit(main())
