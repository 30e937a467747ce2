"""Load on `lowbit serve`: good, oversized, too-long and malformed requests at once; the good ones' latency and the
server's memory before and after.

    PYTHONPATH=src python benchmarks/serve_load.py                              # bundled SmolLM2-135M, ~2 min
    PYTHONPATH=src python benchmarks/serve_load.py --model DIR --rounds 2 --json out.json
    PYTHONPATH=src python benchmarks/serve_load.py --model DIR --device cuda --fast --compile   # fast decoders

Starts `lowbit serve` in a subprocess on 127.0.0.1 (a free port; --max-body-bytes, --max-prompt-tokens as given)
and sends one warm-up round, then ``--rounds`` rounds. A round sends, all at once from ``--workers`` threads:
``--good`` completions (``--tokens`` greedy tokens, every other one streamed), ``--huge`` bodies of 4x the body
limit (half with Content-Length, half chunked), ``--long`` prompts under the body limit but over the prompt limit
(half 0.9x the body limit, refused from their byte count; half ~2 tokens per allowed token, refused after
tokenizing) and ``--bad`` malformed bodies. The server's resident memory (VmRSS in /proc/PID/status) is read
after the warm-up, sampled during the rounds, and read after them. Finally SIGTERM: the server must exit 0 with no
traceback in its log. With ``--fast`` the server decodes on its static-cache decoders and the numbers include
its /health report of them (generations on the decoders and past their cache). Prints a table; ``--json`` writes
the numbers. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BAD_BODIES = [
    b'{"prompt": "The capital', b"[1, 2]", b"null", b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "seed": 18446744073709551616}', b'{"prompt": "hi", "max_tokens": "16"}',
    b'{"messages": "hi"}', b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe\x00",
    b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", b'{"prompt": [[-1]]}',
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--good", type=int, default=8, help="good completions per round")
    p.add_argument("--huge", type=int, default=8, help="bodies over the body limit per round")
    p.add_argument("--long", type=int, default=4, help="prompts over the prompt-token limit per round")
    p.add_argument("--bad", type=int, default=24, help="malformed bodies per round")
    p.add_argument("--tokens", type=int, default=16, help="max_tokens of a good request")
    p.add_argument("--workers", type=int, default=16, help="client threads")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="the server's device (default %(default)s)")
    p.add_argument("--fast", action="store_true", help="serve with --fast (static-cache decoders)")
    p.add_argument("--compile", action="store_true", help="... and --compile")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- the server


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args: argparse.Namespace, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`lowbit serve` on a free loopback port, up and answering /health."""
    port = free_port()
    argv = [sys.executable, "-m", "lowbit.cli", "serve", *([args.model] if args.model else []),
            "--device", args.device, "--port", str(port), "--max-body-bytes", str(args.max_body_bytes),
            "--max-prompt-tokens", str(args.max_prompt_tokens), *(["--fast"] if args.fast else []),
            *(["--compile"] if args.compile else [])]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# --------------------------------------------------------------------------------------------- requests


def chunked(total: int) -> Iterator[bytes]:
    """A JSON body of about ``total`` bytes with no declared length (httpx sends it chunked)."""
    size = min(65536, max(1, total // 4))
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


def request_kinds(args: argparse.Namespace) -> dict[str, Callable[[httpx.Client, int], tuple[int, bool]]]:
    """name -> fn(client, i) sending one request of that kind: (status, whether the answer is what it must be)."""
    limit = args.max_body_bytes
    json_headers = {"content-type": "application/json"}

    def good(http: httpx.Client, i: int) -> tuple[int, bool]:
        body = {"prompt": f"The capital of France is {i}", "max_tokens": args.tokens, "temperature": 0}
        if i % 2:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                text = r.read().decode()
            return r.status_code, r.status_code == 200 and text.endswith("data: [DONE]\n\n") and '"error"' not in text
        r = http.post("/v1/completions", json=body)
        return r.status_code, r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")

    def huge(http: httpx.Client, i: int) -> tuple[int, bool]:
        content = chunked(4 * limit) if i % 2 else b"x" * (4 * limit)
        r = http.post("/v1/completions", content=content, headers=json_headers)
        return r.status_code, r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def long(http: httpx.Client, i: int) -> tuple[int, bool]:
        prompt = "x" * int(0.9 * limit) if i % 2 else "fox " * (2 * args.max_prompt_tokens)
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        return r.status_code, r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

    def bad(http: httpx.Client, i: int) -> tuple[int, bool]:
        r = http.post("/v1/completions", content=BAD_BODIES[i % len(BAD_BODIES)], headers=json_headers)
        return r.status_code, r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}

    return {"good": good, "huge": huge, "long": long, "bad": bad}


def one_round(args: argparse.Namespace, base: str) -> list[tuple[str, int, bool, float]]:
    """Every request of a round at once, interleaved: (kind, status, answer ok, seconds)."""
    kinds = request_kinds(args)
    plan = [(k, i) for i in range(max(args.good, args.huge, args.long, args.bad)) for k in kinds
            if i < getattr(args, k)]

    def send(item: tuple[str, int]) -> tuple[str, int, bool, float]:
        kind, i = item
        t0 = time.perf_counter()
        with httpx.Client(base_url=base, timeout=600) as http:
            status, ok = kinds[kind](http, i)
        return kind, status, ok, time.perf_counter() - t0

    with ThreadPoolExecutor(args.workers) as pool:
        return list(pool.map(send, plan))


class RssSampler:
    """The server's VmRSS every 50 ms while a block runs: the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------- run


def summarize(results: list[tuple[str, int, bool, float]], seconds: float) -> dict:
    out: dict = {"requests": len(results), "seconds": round(seconds, 2),
                 "requests_per_second": round(len(results) / seconds, 1)}
    for kind in ("good", "huge", "long", "bad"):
        rows = [r for r in results if r[0] == kind]
        times = sorted(r[3] for r in rows)
        out[kind] = {"n": len(rows), "wrong": sum(not r[2] for r in rows),
                     "statuses": sorted({r[1] for r in rows}),
                     "p50_s": round(statistics.median(times), 3) if times else None,
                     "max_s": round(times[-1], 3) if times else None}
    return out


def run(args: argparse.Namespace) -> dict:
    """Start the server, load it, stop it; the numbers (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with server(args, log) as (proc, base):
            one_round(args, base)  # warm-up: first-use allocations (caches, threads) are not growth
            before = rss_bytes(proc.pid)
            t0 = time.perf_counter()
            with RssSampler(proc.pid) as sampler:
                results = [r for _ in range(args.rounds) for r in one_round(args, base)]
            seconds = time.perf_counter() - t0
            time.sleep(1.0)
            after = rss_bytes(proc.pid)
            fast = httpx.get(f"{base}/health", timeout=10).json().get("fast")
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(60)
        text = log.read_text()
    return {**summarize(results, seconds), "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(max(sampler.peak, after) / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
            "rss_growth_mb": round((after - before) / 2**20, 1), "exit_code": exit_code,
            "traceback_in_log": "Traceback" in text, "fast": fast}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"$ {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(f"model {args.model or 'bundled smollm2-135m'}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    out = run(args)
    print("| kind | n | wrong answers | statuses | p50 s | max s |\n|---|---|---|---|---|---|")
    for kind in ("good", "huge", "long", "bad"):
        k = out[kind]
        print(f"| {kind} | {k['n']} | {k['wrong']} | {k['statuses']} | {k['p50_s']} | {k['max_s']} |")
    print(f"{out['requests']} requests in {out['seconds']} s ({out['requests_per_second']} req/s); server RSS "
          f"{out['rss_before_mb']} MB before, {out['rss_peak_mb']} MB peak, {out['rss_after_mb']} MB after "
          f"({out['rss_growth_mb']:+} MB); exit code {out['exit_code']}, traceback in log: {out['traceback_in_log']}")
    if out["fast"]:
        print(f"fast decoders: {out['fast']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
