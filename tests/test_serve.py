"""lowbit generate / lowbit serve on a tiny random Llama: generation loop, OpenAI client round trips, error
shapes, a load test with a bounded queue, cancellation on disconnect, graceful shutdown, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import AsyncOpenAI, OpenAI

from conftest import make_model
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.io.loader import load_model
from lowbit.models.walker import round_to_storage
from lowbit.serve import SERVE_EXTRA_HINT
from lowbit.serve.app import LowbitServer, create_app
from lowbit.serve.engine import Engine, QueueFullError
from lowbit.serve.generate import (
    PLAIN_CHAT_STOP,
    IncrementalDecoder,
    PromptTooLongError,
    SamplingParams,
    StopMatcher,
    TextStream,
    encode_chat,
    encode_prompt,
    plain_chat_prompt,
)

MODEL_ID = "tiny-chat-llama"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose tokenizer decodes bytes back to text and has a chat template."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("serve") / MODEL_ID
    make_model("llama", vocab=len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.backend_tokenizer.decoder = decoders.ByteLevel()  # conftest's tokenizer has none: decode() = byte symbols
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok = load_model(tiny_dir)
    return round_to_storage(model), tok  # as the CLI loads it, so CLI, server and direct calls agree


def reference(loaded, ids: list[int], params: SamplingParams = GREEDY) -> TextStream:
    """A finished generation; its text is in ``.output``."""
    stream = TextStream(*loaded, ids, params)
    stream.output = stream.text()
    return stream


@contextlib.contextmanager
def slow_forward(model, seconds: float) -> Iterator[None]:
    """Make every forward pass take a while, so queues fill and cancellation is observable."""
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def gated_forward(model) -> Iterator[threading.Event]:
    """Every forward pass waits (up to 30 s) until the yielded event is set: requests stay running for as long as a
    test needs, with no timing involved. The gate opens on exit in any case."""
    gate = threading.Event()

    def wait(*_) -> None:  # noqa: ANN002 - a forward pre-hook; returning None keeps the inputs
        gate.wait(30)

    handle = model.register_forward_pre_hook(wait)
    try:
        yield gate
    finally:
        gate.set()
        handle.remove()


@contextlib.contextmanager
def running_server(model, tok, port: int = 0, **kwargs) -> Iterator[tuple[str, object]]:
    app = create_app(model, tok, MODEL_ID, **kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    server = LowbitServer(app, log_level="warning", grace=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def server(loaded):
    with running_server(*loaded, max_concurrency=1, max_queue=8) as s:
        yield s


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=30)


# ------------------------------------------------------------------------------------- generation loop


def test_greedy_is_deterministic_and_respects_max_tokens(loaded):
    ids = encode_prompt(loaded[1], "The quick brown fox")
    a, b = reference(loaded, ids), reference(loaded, ids)
    assert a.token_ids == b.token_ids and a.prompt_tokens == len(ids)
    assert a.finish_reason in ("stop", "length")
    if a.finish_reason == "length":
        assert a.completion_tokens == GREEDY.max_new_tokens
    # top_k=1 and top_p=0 keep only the best token: sampling at any temperature equals greedy
    for params in (SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3),
                   SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.0, seed=4)):
        assert reference(loaded, ids, params).token_ids == a.token_ids


def test_seeded_sampling_reproducible(loaded):
    ids = encode_prompt(loaded[1], "Low-bit")
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert reference(loaded, ids, p).token_ids == reference(loaded, ids, p).token_ids
    other = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    assert reference(loaded, ids, p).token_ids != reference(loaded, ids, other).token_ids


def test_stop_string_cuts_output(loaded):
    ids = encode_prompt(loaded[1], "The quick brown fox")
    full = TextStream(*loaded, ids, SamplingParams(max_new_tokens=24, temperature=0)).text()
    assert len(full) > 6
    stop = full[3:6]
    cut = TextStream(*loaded, ids, SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,)))
    text = cut.text()
    assert text == full[:full.find(stop)] and cut.finish_reason == "stop"


def test_incremental_decoding_multibyte(loaded):
    tok = loaded[1]
    text = "héllo wörld 日本語 🙂 The quick fox"
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # a character split over byte tokens is emitted once, whole


def test_stop_matcher_holds_back_partial_stop():
    m = StopMatcher(["\nUser:"])
    assert [m.push("ab\n"), m.push("Us"), m.push("er: more")] == ["ab", "", ""] and m.stopped
    m = StopMatcher(["\nUser:"])
    assert [m.push("ab\n"), m.push("Us"), m.push("e")] == ["ab", "", ""] and m.flush() == "\nUse"


def test_prompt_too_long(loaded):
    ids = [5] * 256  # the tiny model's context is 256
    with pytest.raises(PromptTooLongError, match="256"):
        TextStream(*loaded, ids, GREEDY)
    # a prompt that fits is cut at the context, with finish_reason "length"
    s = TextStream(*loaded, [5] * 250, SamplingParams(max_new_tokens=100, temperature=0))
    s.text()
    assert s.completion_tokens <= 6 and (s.finish_reason == "stop" or s.completion_tokens == 6)


def test_chat_template_and_plain_fallback(loaded, tiny_tokenizer):
    tok = loaded[1]
    ids, stops = encode_chat(tok, MESSAGES)
    assert tok.decode(ids) == "<|system|>Be brief.\n<|user|>The quick brown fox\n<|assistant|>" and stops == ()
    assert not getattr(tiny_tokenizer, "chat_template", None)
    ids, stops = encode_chat(tiny_tokenizer, MESSAGES)
    assert plain_chat_prompt(MESSAGES) == "System: Be brief.\nUser: The quick brown fox\nAssistant:"
    assert ids == tiny_tokenizer.encode(plain_chat_prompt(MESSAGES)) and stops == (PLAIN_CHAT_STOP,)


# ---------------------------------------------------------------------------------- the OpenAI client


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion_matches_generate_function(client, loaded):
    ref = reference(loaded, encode_prompt(loaded[1], "The quick brown fox"))
    r = client.completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_ID and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.output and ref.output == loaded[1].decode(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_chat_completion_matches_generate_function(client, loaded):
    ids, _ = encode_chat(loaded[1], MESSAGES)
    ref = reference(loaded, ids)
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.output
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), ref.completion_tokens)


def test_streaming_equals_non_streaming(client):
    kw = {"model": MODEL_ID, "max_tokens": 16, "temperature": 0}
    full = client.completions.create(prompt="Perplexity measures", **kw)
    chunks = list(client.completions.create(prompt="Perplexity measures", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == full.choices[0].text and len(texts) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices

    full = client.chat.completions.create(messages=MESSAGES, **kw)
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_sse_framing(server):
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] in ("stop", "length")


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", '{"model": "x", "prompt": ', 400, None),  # malformed JSON
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "fox " * 300}, 400, "prompt"),  # longer than the 256-token context
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),  # prompt + max_tokens > context
    ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 300}]}, 400, "messages"),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_requests_get_openai_error_json(server, path, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(server[0] + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt="hi", temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL_ID, prompt="fox " * 300)


# ------------------------------------------------------------------------------ load, cancel, shutdown


def test_load_bounded_queue_refuses_cleanly(server, loaded, client):
    """32 concurrent streams against 1 slot + a queue of 8: each completes or gets an immediate 429."""
    base, app = server

    async def one(aclient: AsyncOpenAI, i: int) -> str:
        try:
            stream = await aclient.completions.create(model=MODEL_ID, prompt=f"fox {i}", max_tokens=8,
                                                      temperature=0, stream=True)
            texts, reasons = [], []
            async for chunk in stream:
                texts.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)
            assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
            return "ok"
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.response.headers["retry-after"] == "1"
            assert e.body["code"] == "rate_limit_exceeded"
            return "429"

    async def run_all() -> list[str]:
        aclient = AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        async with aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(32))), 60)

    with slow_forward(loaded[0], 0.02):
        t0 = time.monotonic()
        results = asyncio.run(run_all())
    assert len(results) == 32 and results.count("ok") >= 9 and results.count("429") >= 1, results
    assert time.monotonic() - t0 < 45
    engine = app.state.engine
    assert engine.running == 0 and engine.waiting == 0
    # still serving
    assert client.completions.create(model=MODEL_ID, prompt="fox", max_tokens=2, temperature=0).choices[0].text


def test_client_disconnect_cancels_generation(server, loaded):
    base, app = server
    engine = app.state.engine
    cancelled = engine.stats["cancelled"]
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 240, "temperature": 0, "stream": True}
    with slow_forward(loaded[0], 0.02):  # the whole generation would take > 4.8 s
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        t0 = time.monotonic()
        while engine.running and time.monotonic() - t0 < 3:
            time.sleep(0.02)
    assert engine.running == 0 and engine.stats["cancelled"] == cancelled + 1


def test_health_stays_responsive_while_generating(server, loaded):
    base, app = server
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 40, "temperature": 0}
    with slow_forward(loaded[0], 0.02):  # the generation takes > 0.8 s
        t = threading.Thread(target=httpx.post, args=(f"{base}/v1/completions",), kwargs={"json": body, "timeout": 30})
        t.start()
        t0 = time.monotonic()
        while app.state.engine.running == 0 and time.monotonic() - t0 < 10:  # started, however loaded the machine
            time.sleep(0.01)
        t0 = time.monotonic()
        h = httpx.get(f"{base}/health", timeout=5).json()
        assert time.monotonic() - t0 < 0.5 and h["running"] == 1
        t.join(30)


def test_cli_serve_sigterm_finishes_in_flight_then_exits_0(tiny_dir):
    """`lowbit serve` in this process's main thread (where signals land): SIGTERM arrives mid-stream, the stream
    still completes, and the command returns 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, chunks, problems = f"http://127.0.0.1:{port}", [], []

    def client() -> None:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.05)
            body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 200, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                chunks.append(next(lines))
                os.kill(os.getpid(), signal.SIGTERM)
                chunks.extend(lines)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            problems.append(repr(e))
        finally:
            if not chunks:  # never leave the server (and this test) running
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert main(["serve", str(tiny_dir), "--port", str(port), "--device", "cpu", "--shutdown-timeout", "10"]) == 0
    t.join(10)
    assert not problems and [c for c in chunks if c][-1] == "data: [DONE]", (problems, chunks[-3:])
    finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks if c.startswith("data: {")]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    assert signal.getsignal(signal.SIGTERM) == before  # restored


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_generate_streams_greedy_text(tiny_dir, loaded, capsys):
    argv = ["generate", str(tiny_dir), "--prompt", "The quick brown fox", "--temperature", "0",
            "--max-new-tokens", "12", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == reference(loaded, encode_prompt(loaded[1], "The quick brown fox")).output + "\n"
    assert "tokens/s" in err and "prompt" in err
    assert main([*argv, "--chat", "--system", "Be brief."]) == 0
    ids, _ = encode_chat(loaded[1], MESSAGES)
    assert capsys.readouterr().out == reference(loaded, ids).output + "\n"
    assert main([*argv, "--fast"]) == 0  # static-cache decoder: the same greedy text
    assert capsys.readouterr().out == reference(loaded, encode_prompt(loaded[1], "The quick brown fox")).output + "\n"
    assert main([*argv, "--no-fast", "--compile"]) == 2
    assert "compile needs fast decoding" in capsys.readouterr().err


def test_generate_decodes_fast_by_default_on_cuda_only(tiny_dir, monkeypatch):
    """lowbit.generate's default: a static decoder on CUDA (the packed kernels, one CUDA graph a token), the
    dynamic-cache loop on a CPU; where no decoder can be built the default falls back with a warning, an explicit
    fast=True does not, and compile without fast is refused."""
    import lowbit
    import lowbit.api

    model, tok = load_model(tiny_dir)
    model = round_to_storage(model)
    assert lowbit.generate(model, tok, "fox", params=GREEDY).decoder is None
    assert lowbit.generate(model, tok, "fox", params=GREEDY, fast=True).decoder is not None
    with pytest.raises(LowbitError, match="compile needs fast"):
        lowbit.generate(model, tok, "fox", params=GREEDY, fast=False, compile=True)

    def no_decoder(*args, **kwargs):
        raise NotImplementedError("no static cache for this architecture")

    monkeypatch.setattr(lowbit.api, "StaticDecoder", no_decoder)
    with pytest.raises(NotImplementedError):
        lowbit.generate(model, tok, "fox", params=GREEDY, fast=True)
    with pytest.warns(UserWarning, match="dynamic cache: no fast decoder .*no static cache for this architecture"):
        stream = lowbit.generate(model, tok, "fox", params=GREEDY, compile=True)  # compile asks for fast (auto)
    assert stream.decoder is None and stream.text() == reference((model, tok), encode_prompt(tok, "fox")).output
    if torch.cuda.is_available():
        monkeypatch.undo()
        model.cuda()
        stream = lowbit.generate(model, tok, "fox", params=GREEDY)
        assert stream.decoder is not None
        want = lowbit.generate(model, tok, "fox", params=GREEDY, fast=False).text()
        assert stream.text() == want


def test_cli_generate_quantized_checkpoint_and_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "-p", "fox", "--max-new-tokens", "5", "--seed", "1", "--device", "cpu"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert main(["generate", str(tiny_dir), "-p", "fox " * 300, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lowbit: error:" in err and "context" in err and "Traceback" not in err
    assert main(["generate", str(tiny_dir), "-p", "fox", "--max-new-tokens", "0"]) == 2


@pytest.fixture(scope="module")
def fast_loaded(tiny_dir):
    """Its own copy of the tiny model: fast decoders fold and fuse the layers they run, in place."""
    model, tok = load_model(tiny_dir)
    return round_to_storage(model), tok


def test_fast_server_answers_as_the_dynamic_loop_and_falls_back_past_its_cache(fast_loaded, loaded):
    """--fast: a generation that fits the static cache runs on a decoder, which is free again after the answer;
    one that does not fit runs the ordinary loop. Both give the reference's greedy text. A chat request that names
    no length gets the decoder's room (without --fast: the whole context)."""
    ids = encode_prompt(loaded[1], "The quick brown fox")
    ref = reference(loaded, ids)
    short = [{"role": "user", "content": "Hi"}]
    n_chat = len(encode_chat(loaded[1], short)[0])
    cache = max(len(ids), n_chat) + 12
    past = cache - len(ids) + 2  # one token more than the cache holds after this prompt
    with running_server(*fast_loaded, max_concurrency=2, fast=True, fast_cache=cache) as (base, app):
        engine = app.state.engine
        assert engine.decoder_cache == cache and engine.free_decoders == 2
        c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        r = c.completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=12, temperature=0)
        assert r.choices[0].text == ref.output and r.choices[0].finish_reason == ref.finish_reason
        assert engine.stats["fast"] == 1 and engine.free_decoders == 2
        long = reference(loaded, ids, SamplingParams(max_new_tokens=past, temperature=0))
        r = c.completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=past, temperature=0)
        assert r.choices[0].text == long.output and r.usage.completion_tokens == long.completion_tokens
        assert engine.stats["fast_fallback"] == 1 and engine.stats["fast"] == 1
        chat = c.chat.completions.create(model=MODEL_ID, messages=short, temperature=0)
        assert chat.usage.completion_tokens <= cache - n_chat + 1 and engine.stats["fast"] == 2
        results: list[int] = []
        threads = [threading.Thread(target=post_completion, args=(base, results, 8)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200] * 3 and engine.stats["fast"] == 5 and engine.free_decoders == 2
        fast = httpx.get(f"{base}/health").json()["fast"]
        assert fast == {"free": 2, "cache": cache, "decoded": 5, "fallback": 1}


def test_fast_server_settings_are_checked(fast_loaded, tiny_dir, capsys, monkeypatch):
    import lowbit.serve.app

    model, tok = fast_loaded
    with pytest.raises(LowbitError, match="need fast decode"):
        create_app(model, tok, MODEL_ID, fast=False, compile=True)
    with pytest.raises(LowbitError, match="passes the model's context"):
        create_app(model, tok, MODEL_ID, fast_cache=model.config.max_position_embeddings + 1)  # asks for fast
    assert main(["serve", str(tiny_dir), "--no-fast", "--compile"]) == 2
    assert "--compile and --fast-cache go with --fast" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--fast", "--fast-cache", "1"]) == 2
    assert "--fast-cache needs >= 2 positions" in capsys.readouterr().err
    served = []
    monkeypatch.setattr(lowbit.serve.app, "serve", lambda *a, **kw: served.append(kw))
    assert main(["serve", str(tiny_dir), "--fast", "--fast-cache", "64", "--device", "cpu"]) == 0
    assert "preparing 1 fast decoder(s)" in capsys.readouterr().err
    assert (served[0]["fast"], served[0]["compile"], served[0]["fast_cache"]) == (True, False, 64)
    assert main(["serve", str(tiny_dir), "--device", "cpu"]) == 0  # a CPU's default: the loop
    assert "fast decoder" not in capsys.readouterr().err and served[1]["fast"] is None


def test_serve_decodes_fast_by_default_on_cuda_only(tiny_dir, monkeypatch):
    """create_app's default: one static decoder per slot on CUDA (once ``serve_fast`` has left
    ``verified.GPU_UNVERIFIED``: this test on a GPU, where it takes part), the dynamic-cache loop on a CPU unless a
    fast setting (a cache size) asks for decoders; where none can be built the default falls back with a warning and
    an explicit fast=True does not."""
    import lowbit.serve.fast_decode
    from lowbit.kernels import verified

    model, tok = load_model(tiny_dir)
    model = round_to_storage(model)
    assert create_app(model, tok, MODEL_ID).state.engine.decoder_cache == 0
    assert create_app(model, tok, MODEL_ID, fast_cache=16).state.engine.decoder_cache == 16

    def no_decoder(*args, **kwargs):
        raise NotImplementedError("no static cache for this architecture")

    monkeypatch.setattr(lowbit.serve.fast_decode, "StaticDecoder", no_decoder)
    with pytest.raises(NotImplementedError):
        create_app(model, tok, MODEL_ID, fast=True)
    with pytest.warns(UserWarning, match="dynamic cache: no fast decoders .*no static cache for this architecture"):
        app = create_app(model, tok, MODEL_ID, fast_cache=16)
    assert app.state.engine.decoder_cache == 0
    monkeypatch.undo()
    if torch.cuda.is_available():
        model.cuda()
        if "serve_fast" in verified.GPU_UNVERIFIED:  # the loop until this test has passed on a GPU
            assert create_app(model, tok, MODEL_ID).state.engine.decoder_cache == 0
        monkeypatch.setattr(verified, "GPU_UNVERIFIED", verified.GPU_UNVERIFIED - {"serve_fast"})
        ids = encode_prompt(tok, "The quick brown fox")
        with running_server(model, tok) as (base, app):
            assert app.state.engine.decoder_cache == min(model.config.max_position_embeddings, 4096)
            c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
            r = c.completions.create(model=MODEL_ID, prompt="The quick brown fox", max_tokens=12, temperature=0)
            assert app.state.engine.stats["fast"] == 1
        assert r.choices[0].text == reference((model, tok), ids).output  # the dynamic-cache loop on the GPU


def test_fast_decode_on_a_cpu_keeps_the_weight_cache(tiny_dir):
    """On a CPU the packed kernels do not run, so the fast path decodes from cached dequantized weights like the
    ordinary loop (fast=True once dequantized every weight at every step): same text, caches filled, no fusion."""
    import lowbit
    from lowbit.models.quant_linear import QuantLinear

    model, tok = load_model(tiny_dir)
    lowbit.quantize(model, lowbit.Recipe("q4_0"), tok, progress=False)
    want = "".join(lowbit.generate(model, tok, "The quick brown fox", params=GREEDY))
    got = "".join(lowbit.generate(model, tok, "The quick brown fox", params=GREEDY, fast=True))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert got == want and linears
    assert all(m.weight_cached and m._cache is not None and m._fused is None for m in linears)


def test_max_concurrency_2_with_no_queue(loaded):
    """Two generations run at once; with --max-queue 0 a third concurrent request is refused, not queued."""
    results: list[int] = []
    with gated_forward(loaded[0]) as gate, \
            running_server(*loaded, max_concurrency=2, max_queue=0) as (base, app):
        threads = [threading.Thread(target=post_completion, args=(base, results, 12)) for _ in range(3)]
        peak = 0
        for n, t in enumerate(threads, 1):  # one at a time: the third arrives while two run
            t.start()
            t0 = time.monotonic()
            while app.state.engine.running < min(n, 2) and 429 not in results and time.monotonic() - t0 < 30:
                time.sleep(0.005)
            peak = max(peak, app.state.engine.running)
        open_when_refused(gate, results, threads)
    assert sorted(results) == [200, 200, 429] and peak == 2


def test_max_queue_0_refuses_the_third_of_a_burst(loaded):
    """Three requests at once, before any holds a slot: two run, the third is refused (not queued behind them)."""
    results: list[int] = []
    with gated_forward(loaded[0]) as gate, running_server(*loaded, max_concurrency=2, max_queue=0) as (base, _app):
        start = threading.Barrier(3)
        threads = [threading.Thread(target=post_completion, args=(base, results, 4, start)) for _ in range(3)]
        for t in threads:
            t.start()
        open_when_refused(gate, results, threads)
    assert sorted(results) == [200, 200, 429]


def test_a_finished_answer_has_already_freed_its_slot(loaded):
    """Once a client holds its whole answer (streamed or not), its slot is free: with one slot and no queue, a
    client sending request after request is never refused because of the request just answered."""
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 3, "temperature": 0}
    with running_server(*loaded, max_concurrency=1, max_queue=0) as (base, app):
        engine = app.state.engine
        for i in range(12):
            stream = i % 2 == 0
            r = httpx.post(f"{base}/v1/completions", json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 200 and (r.text.endswith("data: [DONE]\n\n") if stream else r.json()["choices"])
            assert engine.running == 0, f"request {i}: the slot was still held after the answer ended"


def test_a_won_slot_still_counts_once_while_its_handler_resumes(loaded):
    """Between a request winning its slot and its handler resuming, the request is neither waiting nor running in
    the plain sense; admission must still count it exactly once, so max_queue others may queue behind it."""
    async def scenario() -> None:
        engine = Engine(*loaded, max_concurrency=1, max_queue=1)

        async def present() -> bool:
            return False

        first = asyncio.ensure_future(engine.acquire(present))
        while not engine._slots.locked():  # the slot is won a few loop steps before `first` resumes
            await asyncio.sleep(0)
        assert not first.done()
        engine.check_admission()  # room for one request behind `first`
        second = asyncio.ensure_future(engine.acquire(present))
        await asyncio.sleep(0.05)
        assert first.result() is True and not second.done()
        with pytest.raises(QueueFullError):
            engine.check_admission()
        second.cancel()
        engine._slots.release()  # `first` never started a job; hand its slot back
        await engine.close()

    asyncio.run(scenario())


def post_completion(base: str, results: list[int], max_tokens: int, start: threading.Barrier | None = None) -> None:
    """One greedy completion request (after ``start``, when given); its status code goes to ``results``."""
    if start is not None:
        start.wait(10)
    body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": max_tokens, "temperature": 0}
    results.append(httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code)


def open_when_refused(gate: threading.Event, results: list[int], threads: list[threading.Thread]) -> None:
    """Wait (up to 30 s) for a request to be refused, then let the held generations finish."""
    t0 = time.monotonic()
    while 429 not in results and time.monotonic() - t0 < 30:
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(60)


@pytest.mark.parametrize("missing, reloaded", [
    ("fastapi", ["lowbit.serve.app"]),
    ("uvicorn", ["lowbit.serve.app"]),
    ("pydantic", ["lowbit.serve.app", "lowbit.serve.schema"]),
])
def test_missing_serve_extra_names_the_extra(monkeypatch, capsys, missing, reloaded):
    """Without a package of the serve extra, the server modules and `lowbit serve` say what to install."""
    monkeypatch.setitem(sys.modules, missing, None)  # None in sys.modules: that import fails
    for name in reloaded:  # monkeypatch puts the already-imported modules back afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(LowbitError, match=re.escape(SERVE_EXTRA_HINT)):
        importlib.import_module("lowbit.serve.app")
    assert main(["serve", "unused-model-path"]) == 2
    assert capsys.readouterr().err == f"lowbit: error: {SERVE_EXTRA_HINT}\n"
