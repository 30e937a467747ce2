"""`lowbit serve` as a real process on 127.0.0.1, stopped with SIGTERM while two streams run and a request waits:
the streams end with the shutdown error event and `data: [DONE]`, the waiting request gets 503 in OpenAI's JSON
shape, the process exits 0 and its log has no traceback. The API key comes from LOWBIT_API_KEY."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from test_serve import MODEL_ID, tiny_dir  # noqa: F401 - fixture used by name

KEY = "sk-shutdown"
GRACE = 1.5
# The CLI, with every forward pass of the tiny model slowed down so a generation outlasts the grace period.
SLOW_CLI = """
import sys, time
import torch
from transformers import LlamaForCausalLM
torch.nn.modules.module.register_module_forward_pre_hook(
    lambda m, a: time.sleep(0.05) if isinstance(m, LlamaForCausalLM) else None)
from lowbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(model_dir: Path, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    argv = [sys.executable, "-c", SLOW_CLI, "serve", str(model_dir), "--device", "cpu", "--port", str(port), *args]
    env = {**os.environ, "LOWBIT_API_KEY": KEY}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def raw_stream(base: str, lines: list[str], started: threading.Event) -> None:
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            lines.append(line)
            started.set()


def client_stream(client: OpenAI, outcome: dict, started: threading.Event) -> None:
    try:
        for _ in client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=200, temperature=0, stream=True):
            started.set()
        outcome["finished"] = time.monotonic()
    except openai.APIError as e:  # the error event in the stream: OpenAI's client raises it
        outcome["error"] = e


def waiting_request(client: OpenAI, outcome: dict) -> None:
    try:
        client.completions.create(model=MODEL_ID, prompt="fox", max_tokens=4)
    except openai.APIStatusError as e:
        outcome["error"], outcome["at"] = e, time.monotonic()


def wait_for(predicate, seconds: float = 30) -> None:  # noqa: ANN001 - a callable returning bool
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_ends_streams_cleanly_and_refuses_the_queue(tiny_dir, tmp_path):  # noqa: F811
    log = tmp_path / "server.log"
    with server_process(tiny_dir, log, "--max-concurrency", "2", "--shutdown-timeout", str(GRACE)) as (proc, base):
        client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401  # the key from the environment
        lines, streamed, queued = [], {}, {}
        a, b = threading.Event(), threading.Event()
        threads = [threading.Thread(target=raw_stream, args=(base, lines, a)),
                   threading.Thread(target=client_stream, args=(client, streamed, b))]
        for t in threads:
            t.start()
        assert a.wait(30) and b.wait(30)
        threads.append(threading.Thread(target=waiting_request, args=(client, queued)))
        threads[-1].start()
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).json()["waiting"] == 1)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        ended = time.monotonic() - t0
        assert proc.wait(30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text and "Cancel" not in text, text[-3000:]

    err = queued["error"]  # refused at once, not after the grace period
    assert err.status_code == 503 and queued["at"] - t0 < GRACE
    assert err.response.json() == {"error": {"message": "The server is shutting down.", "type": "server_error",
                                             "param": None, "code": "shutting_down"}}
    data = [line for line in lines if line]
    assert data[-1] == "data: [DONE]", data[-3:]
    assert json.loads(data[-2][6:])["error"]["code"] == "shutting_down"
    assert all(json.loads(d[6:])["choices"][0]["finish_reason"] is None for d in data[:-2])
    # both streams are greedy, so neither can sample EOS early and let the queued request in before the signal
    assert "shutting down" in str(streamed["error"])
    assert GRACE - 0.2 < ended < GRACE + 5  # the streams got the grace period, then ended within a forward pass
