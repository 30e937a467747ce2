#!/usr/bin/env python3
"""Hostile-input probe: how lowbit's command line and OpenAI-compatible server take what a hostile (or careless)
user throws at them. Reproducible, bounded, loopback only, no model downloads.

    .venv/bin/python benchmarks/bad_input_probe.py --json benchmarks/results/bad-input-probe-after.json
    # another checkout's code with this venv (the lowbit command as a module, that checkout's src first):
    .venv/bin/python benchmarks/bad_input_probe.py --lowbit ".venv/bin/python -m lowbit.cli" \\
        --pythonpath /path/to/checkout/src --json benchmarks/results/bad-input-probe-before.json
    # a subset: --classes server,interrupt   keep the scratch directory: --keep

In a fresh temporary directory it builds (with --python and --pythonpath) a tiny random Llama saved as an HF
directory (its tokenizer trained on the fly), a medium random Llama (~35 MB, almost all of it float16 embeddings,
so the interruption probes' saves take long enough to be caught), and then, with the lowbit command under test, a
tiny q4_0 checkpoint and a GGUF of it. Every probe then runs the lowbit command (or talks HTTP to `lowbit serve`
of the tiny checkpoint on 127.0.0.1 at a free port). It prints one line per probe and a summary; --json writes
{"meta", "summary", "rows": [{class, probe, outcome, ok, detail, expect}]} (ok is null for a skipped probe).

A probe FAILS when (beyond the specific expectation each probe states in its `expect`):
* the CLI exits with anything but 0 or 2 (or with a code the probe does not expect), or prints a Python traceback;
* the server answers 5xx (other than the documented 503 at shutdown), or an error body not in OpenAI's shape
  {"error": {"message", "type", "param", "code"}}, or stops answering /health;
* partial output is left at a destination after a refused/failed command: the destination changed, a half-written
  file or directory, a hidden `.NAME.tmp-*` (or `.NAME.old-*`) beside it, or a `NAME.partial` resume directory;
* the server's resident memory grows by more than 200 MB after refused requests.

Classes:
1. artifacts     damaged model directories, lowbit checkpoints and GGUF files (truncated, random, empty, wrong
                 JSON types, unknown formats, config shapes that disagree with the weights, missing tokenizer)
2. paths         missing paths, a file where a directory is expected, --text / --calib-text that is a directory,
                 binary, non-UTF-8, empty or too short; non-UTF-8 prompt bytes on stdin and in argv
3. destinations  destination exists (with and without --overwrite, file vs directory), parent is a file,
                 read-only destination, full disk (the last two need root: tmpfs mounts; skipped otherwise)
4. interrupt     SIGINT and SIGTERM during `quantize` / `export-gguf`, while loading and while saving
5. server        malformed / non-UTF-8 JSON, wrong types, lone surrogates / NUL / long strings, numbers at and
                 beyond their limits, deep nesting, huge bodies (time and RSS), unknown fields, foreign Host
                 (DNS rebinding) and Origin, queue overflow, disconnect storm, SIGTERM during a stream

Runs in ~4 minutes on an otherwise idle 2-core CPU (the CLI probes run --jobs at a time). Every subprocess and
request has a timeout; the server is killed however the probe ends; tmpfs mounts are unmounted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
REFUSED = frozenset({2})  # bad input: one line on stderr, exit 2 (README)
EITHER = frozenset({0, 2})  # either handled or refused in one line
INTERRUPTED = frozenset({130, 143, 2})  # 128 + SIGINT / SIGTERM, or refused
RSS_LIMIT_MB = 200
HUGE_MB = 20
FAST_S = 3.0  # a huge body must be refused within this many seconds
SHUTDOWN_TIMEOUT = 2  # lowbit serve --shutdown-timeout of the probed server
MAX_QUEUE = 2  # lowbit serve --max-queue (with --max-concurrency 1)
CLASSES = ("artifacts", "paths", "destinations", "interrupt", "server")
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Low-bit quantization stores weights in two, three or four "
    "bits. Perplexity measures how surprised a language model is by held-out text. " * 20
)

# Run with --python (and --pythonpath): writes the tiny and medium models, the tokenizer and a foreign GGUF.
BUILDER = r"""
import json, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work, text = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
bpe = Tokenizer(models.BPE(unk_token=None))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([text] * 4, trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=["<eos>"],
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
eos = tok.eos_token_id


def llama(name, hidden, inter, layers, heads, kv, vocab, ctx, half):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=ctx,
                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # EOS logit 0: greedy decoding of random weights then never stops early
        model.lm_head.weight[eos].zero_()
    if half:
        model = model.half()
    model.save_pretrained(work / name)
    tok.save_pretrained(work / name)


llama("tiny", 64, 128, 2, 4, 2, len(tok), 16384, False)  # long context: a stream that outlasts a shutdown
# medium: ~35 MB, nearly all of it float16 embeddings and output matrix (never quantized), so a save writes
# ~35 MB (milliseconds: long enough to catch) while quantizing its few decoder weights takes well under a second
llama("medium", 256, 512, 2, 4, 2, 32768, 512, True)

import gguf, numpy as np  # a well-formed GGUF of some other model
w = gguf.GGUFWriter(str(work / "other.gguf"), "llama")
w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

import lowbit, transformers
print(json.dumps({"lowbit_module": lowbit.__file__, "lowbit_version": getattr(lowbit, "__version__", None),
                  "torch": torch.__version__, "transformers": transformers.__version__, "vocab": len(tok)}))
"""


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    klass: str
    probe: str
    expect: str
    outcome: str
    ok: bool | None  # None: skipped / inconclusive
    detail: str = ""

    def line(self) -> str:
        mark = "skip" if self.ok is None else ("ok  " if self.ok else "FAIL")
        detail = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in self.detail)  # NULs, surrogates
        detail = detail if len(detail) <= 170 else detail[:167] + "..."
        return f"{mark} {self.klass:<12} {self.probe:<44} {self.outcome}" + (f"  | {detail}" if detail else "")

    def to_json(self) -> dict:
        return {"class": self.klass, "probe": self.probe, "outcome": self.outcome, "ok": self.ok,
                "detail": self.detail, "expect": self.expect}


def exit_code(rc: int) -> int:
    """A shell's view of a return code: death by signal N is 128 + N."""
    return 128 - rc if rc < 0 else rc


def last_line(text: str) -> str:
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    return lines[-1][:200] if lines else ""


def traceback_summary(text: str) -> str:
    """The exception line that ends the last traceback in ``text``."""
    tail = text[text.rfind(TRACEBACK):]
    for line in tail.splitlines()[1:]:
        if line and not line.startswith((" ", "\t", "Traceback")) and not line.startswith("During handling"):
            return line.strip()[:200]
    return last_line(tail)


# ------------------------------------------------------------------------------------------- files on disk


def digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def snapshot(p: Path) -> object:
    """What is at ``p`` (None: nothing), to tell whether a refused command touched it."""
    try:
        if p.is_symlink() or p.is_file():
            return ("file", digest(p))
        if p.is_dir():
            return ("dir", tuple(sorted((str(f.relative_to(p)), digest(f) if f.is_file() else "dir")
                                        for f in p.rglob("*"))))
    except OSError as e:
        return ("unreadable", str(e))
    return None


def leftovers(dest: Path, refused: bool) -> list[str]:
    """Hidden temporaries beside ``dest`` (.NAME.tmp-*, .NAME.old-*), and NAME.partial after a refusal."""
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    left = sorted(n for n in names if n.startswith(f".{dest.name}."))
    if refused and f"{dest.name}.partial" in names:
        left.append(f"{dest.name}.partial")
    return left


def safetensors_problem(f: Path) -> str | None:
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = f.stat().st_size
        return None if size == 8 + n + end else f"{f.name} is {size} bytes, its header says {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{f.name} unreadable ({type(e).__name__})"


def incomplete(dest: Path, kind: str) -> str | None:
    """None when ``dest`` is a complete lowbit checkpoint (kind "dir") or GGUF file (kind "file")."""
    if kind == "file":
        if not dest.is_file():
            return f"{dest.name} is not a file"
        with open(dest, "rb") as f:
            head = f.read(8)
        ok = head[:4] == b"GGUF" and int.from_bytes(head[4:8], "little") in (2, 3)
        return None if ok else f"{dest.name} is not a GGUF file"
    if not dest.is_dir():
        return f"{dest.name} is not a directory"
    try:
        info = json.loads((dest / "lowbit.json").read_text())
        if not isinstance(info, dict) or "formats" not in info:
            return "lowbit.json has no formats"
    except (OSError, ValueError) as e:
        return f"lowbit.json unreadable ({type(e).__name__})"
    for name in ("config.json", "tokenizer.json"):
        if not (dest / name).is_file():
            return f"{name} missing"
    return safetensors_problem(dest / "model.safetensors")


def truncate(f: Path, frac: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * frac)])


def randomize(f: Path) -> None:
    f.write_bytes(random.Random(f.name).randbytes(max(f.stat().st_size, 4096)))


def edit_json(f: Path, fn: Callable[[dict], object]) -> None:
    obj = json.loads(f.read_text())
    new = fn(obj)
    f.write_text(json.dumps(obj if new is None else new))


# ------------------------------------------------------------------------------------------------------- HTTP


@dataclass
class Resp:
    status: int | None
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str | None = None

    def error_obj(self) -> dict | None:
        try:
            obj = json.loads(self.body)
        except ValueError:
            return None
        return obj.get("error") if isinstance(obj, dict) and isinstance(obj.get("error"), dict) else None

    def describe(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        err = self.error_obj()
        return f"{self.status}" + (f" {err.get('code') or err.get('type')}" if err else "")


def request_head(method: str, path: str, host: str, headers: dict[str, str], length: int | None,
                 chunked: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def open_request(port: int, method: str, path: str, body: bytes | None = None, *, host: str | None = None,
                 headers: dict[str, str] | None = None, raw: bytes | None = None, chunked: bool = False,
                 timeout: float = 20.0) -> tuple[socket.socket | None, http.client.HTTPResponse | None, str | None]:
    """Send one request on a fresh connection (a send error still reads the answer); the response after its
    headers, or an error."""
    if headers is None:
        headers = {"Content-Type": "application/json"} if body is not None else {}
    if raw is None:
        raw = request_head(method, path, host or f"127.0.0.1:{port}", headers,
                           None if body is None and method == "GET" else len(body or b""), chunked)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        return None, None, f"connect: {type(e).__name__}"
    send_error = ""
    try:
        sock.sendall(raw)
        if body and chunked:
            for i in range(0, len(body), 1 << 16):
                piece = body[i: i + (1 << 16)]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        elif body:
            sock.sendall(body)
    except OSError as e:
        send_error = f" (sending: {type(e).__name__})"
    try:
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        return sock, resp, None
    except (OSError, http.client.HTTPException) as e:
        sock.close()
        return None, None, f"{type(e).__name__}{send_error}"


def send(port: int, method: str, path: str, body: bytes | None = None, **kw: object) -> Resp:
    t0 = time.monotonic()
    sock, resp, err = open_request(port, method, path, body, **kw)  # type: ignore[arg-type]
    if resp is None or sock is None:
        return Resp(None, {}, b"", time.monotonic() - t0, err)
    with sock:
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            return Resp(resp.status, {}, b"", time.monotonic() - t0, f"reading body: {type(e).__name__}")
    return Resp(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - t0)


def read_events(resp: http.client.HTTPResponse, stop: Callable[[list[str]], bool] | None = None
                ) -> tuple[list[str], str | None]:
    """Server-sent `data:` events until `[DONE]` (error None), the end of the body, or ``stop``."""
    events: list[str] = []
    while True:
        try:
            line = resp.readline()
        except (OSError, http.client.HTTPException) as e:
            return events, f"{type(e).__name__} before data: [DONE]"
        if not line:
            return events, "connection ended before data: [DONE]"
        line = line.strip()
        if line.startswith(b"data:"):
            events.append(line[5:].strip().decode("utf-8", "replace"))
            if events[-1] == "[DONE]":
                return events, None
            if stop and stop(events):
                return events, "stopped"


def shape_problem(body: bytes) -> str | None:
    """None when ``body`` is OpenAI's error shape {"error": {"message", "type", "param", "code"}}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return f"error body is not JSON: {body[:60]!r}"
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return f"error body not in OpenAI's shape: {json.dumps(obj)[:80]}"
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    if missing:
        return f"error body lacks {', '.join(missing)}: {json.dumps(obj)[:80]}"
    if not isinstance(err["message"], str) or not isinstance(err["type"], str):
        return "error message/type are not strings"
    return None


def judge(r: Resp, codes: frozenset[int], shape: bool = True, allow_closed: bool = False) -> list[str]:
    if r.status is None:
        return [] if allow_closed else [f"no answer after {r.seconds:.1f}s ({r.error})"]
    problems = []
    if r.status not in codes:
        problems.append(f"status {r.status}, expected {'/'.join(map(str, sorted(codes)))}")
    if r.status >= 400 and shape:
        bad = shape_problem(r.body)
        if bad:
            problems.append(bad)
    if r.status == 200 and shape:
        try:
            obj = json.loads(r.body)
            if not isinstance(obj, dict) or not ("choices" in obj or "data" in obj):
                problems.append("200 without choices")
        except ValueError:
            problems.append("200 with a body that is not JSON")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()  # allow_nan: NaN / Infinity literals, as a hostile client would send


# ----------------------------------------------------------------------------------------------- CLI probes


@dataclass
class Cli:
    klass: str
    probe: str
    args: list  # str, or bytes for arguments that are not UTF-8
    expect: str
    codes: frozenset[int] = REFUSED
    dest: Path | None = None
    kind: str = "dir"  # what a successful command leaves at dest: "dir" (checkpoint) or "file" (GGUF)
    stdin: bytes = b""
    timeout: float = 180.0
    skip: str | None = None


@dataclass
class Case:
    """One HTTP request to the probed server and what it must answer."""

    probe: str
    expect: str
    codes: frozenset[int]
    body: bytes | Callable[[], bytes] | None = None
    method: str = "POST"
    path: str = "/v1/completions"
    headers: dict[str, str] | None = None
    host: str | None = None
    raw: bytes | None = None
    chunked: bool = False
    timeout: float = 20.0
    max_seconds: float | None = None
    shape: bool = True
    allow_closed: bool = False
    rss: bool = False


class Server:
    def __init__(self, probe: Probe, model: Path) -> None:
        self.probe, self.model = probe, model
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log = probe.work / "serve.log"

    def start(self) -> str | None:
        """Start `lowbit serve` and wait for /health; None when up, else why not."""
        self.port, self.starts = free_port(), self.starts + 1
        cmd = [*self.probe.lowbit, "serve", str(self.model), "--port", str(self.port), "--device", "cpu",
               "--max-concurrency", "1", "--max-queue", str(MAX_QUEUE), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
        with open(self.log, "ab") as log:
            log.write(f"\n=== start {self.starts}: {shlex.join(cmd)}\n".encode())
            self.proc = subprocess.Popen(cmd, cwd=self.probe.work, env=self.probe.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.probe.procs.append(self.proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"lowbit serve exited {exit_code(self.proc.returncode)}: {last_line(self.log_text())}"
            if send(self.port, "GET", "/health", timeout=2).status == 200:
                return None
            time.sleep(0.25)
        return "lowbit serve did not answer /health within 180 s"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self, key: str = "VmRSS") -> float | None:
        """Resident memory of the server process (VmHWM: its peak since ``reset_peak``)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return None

    def reset_peak(self) -> None:
        with contextlib.suppress(OSError, AttributeError), open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def health(self, timeout: float = 5.0) -> tuple[str | None, dict]:
        r = send(self.port, "GET", "/health", timeout=timeout)
        if r.status != 200:
            alive = self.proc is not None and self.proc.poll() is None
            return f"/health: {r.describe()}{'' if alive else ' (server process gone)'}", {}
        try:
            return None, json.loads(r.body)
        except ValueError:
            return "/health answered non-JSON", {}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


# --------------------------------------------------------------------------------------------------- the probe


class Probe:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.lowbit = shlex.split(a.lowbit)
        if shutil.which(self.lowbit[0]) is None and a.lowbit == "lowbit":
            self.lowbit = [str(Path(sys.executable).with_name("lowbit"))]
        if "/" in self.lowbit[0]:  # every command runs in the scratch directory
            self.lowbit[0] = os.path.abspath(self.lowbit[0])
        self.python = os.path.abspath(a.python) if "/" in a.python else a.python
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        if a.pythonpath is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(x) for x in a.pythonpath.split(os.pathsep) if x)
        self.work = Path(a.work or tempfile.mkdtemp(prefix="lowbit-probe-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []
        self.meta: dict = {}
        self.lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- bookkeeping

    def add(self, row: Row) -> Row:
        with self.lock:
            self.rows.append(row)
            print(row.line(), flush=True)
        return row

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        for m in reversed(self.mounts):
            if subprocess.run(["umount", str(m)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
        if not self.a.keep and not self.a.work:
            shutil.rmtree(self.work, ignore_errors=True)

    def run(self, args: list, *, stdin: bytes = b"", timeout: float = 180.0) -> tuple[int | None, str, str, float]:
        t0 = time.monotonic()
        try:
            p = subprocess.run([*self.lowbit, *args], cwd=self.work, env=self.env, input=stdin, capture_output=True,
                               timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = None, e.stdout or b"", e.stderr or b""
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - t0

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        w = self.work
        (w / "text.txt").write_text(SAMPLE_TEXT * 3)
        print(f"building tiny models in {w} ...", flush=True)
        b = subprocess.run([self.python, "-c", BUILDER, str(w), str(w / "text.txt")], cwd=w, env=self.env,
                           capture_output=True, timeout=300)
        if b.returncode:
            raise SystemExit(f"building the tiny models failed:\n{b.stderr.decode(errors='replace')[-3000:]}")
        self.meta.update(json.loads(b.stdout.decode().strip().splitlines()[-1]))
        self.tiny, self.medium, self.other_gguf = w / "tiny", w / "medium", w / "other.gguf"
        self.q, self.gguf = w / "tiny-q4_0", w / "tiny.gguf"
        for args in (["quantize", str(self.tiny), "-f", "q4_0", "-o", str(self.q), "--no-progress", "--device", "cpu"],
                     ["export-gguf", str(self.q), "-o", str(self.gguf), "--no-progress", "--device", "cpu"]):
            rc, out, err, dt = self.run(args)
            if rc != 0:
                raise SystemExit(f"setup command failed (exit {rc}): {shlex.join(self.lowbit + args)}\n{err[-3000:]}")
            self.meta.setdefault("setup_seconds", {})[args[0]] = round(dt, 1)
        print(f"lowbit module: {self.meta.get('lowbit_module')}; tiny quantize took "
              f"{self.meta['setup_seconds']['quantize']} s", flush=True)

    def mount(self, path: Path, opts: str) -> str | None:
        """Mount a tmpfs at ``path``; None when mounted, else why not."""
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "needs root (a tmpfs mount)"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "lowbit-probe", str(path)], capture_output=True,
                           timeout=20)
        if r.returncode:
            return f"mount failed: {r.stderr.decode(errors='replace').strip()[:100]}"
        self.mounts.append(path)
        return None

    # -------------------------------------------------------------------------------------------- CLI probes

    def judge_cli(self, c: Cli, rc: int | None, out: str, err: str, dt: float, before: object) -> Row:
        problems = []
        code = None if rc is None else exit_code(rc)
        text = out + "\n" + err
        if code is None:
            problems.append(f"still running after {c.timeout:.0f} s (killed)")
        elif code not in c.codes:
            problems.append(f"exit {code}, expected {'/'.join(map(str, sorted(c.codes)))}")
        if TRACEBACK in text:
            problems.append(f"traceback: {traceback_summary(text)}")
        if c.dest is not None:
            refused = code != 0
            left = leftovers(c.dest, refused)
            if left:
                problems.append(f"left behind {', '.join(left[:3])}")
            if refused:
                after = snapshot(c.dest)
                if after != before:
                    problems.append("destination " + ("created" if before is None else "changed") +
                                    " by a command that failed")
            else:
                bad = incomplete(c.dest, c.kind)
                if bad:
                    problems.append(f"exit 0 but the output is incomplete: {bad}")
        outcome = "timeout" if code is None else f"exit {code}" + (" + traceback" if TRACEBACK in text else "")
        msg = traceback_summary(text) if TRACEBACK in text else last_line(err)
        detail = "; ".join([*problems, f"{dt:.1f}s", f"stderr: {msg}" if msg else "no stderr"])
        return Row(c.klass, c.probe, c.expect, outcome, not problems, detail)

    def run_cli(self, c: Cli) -> Row:
        if c.skip:
            return Row(c.klass, c.probe, c.expect, f"skipped: {c.skip}", None, "")
        before = snapshot(c.dest) if c.dest is not None else None
        rc, out, err, dt = self.run(c.args, stdin=c.stdin, timeout=c.timeout)
        return self.judge_cli(c, rc, out, err, dt, before)

    def damaged(self, src: Path, name: str, damage: Callable[[Path], None]) -> Path:
        d = self.work / "damaged" / name
        shutil.copytree(src, d)
        damage(d)
        return d

    def gen(self, model: Path | str) -> list:
        return ["generate", str(model), "-p", "hello", "--max-new-tokens", "2", "--temperature", "0",
                "--device", "cpu"]

    def quant(self, model: Path | str, out: Path, *extra: str) -> list:
        return ["quantize", str(model), "-f", "q4_0", "-o", str(out), "--no-progress", "--device", "cpu", *extra]

    def export(self, model: Path | str, out: Path, *extra: str) -> list:
        return ["export-gguf", str(model), "-o", str(out), "--no-progress", "--device", "cpu", *extra]

    def artifact_probes(self) -> list[Cli]:
        k, out = "artifacts", self.work / "out-artifacts"
        out.mkdir()
        refuse = "refused in one line, exit 2"
        st, cj, lj = "model.safetensors", "config.json", "lowbit.json"
        probes: list[Cli] = []

        def add(name: str, d: Path, cmds: tuple[str, ...], what: str) -> None:
            for cmd in cmds:
                if cmd == "generate":
                    probes.append(Cli(k, f"{name}/generate", self.gen(d), f"{what}: {refuse}"))
                elif cmd == "info":
                    probes.append(Cli(k, f"{name}/info", ["info", str(d)], f"{what}: {refuse}"))
                elif cmd == "quantize":
                    dest = out / f"{name}-q"
                    probes.append(Cli(k, f"{name}/quantize", self.quant(d, dest), f"{what}: {refuse}, nothing at -o",
                                      dest=dest))
                else:
                    dest = out / f"{name}.gguf"
                    probes.append(Cli(k, f"{name}/export-gguf", self.export(d, dest),
                                      f"{what}: {refuse}, nothing at -o", dest=dest, kind="file"))

        def wipe_tok(d: Path) -> None:
            for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (d / n).unlink(missing_ok=True)

        t, q = self.tiny, self.q
        add("f-weights-truncated", self.damaged(t, "f-wt", lambda d: truncate(d / st)), ("generate", "quantize"),
            "float model.safetensors cut in half")
        add("f-weights-random", self.damaged(t, "f-wr", lambda d: randomize(d / st)), ("generate",),
            "float model.safetensors of random bytes")
        add("f-weights-empty", self.damaged(t, "f-we", lambda d: (d / st).write_bytes(b"")), ("generate",),
            "float model.safetensors empty")
        add("f-config-truncated", self.damaged(t, "f-ct", lambda d: truncate(d / cj)), ("generate",),
            "config.json cut in half")
        add("f-config-wrong-types", self.damaged(t, "f-cw", lambda d: edit_json(
            d / cj, lambda o: o.update(num_hidden_layers="two", hidden_size=[64]))), ("generate",),
            "config.json with a string / list where numbers belong")
        add("f-config-hidden-mismatch", self.damaged(t, "f-ch", lambda d: edit_json(
            d / cj, lambda o: o.update(hidden_size=128))), ("generate",), "config.json hidden_size 128, weights 64")
        add("f-config-more-layers", self.damaged(t, "f-cl", lambda d: edit_json(
            d / cj, lambda o: o.update(num_hidden_layers=3))), ("generate",),
            "config.json says 3 layers, weights hold 2 (no random-initialized layer may slip in)")
        add("f-tokenizer-missing", self.damaged(t, "f-tm", wipe_tok), ("generate", "quantize"),
            "tokenizer files missing")
        add("q-weights-truncated", self.damaged(q, "q-wt", lambda d: truncate(d / st)), ("generate", "export-gguf"),
            "checkpoint model.safetensors cut in half")
        add("q-weights-random", self.damaged(q, "q-wr", lambda d: randomize(d / st)), ("generate",),
            "checkpoint model.safetensors of random bytes")
        add("q-weights-missing", self.damaged(q, "q-wm", lambda d: (d / st).unlink()), ("info", "generate"),
            "checkpoint without model.safetensors")
        add("q-lowbit-json-truncated", self.damaged(q, "q-lt", lambda d: truncate(d / lj)), ("info", "generate"),
            "lowbit.json cut in half")
        add("q-lowbit-json-wrong-types", self.damaged(q, "q-lw", lambda d: edit_json(
            d / lj, lambda o: o.update(checkpoint_version="1", formats=sorted(o["formats"])))), ("info", "generate"),
            "lowbit.json with a string version and a list of formats")
        add("q-lowbit-json-unknown-format", self.damaged(q, "q-lu", lambda d: edit_json(
            d / lj, lambda o: o.update(formats=dict.fromkeys(o["formats"], "q9_9")))), ("generate",),
            "lowbit.json naming format q9_9")
        add("q-lowbit-json-format-mismatch", self.damaged(q, "q-lm", lambda d: edit_json(
            d / lj, lambda o: o.update(formats=dict.fromkeys(o["formats"], "q8_0")))), ("generate", "export-gguf"),
            "lowbit.json says q8_0, tensors are q4_0")
        add("q-config-shape-mismatch", self.damaged(q, "q-cs", lambda d: edit_json(
            d / cj, lambda o: o.update(intermediate_size=256))), ("generate",),
            "config.json intermediate_size 256, packed tensors 128")
        add("q-tokenizer-missing", self.damaged(q, "q-tm", wipe_tok), ("generate",), "checkpoint tokenizer missing")
        # --like FILE.gguf that is not a usable GGUF of this model
        g = self.work / "gguf"
        g.mkdir()
        (g / "truncated.gguf").write_bytes(self.gguf.read_bytes()[: self.gguf.stat().st_size * 6 // 10])
        (g / "text.gguf").write_text("this is not a GGUF file\n" * 100)
        (g / "empty.gguf").write_bytes(b"")
        for name, like, what in (("truncated", g / "truncated.gguf", "a GGUF cut at 60%"),
                                 ("not-gguf", g / "text.gguf", "a text file"),
                                 ("empty", g / "empty.gguf", "an empty file"),
                                 ("other-model", self.other_gguf, "a valid GGUF of another model")):
            dest = out / f"like-{name}.gguf"
            probes.append(Cli(k, f"like-{name}/export-gguf", self.export(t, dest, "--like", str(like)),
                              f"--like {what}: {refuse}, nothing at -o", dest=dest, kind="file"))
        return probes

    def path_probes(self) -> list[Cli]:
        k, w, t = "paths", self.work, self.tiny
        p = w / "paths"
        p.mkdir()
        (p / "a-file").write_text("not a model\n")
        (p / "a-dir").mkdir()
        (p / "binary.bin").write_bytes(random.Random(1).randbytes(65536))
        (p / "latin1.txt").write_bytes(("Caf\xe9 cr\xe8me br\xfbl\xe9e. " * 200).encode("latin-1"))
        (p / "empty.txt").write_bytes(b"")
        (p / "short.txt").write_text("hi")
        refuse = "refused in one line, exit 2"
        probes = [
            Cli(k, "missing-dir/generate", self.gen("./no-such-model"), f"missing model directory: {refuse}"),
            Cli(k, "missing-hub-id/generate", self.gen("no-such-org/no-such-model"),
                f"hub id absent from the local cache: {refuse} (no download)"),
            Cli(k, "file-as-model/quantize", self.quant(p / "a-file", p / "out-file-as-model"),
                f"a file where a model directory belongs: {refuse}, nothing at -o", dest=p / "out-file-as-model"),
            Cli(k, "missing-path/info", ["info", "./no-such-checkpoint"], f"missing path: {refuse}"),
            Cli(k, "file-as-checkpoint/info", ["info", str(p / "a-file")], f"a file, not a checkpoint: {refuse}"),
            Cli(k, "float-dir/info", ["info", str(t)], f"a float model, not a lowbit checkpoint: {refuse}"),
        ]
        texts = (("missing", "./no-such-text.txt"), ("directory", str(p / "a-dir")),
                 ("binary", str(p / "binary.bin")), ("non-utf8", str(p / "latin1.txt")),
                 ("empty", str(p / "empty.txt")), ("too-short", str(p / "short.txt")))
        for name, f in texts:
            probes.append(Cli(k, f"eval-text-{name}/eval",
                              ["eval", str(t), "--text", f, "--seqlen", "32", "--max-windows", "1", "--no-progress",
                               "--device", "cpu"], f"--text {name}: {refuse} (too short: no window to score)"))
        for name, f in texts[1:]:
            if name == "binary":
                continue
            dest = p / f"out-calib-{name}"
            codes = EITHER if name == "too-short" else REFUSED
            expect = ("--calib-text of 1 token: refused in one line (exit 2) or calibrated on what there is (0)"
                      if name == "too-short" else f"--calib-text {name}: {refuse}, nothing at -o (nor -o.partial)")
            probes.append(Cli(k, f"calib-text-{name}/quantize",
                              self.quant(t, dest, "--method", "gptq", "--nsamples", "2", "--calib-seqlen", "32",
                                         "--calib-text", f), expect, codes=codes, dest=dest))
        probes += [
            Cli(k, "stdin-non-utf8/generate", ["generate", str(t), "-p", "-", "--max-new-tokens", "2",
                                               "--temperature", "0", "--device", "cpu"],
                "prompt bytes on stdin that are not UTF-8: generated from (0) or refused in one line (2)",
                codes=EITHER, stdin=b"caf\xe9 \xff\xfe\x80 hello"),
            Cli(k, "argv-non-utf8/generate", ["generate", str(t), "-p", b"caf\xe9 \xff hello", "--max-new-tokens",
                                              "2", "--temperature", "0", "--device", "cpu"],
                "a --prompt argument that is not UTF-8: generated from (0) or refused in one line (2)", codes=EITHER),
            Cli(k, "like-missing/export-gguf", self.export(t, p / "like-missing.gguf", "--like", "./no-such.gguf"),
                f"--like path missing: {refuse}, nothing at -o", dest=p / "like-missing.gguf", kind="file"),
            Cli(k, "like-directory/export-gguf", self.export(t, p / "like-dir.gguf", "--like", str(p / "a-dir")),
                f"--like a directory: {refuse}, nothing at -o", dest=p / "like-dir.gguf", kind="file"),
        ]
        return probes

    def destination_probes(self) -> list[Cli]:
        k, d = "destinations", self.work / "dest"
        d.mkdir()
        (d / "existing-dir").mkdir()
        (d / "existing-dir" / "keep.txt").write_text("precious\n")
        (d / "existing.gguf").write_bytes(b"precious, not a GGUF\n")
        (d / "existing-file").write_text("precious\n")
        (d / "existing-dir.gguf").mkdir()
        (d / "existing-dir.gguf" / "keep.txt").write_text("precious\n")
        (d / "a-file").write_text("a file, not a directory\n")
        probes = [
            Cli(k, "exists-no-overwrite/quantize", self.quant(self.tiny, d / "existing-dir"),
                "-o exists, no --overwrite: refused (2) before any work, destination untouched",
                dest=d / "existing-dir"),
            Cli(k, "exists-no-overwrite/export-gguf", self.export(self.q, d / "existing.gguf"),
                "-o exists, no --overwrite: refused (2), file untouched", dest=d / "existing.gguf", kind="file"),
            Cli(k, "file-replaced-by-dir/quantize", self.quant(self.tiny, d / "existing-file", "--overwrite"),
                "-o is a file, --overwrite: refused (2, file untouched) or replaced by a complete checkpoint (0) "
                "with no hidden .NAME.* left", codes=EITHER, dest=d / "existing-file"),
            Cli(k, "dir-replaced-by-file/export-gguf", self.export(self.q, d / "existing-dir.gguf", "--overwrite"),
                "-o is a directory, --overwrite: refused (2), directory untouched, nothing hidden left",
                dest=d / "existing-dir.gguf", kind="file"),
            Cli(k, "parent-is-file/quantize", self.quant(self.tiny, d / "a-file" / "out"),
                "-o under a file: refused (2), nothing written", dest=d / "a-file" / "out"),
            Cli(k, "parent-is-file/export-gguf", self.export(self.q, d / "a-file" / "out.gguf"),
                "-o under a file: refused (2), nothing written", dest=d / "a-file" / "out.gguf", kind="file"),
        ]
        ro = d / "read-only"
        why = self.mount(ro, "ro,size=1m")
        if why and os.geteuid() != 0:
            ro.chmod(0o555)  # without root, permissions suffice
            why = None
        for cmd, dest, args in (("quantize", ro / "out", self.quant(self.tiny, ro / "out")),
                                ("export-gguf", ro / "out.gguf", self.export(self.q, ro / "out.gguf"))):
            probes.append(Cli(k, f"read-only/{cmd}", args, "destination directory read-only: refused in one line "
                              "(2), nothing written", dest=dest, kind="file" if cmd != "quantize" else "dir", skip=why))
        full = d / "full"
        why = self.mount(full, "size=32k")
        for cmd, dest, args in (("quantize", full / "out", self.quant(self.tiny, full / "out")),
                                ("export-gguf", full / "out.gguf", self.export(self.q, full / "out.gguf"))):
            probes.append(Cli(k, f"disk-full/{cmd}", args, "no space left (32 KB tmpfs): refused in one line (2), "
                              "no half-written output or temporary left", dest=dest,
                              kind="file" if cmd != "quantize" else "dir", skip=why))
        self.meta["mounts"] = "tmpfs mounts used" if self.mounts else f"no tmpfs mounts ({why})"
        return probes

    def run_cli_classes(self, classes: list[str]) -> None:
        makers = {"artifacts": self.artifact_probes, "paths": self.path_probes,
                  "destinations": self.destination_probes}
        probes = [c for name in classes if name in makers for c in makers[name]()]
        with ThreadPoolExecutor(max_workers=max(1, self.a.jobs)) as pool:
            futures = [pool.submit(self.run_cli, c) for c in probes]
            for f in futures:
                self.add(f.result())

    # ----------------------------------------------------------------------------------------- interruption

    def interrupt_probes(self) -> None:
        k = "interrupt"
        base = self.work / "interrupt"
        base.mkdir()
        src_weights = os.path.realpath(self.medium / "model.safetensors")
        for cmd in ("quantize", "export-gguf"):
            def args(dest: Path, *extra: str, cmd: str = cmd) -> list:
                if cmd == "quantize":
                    return self.quant(self.medium, dest, *extra)
                return self.export(self.medium, dest, "-f", "q4_0", *extra)

            suffix = ".gguf" if cmd == "export-gguf" else ""
            kind = "file" if suffix else "dir"
            dest = base / f"{cmd}-baseline{suffix}"
            rc, out, err, dt = self.run(args(dest))
            c = Cli(k, f"baseline/{cmd}", args(dest), "the medium model (~35 MB) converts: exit 0, complete output",
                    codes=frozenset({0}), dest=dest, kind=kind)
            row = self.add(self.judge_cli(c, rc, out, err, dt, None))
            if not row.ok:
                continue
            for sig in (signal.SIGINT, signal.SIGTERM):
                for phase in ("load", "save"):
                    self.add(self.interrupt_one(cmd, args, base / f"{cmd}-{sig.name}-{phase}{suffix}", kind, sig,
                                                phase, dt, src_weights))

    def interrupt_one(self, cmd: str, args: Callable[..., list], dest: Path, kind: str, sig: signal.Signals,
                      phase: str, base_seconds: float, src_weights: str) -> Row:
        k, probe = "interrupt", f"{sig.name}-while-{'loading' if phase == 'load' else 'saving'}/{cmd}"
        when = "while the source weights are read" if phase == "load" else "once the temporary output exists"
        expect = (f"{sig.name} {when}: exit 130/143/2 without a traceback, no .NAME.tmp-* left (now or after the "
                  "next run), destination absent or complete; the next run (--overwrite) succeeds (run after a save "
                  "was interrupted, or when anything was left)")
        deadline_s = max(30.0, 4 * base_seconds)
        attempt = 0
        for attempt in range(1, 4):  # noqa: B007 - reported in the detail
            if dest.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest.unlink(missing_ok=True)
            log_out, log_err = self.work / "int.out", self.work / "int.err"
            with open(log_out, "wb") as fo, open(log_err, "wb") as fe:
                proc = subprocess.Popen([*self.lowbit, *args(dest)], cwd=self.work, env=self.env, stdout=fo,
                                        stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            t0, sent_at, by_time = time.monotonic(), None, False
            maps, prefix = Path(f"/proc/{proc.pid}/maps"), f".{dest.name}.tmp-"
            while proc.poll() is None and time.monotonic() - t0 < deadline_s:
                if phase == "load":
                    if time.monotonic() - t0 > 0.6 * base_seconds:  # never saw the mapping: send by the clock
                        by_time = True
                        break
                    with contextlib.suppress(OSError):
                        if src_weights in maps.read_text():
                            break
                    time.sleep(0.01)
                else:
                    with contextlib.suppress(OSError):
                        if any(n.startswith(prefix) for n in os.listdir(dest.parent)):
                            break
                    time.sleep(0.001)
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, sig)
                sent_at = time.monotonic() - t0
            try:
                proc.wait(30)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                killed = True
            if sent_at is not None:
                break
        else:
            return Row(k, probe, expect, "inconclusive: finished before the signal could be sent", None,
                       f"3 attempts; the baseline run took {base_seconds:.1f}s")
        out, err = log_out.read_text(errors="replace"), log_err.read_text(errors="replace")
        code, problems = exit_code(proc.returncode), []
        if killed:
            problems.append(f"still running 30 s after {sig.name} (killed)")
        elif code not in INTERRUPTED and not (code == 0 and not incomplete(dest, kind)):
            problems.append(f"exit {code}, expected 130/143/2")
        if TRACEBACK in out + err:
            problems.append(f"traceback: {traceback_summary(out + err)}")
        left = leftovers(dest, refused=False)
        if left:
            problems.append(f"left behind {', '.join(left[:3])}")
        if dest.exists() and incomplete(dest, kind):
            problems.append(f"half-written destination: {incomplete(dest, kind)}")
        outcome = f"exit {code}" + (" + traceback" if TRACEBACK in out + err else "") + (
            " (finished despite the signal)" if code == 0 else "")
        # the next run, as a user would retry it (after a load-phase signal with nothing written it would only
        # repeat the baseline)
        next_note = "no next run: nothing was written"
        if phase == "save" or left or dest.exists():
            rc2, out2, err2, dt2 = self.run(args(dest, "--overwrite"))
            left2 = leftovers(dest, refused=False)
            if exit_code(rc2 if rc2 is not None else -9) != 0:
                why = traceback_summary(out2 + err2) if TRACEBACK in out2 + err2 else last_line(err2)
                problems.append(f"next run: exit {rc2}: {why}")
            elif incomplete(dest, kind):
                problems.append(f"next run: output incomplete ({incomplete(dest, kind)})")
            if left2:
                problems.append(f"after the next run still left: {', '.join(left2[:3])}")
            next_note = f"next run {dt2:.1f}s"
        msg = traceback_summary(out + err) if TRACEBACK in out + err else last_line(err)
        sent = f"signal at {sent_at:.2f}s{' (by the clock)' if by_time else ''} (attempt {attempt})"
        detail = "; ".join([*problems, sent, f"stderr: {msg}" if msg else "no stderr", next_note])
        return Row(k, probe, expect, outcome, not problems, detail)

    # ------------------------------------------------------------------------------------------- server

    def server_cases(self) -> list[Case]:
        ok, bad, ok_or_bad = frozenset({200}), frozenset({400}), frozenset({200, 400})
        small = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        refuse = "400 in OpenAI's shape"
        cases = [
            Case("baseline/completion", "a plain 2-token completion: 200", ok, j(small)),
            Case("baseline/chat", "a plain 2-token chat completion: 200", ok, j(chat), path="/v1/chat/completions"),
            # bodies
            Case("json-malformed", f"truncated JSON: {refuse}", bad, b'{"prompt": "hi", "max_tokens": 2'),
            Case("json-empty-body", f"empty body: {refuse}", bad, b""),
            Case("json-array-body", f"a JSON array, not an object: {refuse}", bad, b"[1, 2, 3]"),
            Case("json-non-utf8", f"body with bytes that are not UTF-8: {refuse}", bad,
                 b'{"prompt": "caf\xe9 \xff\xfe", "max_tokens": 2}'),
            # wrong types
            Case("type-prompt-number", f"prompt 123: {refuse}", bad, j({**small, "prompt": 123})),
            Case("type-prompt-object", f"prompt an object: {refuse}", bad, j({**small, "prompt": {"a": 1}})),
            Case("type-prompt-ids-out-of-vocab", f"prompt token ids outside the vocabulary: {refuse}", bad,
                 j({**small, "prompt": [999999999, -1]})),
            Case("type-messages-string", f"messages a string: {refuse}", bad, j({**chat, "messages": "hi"}),
                 path="/v1/chat/completions"),
            Case("type-role-unknown", f"role 'wizard': {refuse}", bad,
                 j({**chat, "messages": [{"role": "wizard", "content": "hi"}]}), path="/v1/chat/completions"),
            Case("type-stop-number", f"stop 5: {refuse}", bad, j({**small, "stop": 5})),
            # strings
            Case("string-lone-surrogate-prompt", "prompt with a lone surrogate \\ud800: 200 or 400, never 5xx",
                 ok_or_bad, b'{"prompt": "a\\ud800b", "max_tokens": 2, "temperature": 0}'),
            Case("string-lone-surrogate-chat", "chat content with a lone surrogate \\udfff: 200 or 400, never 5xx",
                 ok_or_bad, b'{"messages": [{"role": "user", "content": "x\\udfffy"}], "max_tokens": 2}',
                 path="/v1/chat/completions"),
            Case("string-nul-prompt", "prompt with NUL characters: 200 or 400, never 5xx", ok_or_bad,
                 j({**small, "prompt": "a\x00b\x00"})),
            Case("string-nul-model", "model name with NUL: 404 (unknown model) or 400", frozenset({400, 404}),
                 j({**small, "model": "tiny\x00evil"})),
            Case("string-1mb-prompt", "1 MB prompt: refused within 3 s (400 context_length_exceeded, or 413)",
                 frozenset({400, 413}),
                 lambda: j({**small, "prompt": "hello world " * 90_000}), max_seconds=FAST_S),
            # nesting
            Case("nested-deep-array", f"prompt nested 100000 arrays deep: {refuse}", bad,
                 b'{"max_tokens": 2, "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            Case("nested-deep-object", f"an unknown field nested 100000 objects deep: {refuse} (or 200), never 5xx",
                 ok_or_bad, b'{"prompt": "hi", "max_tokens": 2, "metadata": ' + b'{"a": ' * 100_000 + b"1" +
                 b"}" * 100_000 + b"}"),
            Case("nested-10000-stops", f"10000 stop strings: {refuse}", bad, j({**small, "stop": ["x"] * 10_000})),
            # unknown fields
            Case("unknown-field", "an unknown field (documented: ignored): 200", ok,
                 j({**small, "frobnicate": {"x": [1, 2]}, "user": "u"})),
            Case("unsupported-logit-bias", f"logit_bias (would change the output; unsupported): {refuse}", bad,
                 j({**small, "logit_bias": {"5": 100}})),
            Case("unsupported-best-of", f"best_of 3 (unsupported): {refuse}", bad, j({**small, "best_of": 3})),
            # Host / Origin
            Case("host-foreign-get", "Host: evil.example (DNS rebinding): refused 4xx (400/403/421) in OpenAI's "
                 "shape", frozenset({400, 403, 421}), None, method="GET", path="/v1/models", host="evil.example"),
            Case("host-foreign-post", "Host: attacker.example:PORT on a completion: refused 4xx, no generation",
                 frozenset({400, 403, 421}), j(small), host="attacker.example:{port}"),
            Case("host-localhost", "Host: localhost:PORT (loopback name): 200", ok, None, method="GET",
                 path="/v1/models", host="localhost:{port}"),
            Case("origin-cross-site", "cross-site simple POST (text/plain, Origin http://evil.example): refused "
                 "4xx, no generation", frozenset({400, 403}), j(small),
                 headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}),
            # HTTP
            Case("http-get-on-post-route", "GET /v1/completions: 405 in OpenAI's shape", frozenset({405}), None,
                 method="GET"),
            Case("http-garbage-request", "bytes that are not HTTP: 400 or the connection closed (the HTTP layer "
                 "answers, no shape required); server unaffected", frozenset({400}), None,
                 raw=b"\x16\x03\x01\x02\x00\x01 NOT HTTP\r\n\r\n", shape=False, allow_closed=True, timeout=5),
            Case("http-content-length-10gb", "Content-Length: 10 GB with no body: refused (413) within 3 s, "
                 "without waiting for the body", frozenset({413}), None,
                 raw=b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n", timeout=8, max_seconds=FAST_S),
        ]
        # numbers at and beyond their limits
        values = (("inf", float("inf")), ("nan", float("nan")), ("1e308", 1e308), ("-1", -1), ("2**63", 2**63))
        base = {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "seed": 0}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs"):
            for label, v in values:
                codes, why = bad, "refused: not finite, out of range or unsupported"
                if name == "top_k" and label in ("1e308", "2**63"):
                    codes, why = ok_or_bad, "no filtering (k above the vocabulary) or refused"
                if name == "seed" and label in ("1e308", "2**63", "-1"):
                    codes, why = ok_or_bad, "a seed folded to 64 bits, or refused"
                allowed = "/".join(map(str, sorted(codes)))
                cases.append(Case(f"number-{name}={label}", f"{name}={label}: {why} ({allowed}, never 5xx)", codes,
                                  j({**base, name: v})))
        # huge bodies: refused fast, without memory growth
        big = "hello world " * (HUGE_MB * (1 << 20) // 12)
        huge = "refused (413, or 400 in OpenAI's shape) within 3 s; server RSS grows < 200 MB"
        cases += [
            Case(f"huge-{HUGE_MB}mb-prompt", f"{HUGE_MB} MB prompt: {huge}", frozenset({400, 413}),
                 lambda: j({"prompt": big, "max_tokens": 2}), timeout=120, max_seconds=FAST_S, rss=True),
            Case(f"huge-{HUGE_MB}mb-chat", f"{HUGE_MB} MB chat message: {huge}", frozenset({400, 413}),
                 lambda: j({"messages": [{"role": "user", "content": big}], "max_tokens": 2}),
                 path="/v1/chat/completions", timeout=120, max_seconds=FAST_S, rss=True),
            Case(f"huge-{HUGE_MB}mb-chunked", f"{HUGE_MB} MB prompt sent chunked (no Content-Length): {huge}",
                 frozenset({400, 413}), lambda: j({"prompt": big, "max_tokens": 2}), chunked=True, timeout=120,
                 max_seconds=FAST_S, rss=True),
            Case("huge-2m-token-ids", f"a prompt of 2,000,000 token ids: {huge}", frozenset({400, 413}),
                 lambda: j({"prompt": [5] * 2_000_000, "max_tokens": 2}), timeout=120, max_seconds=FAST_S, rss=True),
        ]
        return cases

    def run_case(self, srv: Server, c: Case) -> Row:
        body = c.body() if callable(c.body) else c.body
        host = c.host.replace("{port}", str(srv.port)) if c.host else None
        rss0 = srv.rss_mb() if c.rss else None
        if c.rss:
            srv.reset_peak()
        raw = c.raw.replace(b"{port}", str(srv.port).encode()) if c.raw else None
        r = send(srv.port, c.method, c.path, body, host=host, headers=c.headers, raw=raw, chunked=c.chunked,
                 timeout=c.timeout)
        del body
        problems = judge(r, c.codes, shape=c.shape, allow_closed=c.allow_closed)
        if c.max_seconds and r.seconds > c.max_seconds:
            problems.append(f"took {r.seconds:.1f}s (limit {c.max_seconds:.0f}s)")
        notes = [f"{r.seconds:.2f}s"]
        if c.rss:
            rss, peak = srv.rss_mb(), srv.rss_mb("VmHWM")
            if rss is not None and rss0 is not None:
                notes.append(f"RSS {rss0:.0f} -> {rss:.0f} MB (peak {peak or 0:.0f})")
                if rss - rss0 > RSS_LIMIT_MB:
                    problems.append(f"server RSS grew {rss - rss0:.0f} MB (limit {RSS_LIMIT_MB})")
        if c.probe.startswith("number-") and r.status == 200:
            notes.append("accepted")
        err = r.error_obj()
        if err:
            notes.append(f"message: {str(err.get('message'))[:100]}")
        elif r.status is not None and r.status >= 400:
            notes.append(f"body: {r.body[:80]!r}")
        problems += self.after_request(srv)
        return Row("server", c.probe, c.expect, r.describe(), not problems, "; ".join([*problems, *notes]))

    def after_request(self, srv: Server) -> list[str]:
        """/health must still answer; a dead or deaf server is restarted for the next probes."""
        bad, _ = srv.health()
        if not bad:
            return []
        srv.stop()
        again = srv.start()
        return [f"server stopped answering {bad}" + ("; restarted" if again is None else f"; restart failed: {again}")]

    def queue_overflow(self, srv: Server) -> Row:
        n = 10
        expect = (f"{n} concurrent streams at --max-concurrency 1 --max-queue {MAX_QUEUE}: the excess gets 429 in "
                  "OpenAI's shape with Retry-After, the rest stream to data: [DONE]; /health answers within 2 s")
        body = j({"prompt": "hi", "max_tokens": 300, "temperature": 0, "stream": True})
        results: list[tuple] = [()] * n
        barrier = threading.Barrier(n + 1)

        def worker(i: int) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(10)
            sock, resp, err = open_request(srv.port, "POST", "/v1/completions", body, timeout=60)
            if resp is None or sock is None:
                results[i] = (None, err, "", {})
                return
            with sock:
                if resp.status != 200:
                    results[i] = (resp.status, None, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
                    return
                events, end = read_events(resp)
                results[i] = (200, end, events, {})

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait(10)
        time.sleep(0.3)
        health = send(srv.port, "GET", "/health", timeout=2)
        for t in threads:
            t.join(120)
        problems, statuses = [], Counter()
        for status, err, payload, headers in (r if r else (None, "no result", "", {}) for r in results):
            statuses[status] += 1
            if status is None:
                problems.append(f"no answer ({err})")
            elif status == 429:
                bad = shape_problem(payload)
                if bad:
                    problems.append(f"429: {bad}")
                if "retry-after" not in headers:
                    problems.append("429 without Retry-After")
            elif status == 200:
                if err:
                    problems.append(f"stream: {err}")
                elif any(e.startswith('{"error"') for e in payload):
                    problems.append("stream carried an error event")
            else:
                problems.append(f"status {status}" + (f": {shape_problem(payload)}" if shape_problem(payload) else ""))
        if statuses[429] == 0:
            problems.append("no request was refused with 429")
        if health.status != 200:
            problems.append(f"/health while busy: {health.describe()} after {health.seconds:.1f}s")
        problems = sorted(set(problems))
        problems += self.after_request(srv)
        outcome = ", ".join(f"{v} x {k}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])))
        return Row("server", "queue-overflow", expect, outcome, not problems,
                   "; ".join([*problems, f"/health while busy {health.seconds:.2f}s"]))

    def disconnect_storm(self, srv: Server) -> Row:
        n = 10
        expect = (f"{n} streaming clients that hang up after the headers: their jobs are cancelled (/health shows "
                  "nothing running or waiting within 10 s) and the next request gets 200")
        body = j({"prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True})
        socks = []
        for _ in range(n):
            sock, resp, _err = open_request(srv.port, "POST", "/v1/completions", body, timeout=10)
            if sock is not None:
                socks.append(sock)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        problems, state, t0 = [], {}, time.monotonic()
        while time.monotonic() - t0 < 10:
            bad, state = srv.health()
            if bad:
                problems.append(bad)
                break
            if not state.get("running") and not state.get("waiting"):
                break
            time.sleep(0.2)
        else:
            problems.append(f"still busy 10 s after the clients left: {state}")
        r = send(srv.port, "POST", "/v1/completions", j({"prompt": "hi", "max_tokens": 2, "temperature": 0}))
        problems += judge(r, frozenset({200}))
        problems += self.after_request(srv)
        outcome = f"idle after {time.monotonic() - t0:.1f}s, then {r.describe()}"
        return Row("server", "disconnect-storm", expect, outcome, not problems, "; ".join(problems))

    def sigterm_during_stream(self, srv: Server) -> list[Row]:
        k = "server"
        e_stream = (f"SIGTERM during a stream: after --shutdown-timeout ({SHUTDOWN_TIMEOUT} s) the stream ends with "
                    "the documented shutdown error (OpenAI's shape, code shutting_down) and then data: [DONE]")
        e_queued = "requests queued at SIGTERM: answered 503 in OpenAI's shape (code shutting_down)"
        e_exit = "the server exits within the shutdown timeout + 15 s, exit 0, no traceback in its log"
        stream: dict = {}
        first = threading.Event()

        def streamer() -> None:
            sock, resp, err = open_request(srv.port, "POST", "/v1/completions",
                                           j({"prompt": "hi", "max_tokens": 16000, "temperature": 0, "stream": True}),
                                           timeout=60)
            if resp is None or sock is None:
                stream.update(status=None, end=err, events=[])
                first.set()
                return
            with sock:
                stream["status"] = resp.status

                def seen(ev: list[str]) -> bool:
                    first.set()
                    return False

                events, end = read_events(resp, seen)
                stream.update(events=events, end=end)
                first.set()

        queued: list[Resp | None] = [None, None]

        def waiter(i: int) -> None:
            queued[i] = send(srv.port, "POST", "/v1/completions", j({"prompt": "hi", "max_tokens": 4,
                                                                     "temperature": 0}), timeout=60)

        ts = threading.Thread(target=streamer, daemon=True)
        ts.start()
        first.wait(30)
        tq = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(2)]
        for t in tq:
            t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            bad, state = srv.health(timeout=2)
            if bad or state.get("waiting", 0) >= 2:
                break
            time.sleep(0.1)
        log_mark = len(srv.log_text())
        os.kill(srv.proc.pid, signal.SIGTERM)
        t_sig = time.monotonic()
        ts.join(SHUTDOWN_TIMEOUT + 30)
        for t in tq:
            t.join(SHUTDOWN_TIMEOUT + 30)
        try:
            srv.proc.wait(max(1.0, SHUTDOWN_TIMEOUT + 15 - (time.monotonic() - t_sig)))
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        t_exit = time.monotonic() - t_sig
        rows = []
        # the stream
        events, end = stream.get("events", []), stream.get("end")
        problems = []
        if stream.get("status") != 200:
            problems.append(f"stream status {stream.get('status')} ({end})")
        finished = [e for e in events if '"finish_reason": "length"' in e or '"finish_reason": "stop"' in e]
        if end:
            problems.append(f"stream: {end}")
        payloads = [e for e in events if e != "[DONE]"]
        last = payloads[-1] if payloads else ""
        if finished and not problems:
            rows.append(Row(k, "sigterm-stream", e_stream, "inconclusive: the stream finished first", None,
                            f"{len(events)} events"))
        else:
            try:
                err = json.loads(last).get("error") if last else None
            except ValueError:
                err = None
            if not err:
                problems.append(f"no shutdown error before [DONE] (last event: {last[:80]!r})")
            elif shape_problem(last.encode()) or err.get("code") != "shutting_down":
                problems.append(f"shutdown event not as documented: {last[:100]}")
            rows.append(Row(k, "sigterm-stream", e_stream, f"{len(events)} events, "
                            + ("ended with [DONE]" if not end else end), not problems,
                            "; ".join([*problems, f"last event: {last[:90]}"])))
        # the queued requests
        problems = []
        for r in queued:
            if r is None:
                problems.append("no answer (client still waiting)")
                continue
            problems += judge(r, frozenset({503}))
            err = r.error_obj()
            if r.status == 503 and err and err.get("code") != "shutting_down":
                problems.append(f"503 code {err.get('code')!r}")
        rows.append(Row(k, "sigterm-queued", e_queued, ", ".join(r.describe() if r else "none" for r in queued),
                        not problems, "; ".join(sorted(set(problems)))))
        # the process
        problems = []
        log = srv.log_text()[log_mark:]
        if not exited:
            problems.append(f"still running {t_exit:.0f} s after SIGTERM")
            srv.stop()
        elif exit_code(srv.proc.returncode) != 0:
            problems.append(f"exit {exit_code(srv.proc.returncode)}")
        if TRACEBACK in log:
            problems.append(f"traceback in the log: {traceback_summary(log)}")
        rows.append(Row(k, "sigterm-exit", e_exit, f"exit {exit_code(srv.proc.returncode)} after {t_exit:.1f}s"
                        if exited else "still running", not problems, "; ".join(problems)))
        return rows

    def server_probes(self) -> None:
        srv = Server(self, self.q)
        try:
            why = srv.start()
            if why:
                self.add(Row("server", "start", "lowbit serve of the tiny checkpoint answers /health", "did not start",
                             False, why))
                return
            cases = self.server_cases()
            self.rss0 = None
            starts = srv.starts
            for c in cases:
                if c.rss and self.rss0 is None:
                    self.rss0 = srv.rss_mb()  # after the warm-up and the small probes: the baseline
                self.add(self.run_case(srv, c))
            rss = srv.rss_mb()
            if self.rss0 is not None and rss is not None:
                grew = rss - self.rss0
                ok = None if srv.starts != starts else grew <= RSS_LIMIT_MB
                self.add(Row("server", "rss-after-huge-refusals", f"server RSS after all the huge requests above: "
                             f"within {RSS_LIMIT_MB} MB of before them", f"{self.rss0:.0f} -> {rss:.0f} MB", ok,
                             "" if srv.starts == starts else "the server was restarted meanwhile"))
            self.add(self.queue_overflow(srv))
            self.add(self.disconnect_storm(srv))
            for row in self.sigterm_during_stream(srv):
                self.add(row)
            log = srv.log_text()
            self.meta["server"] = {"starts": srv.starts, "tracebacks_in_log": log.count(TRACEBACK),
                                   "rss_baseline_mb": round(self.rss0 or 0)}
        finally:
            srv.stop()

    # -------------------------------------------------------------------------------------------------- main

    def main(self, classes: list[str]) -> dict:
        t0 = time.monotonic()
        self.setup()
        cli = [c for c in classes if c in ("artifacts", "paths", "destinations")]
        if cli:
            self.run_cli_classes(cli)
        if "interrupt" in classes:
            self.interrupt_probes()
        if "server" in classes:
            self.server_probes()
        self.meta["seconds"] = round(time.monotonic() - t0, 1)
        return self.summary(classes)

    def summary(self, classes: list[str]) -> dict:
        per = {}
        for c in classes:
            rows = [r for r in self.rows if r.klass == c]
            per[c] = {"probes": len(rows), "failures": sum(r.ok is False for r in rows),
                      "skipped": sum(r.ok is None for r in rows)}
        return {"classes": classes, "probes": len(self.rows), "failures": sum(r.ok is False for r in self.rows),
                "skipped": sum(r.ok is None for r in self.rows), "per_class": per}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--lowbit", default="lowbit",
                    help='the lowbit command under test, split like a shell (default: %(default)s; e.g. '
                         '"python -m lowbit.cli")')
    ap.add_argument("--pythonpath", default=None,
                    help="PYTHONPATH for every lowbit process and the model builder (e.g. a checkout's src)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that builds the tiny models (needs torch, transformers, tokenizers, gguf; "
                         "default: this one)")
    ap.add_argument("--json", default=None, help="write {meta, summary, rows} here")
    ap.add_argument("--classes", default=",".join(CLASSES), help="comma-separated subset of: " + ", ".join(CLASSES))
    ap.add_argument("--jobs", type=int, default=2, help="CLI probes run at once (default %(default)s)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary scratch directory")
    a = ap.parse_args()
    classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        ap.error(f"unknown classes {unknown}; choose from {', '.join(CLASSES)}")
    probe = Probe(a)
    if shutil.which(probe.lowbit[0]) is None:
        ap.error(f"--lowbit: {probe.lowbit[0]!r} not found")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (server, mounts) on SIGTERM too
    print(f"lowbit command: {shlex.join(probe.lowbit)}; PYTHONPATH={probe.env.get('PYTHONPATH', '')}", flush=True)
    try:
        summary = probe.main(classes)
    finally:
        probe.cleanup()
        signal.signal(signal.SIGTERM, previous)
    print(f"\nsummary: classes tried: {', '.join(classes)} ({len(classes)}); probes: {summary['probes']}; "
          f"failures: {summary['failures']}; skipped: {summary['skipped']}; {probe.meta['seconds']} s")
    for c, s in summary["per_class"].items():
        print(f"  {c:<13} {s['probes']:>3} probes, {s['failures']:>3} failures, {s['skipped']} skipped")
    if a.json:
        meta = {"command": shlex.join([sys.executable, *sys.argv]), "lowbit": shlex.join(probe.lowbit),
                "pythonpath": probe.env.get("PYTHONPATH"), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "cpus": os.cpu_count(), "euid": os.geteuid(), **probe.meta}
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": [r.to_json() for r in probe.rows]},
                                  indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
