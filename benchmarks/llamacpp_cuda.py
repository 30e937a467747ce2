"""llama.cpp CUDA on the same GPU as lowbit: its GEMV (``test-backend-ops perf``) and its TG-128 decode
(``llama-bench``) of a random Llama-2-7B-shaped GGUF, built from a llama.cpp source tree on the machine.

    python benchmarks/llamacpp_cuda.py --src LLAMA_CPP_DIR --tag h200            # every step, in order
    python benchmarks/llamacpp_cuda.py --src llama.cpp.tgz --tag h200            # a packed tree (a .tgz)
    python benchmarks/llamacpp_cuda.py --src LLAMA_CPP_DIR --tag h200 --steps build      # one step at a time

A llama.cpp tree: the llama-cpp-python sdist on PyPI vendors one (``pip download llama-cpp-python --no-binary
:all: --no-deps``, then ``vendor/llama.cpp`` of the unpacked archive). Steps (each skips what is already there,
so a run cut short resumes):

* ``build``: CMake with ``-DGGML_CUDA=ON`` for this GPU's architecture, targets test-backend-ops, llama-bench and
  llama-quantize, into ``--build`` (minutes: ggml's CUDA kernels are many; ``--no-flash-attn`` leaves out its
  FlashAttention kernels, about 8 minutes on 10 cores of an H200 machine);
* ``kernels``: ``test-backend-ops perf -o MUL_MAT -b CUDA0`` at the five large Llama shapes of lowbit's
  ``gemv_speed.py`` (4096x4096, 11008x4096, 4096x11008, 14336x4096, 4096x14336; [out, in]) at batch 1 and 8, for
  ``--kernel-types``: µs per call and GB/s as ggml reports them (ggml times its own graph of repeated calls). Its
  perf set has only 4096x14336 (Llama-3-8B down_proj), so ``build`` adds the other four to the perf cases of the
  tree's ``tests/test-backend-ops.cpp`` (:func:`add_perf_shapes`; a tree given as a folder is copied under
  ``--work`` first, so the user's own stays as it was);
* ``models``: a random Llama-2-7B-shaped F16 GGUF (32 layers, 4096 hidden, 11008 MLP, 32000 tokens of a dummy
  SentencePiece vocabulary: llama-bench feeds token ids, not text) and ``llama-quantize`` of it to ``--types``;
* ``decode``: ``llama-bench -p 0 -n 128 -ngl 99`` on each file: tokens per second of TG-128 at batch 1.

lowbit's side is ``benchmarks/gemv_speed.py`` and ``benchmarks/decode.py`` (same shapes, same machine). Writes
``benchmarks/results/llamacpp-<tag>.json``: ``kernels`` rows {type, batch, rows, cols, us, gb_s} and ``decode``
rows {type, tok_s, stddev, size_gb}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from gemv_speed import LARGE as SHAPES  # [out, in]: the five large Llama shapes lowbit's GEMVs are timed at

RESULTS = Path(__file__).parent / "results"
STEPS = ("build", "kernels", "models", "decode")
TARGETS = ("test-backend-ops", "llama-bench", "llama-quantize")
SHAPE = {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000}  # Llama-2-7B
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PERF = re.compile(r"MUL_MAT\((?P<params>[^)]*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run"
                   r"(?:.*?(?P<gbs>[\d.]+) GB/s)?")


def log(msg: str) -> None:
    print(f"[llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> str:
    log(" ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


# ----- build ---------------------------------------------------------------------------------------------------
def cuda_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def source_tree(src: Path, work: Path) -> Path:
    """A copy of the llama.cpp tree under ``work`` that the build may change: ``src`` copied (a folder; without
    its ``.git``, build folders and models) or unpacked (a ``.tgz`` of a ``llama.cpp`` folder)."""
    import shutil
    import tarfile

    dest = work / "src"
    if not (dest / "llama.cpp" / "CMakeLists.txt").exists():
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            def skip(folder: str, names: list[str]) -> set[str]:  # git history, model files, top-level builds
                top = Path(folder) == src
                return {n for n in names if n == ".git" or n.endswith(".gguf")
                        or (top and n.startswith("build") and (src / n).is_dir())}

            shutil.copytree(src, dest / "llama.cpp", dirs_exist_ok=True, ignore=skip)
        else:
            with tarfile.open(src) as tar:
                tar.extractall(dest, filter="data")
    return dest / "llama.cpp"


GGML_PERF_SHAPE = (4096, 14336)  # [out, in]: the one large MUL_MAT shape of ggml's own perf set
# Where the perf set builds that case, the four other shapes go in just before
_PERF_ANCHOR = "    for (int bs : {1, 2, 3, 4, 5, 8, 512}) {\n"
_PERF_MARK = "// lowbit: the other large Llama shapes"
_PERF_BLOCK = """\
    MARK (benchmarks/llamacpp_cuda.py): m = rows out, k = columns in
    for (auto [m, k] : std::vector<std::pair<int64_t, int64_t>>{PAIRS}) {
        for (int bs : {1, 8}) {
            for (ggml_type type_a : all_types) {
                test_cases.emplace_back(new test_mul_mat(type_a, GGML_TYPE_F32, m, bs, k, {1, 1}, {1, 1}));
            }
        }
    }

"""


def add_perf_shapes(src: Path) -> bool:
    """Add MUL_MAT perf cases at :data:`SHAPES` (but 4096x14336, which the perf set has) and batch 1 and 8, every
    type, to ``tests/test-backend-ops.cpp``; True when the file changed. A tree without the anchor line (another
    llama.cpp version) is left as it is, and its perf set gives 4096x14336 alone."""
    path = src / "tests" / "test-backend-ops.cpp"
    text = path.read_text()
    if _PERF_MARK in text:
        return False
    if text.count(_PERF_ANCHOR) != 1:
        log(f"{path}: no single perf MUL_MAT loop to add shapes beside; measuring 4096x14336 only")
        return False
    pairs = ", ".join(f"{{{rows}, {cols}}}" for rows, cols in SHAPES if (rows, cols) != GGML_PERF_SHAPE)
    block = _PERF_BLOCK.replace("MARK", _PERF_MARK).replace("PAIRS", pairs)
    path.write_text(text.replace(_PERF_ANCHOR, block + _PERF_ANCHOR))
    return True


def build(src: Path, build_dir: Path, jobs: int, flash_attn: bool = True) -> Path:
    """``flash_attn=False`` skips ggml's FlashAttention kernels (about half of the CUDA build's compile time);
    llama.cpp then attends without them, which at TG-128's short context costs it little."""
    bin_dir = build_dir / "bin"
    added = add_perf_shapes(src)  # a tree built before the added cases is built again with them
    if not added and all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    run(["cmake", "-S", str(src), "-B", str(build_dir), "-DGGML_CUDA=ON", "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch()}", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         f"-DGGML_CUDA_FA={'ON' if flash_attn else 'OFF'}"])
    run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS])
    return bin_dir


def cmake_option(build_dir: Path, name: str) -> bool | None:
    """A boolean option as the build was configured (its CMakeCache.txt), or None when not recorded there."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(f"{name}:"):
            return line.split("=", 1)[1].strip().upper() in ("ON", "1", "TRUE", "YES")
    return None


# ----- kernels -------------------------------------------------------------------------------------------------
def parse_perf(text: str) -> list[dict]:
    """Rows of ``test-backend-ops perf`` console output: MUL_MAT(type_a=T,...,m=M,n=N,k=K,...): R runs - U us/run."""
    rows = []
    for line in _ANSI.sub("", text).splitlines():
        m = _PERF.search(line)
        if not m:
            continue
        params = dict(kv.split("=", 1) for kv in re.split(r",(?![^\[]*\])", m["params"]) if "=" in kv)
        rows.append({"type": params.get("type_a"), "batch": int(params.get("n", 0)), "rows": int(params.get("m", 0)),
                     "cols": int(params.get("k", 0)), "us": float(m["us"]), "runs": int(m["runs"]),
                     "gb_s": float(m["gbs"]) if m["gbs"] else None})
    return rows


def kernels(bin_dir: Path, types: list[str], batches: list[int], backend: str = "CUDA0") -> list[dict]:
    """MUL_MAT rows at :data:`SHAPES`, one per type, batch and shape (the fastest where the perf set has a case
    twice: its Q4_K mat-vec cases repeat 14336x4096)."""
    ms, ks = ("|".join(sorted({str(s[i]) for s in SHAPES})) for i in (0, 1))
    pattern = f"type_a=({'|'.join(types)}),type_b=f32,m=({ms}),n=({'|'.join(map(str, batches))}),k=({ks}),"
    out = run([str(bin_dir / "test-backend-ops"), "perf", "-o", "MUL_MAT", "-b", backend, "-p", pattern])
    best: dict[tuple, dict] = {}
    for r in parse_perf(out):
        key = (r["type"], r["batch"], r["rows"], r["cols"])
        if (r["rows"], r["cols"]) in SHAPES and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    if not best:
        raise RuntimeError(f"no MUL_MAT rows in test-backend-ops output:\n{out[-2000:]}")
    return list(best.values())


# ----- models --------------------------------------------------------------------------------------------------
def write_random_f16(path: Path, shape: dict[str, int] = SHAPE, seed: int = 0) -> None:
    """A Llama-shaped GGUF with weights ~ N(0, 0.02) in float16 and unit norms, written one tensor at a time."""
    import gguf
    import numpy as np

    h, f, v, n_head = shape["hidden"], shape["intermediate"], shape["vocab"], shape["heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama")
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_block_count(shape["layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(h // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(v)])
    w.add_token_scores([0.0] * v)
    w.add_token_types([gguf.TokenType.NORMAL] * v)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = [("token_embd.weight", (v, h)), ("output_norm.weight", (h,)), ("output.weight", (v, h))]
    for i in range(shape["layers"]):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (h,)), (p + "ffn_norm.weight", (h,))]
        tensors += [(p + n, (h, h)) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")]
        tensors += [(p + "ffn_gate.weight", (f, h)), (p + "ffn_up.weight", (f, h)), (p + "ffn_down.weight", (h, f))]
    for name, dims in tensors:  # the header first (norms float32, matrices float16), then the data
        dtype = np.float32 if len(dims) == 1 else np.float16
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, dims in tensors:
        if len(dims) == 1:
            w.write_tensor_data(np.ones(dims, np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()


def models(bin_dir: Path, work: Path, types: list[str], threads: int) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "random-7b-f16.gguf"
    if not f16.exists():
        tmp = f16.with_suffix(".partial")
        write_random_f16(tmp)
        tmp.rename(f16)
    files = {"f16": f16}
    for t in types:
        out = work / f"random-7b-{t}.gguf"
        if not out.exists():
            tmp = out.with_suffix(".partial")
            run([str(bin_dir / "llama-quantize"), str(f16), str(tmp), t.upper(), str(threads)])
            tmp.rename(out)
        files[t] = out
    return files


# ----- decode --------------------------------------------------------------------------------------------------
def parse_bench(text: str) -> list[dict]:
    """llama-bench ``-o json`` records -> {tok_s, stddev, size_gb, n_gen}."""
    return [{"tok_s": r["avg_ts"], "stddev": r.get("stddev_ts"), "size_gb": r.get("model_size", 0) / 1e9,
             "n_gen": r.get("n_gen"), "n_prompt": r.get("n_prompt")} for r in json.loads(text)]


def decode(bin_dir: Path, files: dict[str, Path], gen: int) -> list[dict]:
    rows = []
    for t, path in files.items():
        out = run([str(bin_dir / "llama-bench"), "-m", str(path), "-p", "0", "-n", str(gen), "-ngl", "99",
                   "-o", "json"])
        rows += [{"type": t} | r for r in parse_bench(out)]
        log(f"{t}: {rows[-1]['tok_s']:.1f} tok/s")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, type=Path, help="llama.cpp source tree, or a .tgz of one")
    ap.add_argument("--build", type=Path, default=None, help="build folder (default: WORK/build-cuda)")
    ap.add_argument("--work", type=Path, default=Path("llamacpp-bench"), help="folder for the GGUF files")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--kernel-types", default="f16,q5_0,q5_K,q4_0,q4_K,q3_K,q2_K,iq2_xxs")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--types", default="q4_0,q4_k_m,q2_k", help="llama-quantize types of the decode files")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--no-flash-attn", action="store_true",
                    help="build without ggml's FlashAttention CUDA kernels (a shorter build)")
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args(argv)
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        ap.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    out = RESULTS / f"llamacpp-{args.tag}.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result["meta"] = {"command": "python " + " ".join(sys.argv), "src": str(args.src), "device": gpu_name()}
    src = source_tree(args.src, args.work) if "build" in steps else args.src
    build_dir = args.build or args.work / "build-cuda"
    bin_dir = build(src, build_dir, args.jobs, not args.no_flash_attn) if "build" in steps else build_dir / "bin"
    result["meta"]["flash_attn_kernels"] = cmake_option(build_dir, "GGML_CUDA_FA")
    if "kernels" in steps:
        result["kernels"] = kernels(bin_dir, args.kernel_types.split(","), [int(b) for b in args.batch.split(",")])
        for r in result["kernels"]:
            print(f"| {r['type']} | {r['batch']} | {r['rows']}x{r['cols']} | {r['us']:.1f} µs |")
    if "models" in steps or "decode" in steps:
        files = models(bin_dir, args.work, args.types.split(","), args.jobs)
        if "decode" in steps:
            result["decode"] = decode(bin_dir, files, args.gen)
            for r in result["decode"]:
                print(f"| {r['type']} | {r['tok_s']:.1f} tok/s | {r['size_gb']:.2f} GB |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
