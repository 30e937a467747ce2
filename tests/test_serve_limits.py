"""lowbit serve with inputs that pass a loose schema and used to fail later (lone surrogates, NaN, numbers past
int64, temperatures that overflow float32), and its resource bounds: request body size (declared and chunked),
prompt tokens checked before tokenizing and before the queue, on a tiny random Llama."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.serve.app import create_app
from lowbit.serve.engine import bytes_per_token_bound
from lowbit.serve.generate import SamplingParams, sample_next
from test_serve import MODEL_ID, loaded, running_server, slow_forward, tiny_dir  # noqa: F401 - fixtures by name

C, CH = "/v1/completions", "/v1/chat/completions"
MAX_PROMPT = 16
BODY_LIMIT = 1 << 14


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    return err


@pytest.fixture(scope="module")
def client(loaded) -> Iterator[TestClient]:  # noqa: F811 - the fixture imported above
    app = create_app(*loaded, MODEL_ID, max_prompt_tokens=MAX_PROMPT, max_body_bytes=BODY_LIMIT)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


def post_raw(client: TestClient, path: str, raw: str) -> httpx.Response:
    """POST a JSON text as is (NaN, Infinity and lone-surrogate escapes are what the probe sends)."""
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


# ------------------------------------------------------------------------- inputs that used to reach a 500


@pytest.mark.parametrize("path, raw, param", [
    (C, '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),  # was 500: the tokenizer cannot encode it
    (C, '{"prompt": ["a\\udfffb"], "max_tokens": 2}', "prompt"),
    (CH, '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', "messages.0.content"),
    (CH, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 2}',
     "messages.0.content"),
    (C, '{"prompt": "hi", "stop": "\\ud800", "max_tokens": 2}', "stop"),
    (C, '{"model": "\\ud800", "prompt": "hi"}', "model"),  # was 500: the 404 quoting it could not be encoded
    (C, '{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', "temperature"),
    (C, '{"prompt": "hi", "max_tokens": 2, "top_p": NaN}', "top_p"),
    (C, '{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}', "temperature"),
    (C, '{"prompt": "hi", "max_tokens": 2, "presence_penalty": NaN}', "presence_penalty"),
    (C, '{"prompt": "hi", "max_tokens": 2, "seed": 9223372036854775808}', "seed"),  # was 500: torch's seed range
    (C, '{"prompt": "hi", "max_tokens": 2, "seed": -9223372036854775809}', "seed"),
    (C, '{"prompt": "hi", "max_tokens": 2, "seed": 1e308}', "seed"),
    (C, '{"prompt": "hi", "max_tokens": 9223372036854775808}', "max_tokens"),
    (C, '{"prompt": "hi", "max_tokens": 1e308}', "max_tokens"),
    (C, '{"prompt": "hi", "max_tokens": true}', "max_tokens"),
    (C, '{"prompt": "hi", "max_tokens": 2, "top_k": 9223372036854775808}', "top_k"),
    (C, '{"prompt": "hi", "max_tokens": 2, "stream": "yes"}', "stream"),
    (C, '{"prompt": "hi", "max_tokens": 2, "stop": ["' + "a" * 2000 + '"]}', "stop"),
    (C, '{"prompt": [[9223372036854775808]], "max_tokens": 2}', "prompt"),
    (C, '{"prompt": [-1], "max_tokens": 2}', "prompt"),
    (C, '{"prompt": [[]], "max_tokens": 2}', "prompt"),
    (C, '{"prompt": {"a": 1}}', "prompt"),
    (C, '{"prompt": ' + "[" * 2000 + "]" * 2000 + "}", None),  # nested deeper than the parser recurses
    (C, '{"prompt": "hi", "max_tokens": 1' + "0" * 5000 + "}", None),  # more digits than Python parses
    (CH, '{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}], "max_tokens": 2, "stream_options": '
         '{"include_usage": "yes"}}', "stream_options.include_usage"),
])
def test_bad_values_get_400_naming_the_field(client, path, raw, param):
    err = error_of(post_raw(client, path, raw), 400)
    assert err["param"] == param, err
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("raw", [
    '{"prompt": "a\\u0000b\\u2028\\uffff\\ud83d\\ude00", "max_tokens": 2}',  # NUL, separators, a valid pair
    '{"prompt": "hi", "max_tokens": 2, "temperature": 1e-300}',  # was 500: float32 logits / 1e-300 = inf
    '{"prompt": "hi", "max_tokens": 2, "temperature": 5e-324, "top_p": 5e-324}',
    '{"prompt": "hi", "max_tokens": 2, "temperature": -0.0, "seed": -9223372036854775808}',
    '{"prompt": "hi", "max_tokens": 2, "seed": 9223372036854775807, "top_k": 9223372036854775807}',
    '{"prompt": [[1, 2, 3]], "max_tokens": 2, "n": 1, "presence_penalty": -0.0, "user": {"deep": [[[{}]]]}}',
])
def test_edge_values_that_are_valid_generate(client, raw):
    r = post_raw(client, C, raw)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-7])
def test_tiny_temperatures_sample_the_best_token(temperature):
    logits = torch.tensor([0.0, 3.0, -1e4, 2.9999, float("-inf")])
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=1e-300)
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, params, gen) for _ in range(20)} == {1}


def test_invalid_utf8_and_non_json_bodies(client):
    r = client.post(C, content=b'{"prompt": "\xff\xfe", "max_tokens": 2}', headers={"content-type": "application/json"})
    error_of(r, 400)
    r = client.post(C, content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
    error_of(r, 400)


# ----------------------------------------------------------------------------------------- prompt tokens


def count_calls(monkeypatch, tok) -> list[int]:
    """Count the tokenizer's encode calls (chat templates end in encode too)."""
    calls: list[int] = []
    encode = tok.encode

    def spy(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", spy)
    return calls


@pytest.fixture(scope="module")
def nfkc_tokenizer(loaded):  # noqa: F811
    """The tiny tokenizer with an NFKC normalizer in front, which can shrink a text before it is split."""
    import copy

    from tokenizers import normalizers

    tok = copy.deepcopy(loaded[1])
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    return tok


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(text=st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=300),
                      st.sampled_from(["\u1100\u1161\u11a8" * 50, "e\u0301" * 80, "\ufdfa" * 20, " " * 500,
                                       "<eos>" * 40])))
def test_bytes_per_token_bound_holds(loaded, nfkc_tokenizer, text):  # noqa: F811
    """Every text has at least ceil(bytes / bound) tokens, with and without a normalizer that shrinks text."""
    for tok in (loaded[1], nfkc_tokenizer):
        bound = bytes_per_token_bound(tok)
        assert len(tok.encode(text)) >= -(-len(text.encode()) // bound), (bound, text)
    assert bytes_per_token_bound(nfkc_tokenizer) == 4 * bytes_per_token_bound(loaded[1])


def test_prompt_token_limit(client):
    err = error_of(client.post(C, json={"prompt": "fox " * 40, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded" and f"{MAX_PROMPT}" in err["message"]
    err = error_of(client.post(C, json={"prompt": list(range(MAX_PROMPT + 1)), "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": "fox " * 40}]
    err = error_of(client.post(CH, json={"messages": messages, "max_tokens": 1}), 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert client.post(C, json={"prompt": list(range(MAX_PROMPT)), "max_tokens": 1}).status_code == 200


def test_hopelessly_long_prompt_is_refused_without_tokenizing(client, loaded, monkeypatch):  # noqa: F811
    engine = client.app.state.engine
    calls = count_calls(monkeypatch, loaded[1])
    too_many = MAX_PROMPT * engine.bytes_per_token + 1  # at least MAX_PROMPT + 1 tokens, whatever the text
    assert too_many < BODY_LIMIT - 100  # fits the body: the token check, not the body limit, refuses it
    for path, body in ((C, {"prompt": "x" * too_many}),
                       (CH, {"messages": [{"role": "user", "content": "x" * too_many}], "max_tokens": 1})):
        err = error_of(client.post(path, json=body), 400)
        assert err["code"] == "context_length_exceeded" and "bytes" in err["message"]
    assert calls == []
    client.post(C, json={"prompt": "x" * (MAX_PROMPT - 4), "max_tokens": 1})  # a short text is tokenized
    assert calls == [1]


def test_full_queue_refuses_before_tokenizing(loaded, monkeypatch):  # noqa: F811
    """With the only slot busy and no queue, a request gets 429 without its prompt ever being tokenized."""
    with running_server(*loaded, max_queue=0) as (base, app), slow_forward(loaded[0], 0.02):
        body = {"model": MODEL_ID, "prompt": "fox", "max_tokens": 240, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection, which cancels the job
            next(lines)  # generating now
            calls = count_calls(monkeypatch, loaded[1])
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "fox jumps", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 429 and calls == [], (refused.text, app.state.engine.stats)


# ------------------------------------------------------------------------------------------- body size


@pytest.fixture(scope="module")
def small_body_server(loaded):  # noqa: F811
    with running_server(*loaded, max_body_bytes=BODY_LIMIT) as (base, _):
        yield base


def chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    """A JSON body sent chunked (no Content-Length): a prompt of ``total`` bytes."""
    yield b'{"max_tokens": 2, "prompt": "'
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)
    yield b'"}'


def test_declared_body_over_the_limit_gets_413(small_body_server):
    with httpx.Client(base_url=small_body_server, timeout=30) as http:
        for size in (BODY_LIMIT + 1, 20 << 20):
            t0 = time.monotonic()
            r = http.post(C, content=b"x" * size, headers={"content-type": "application/json"})
            err = error_of(r, 413)
            assert err["code"] == "request_too_large" and str(BODY_LIMIT) in err["message"]
            assert time.monotonic() - t0 < 20
        r = http.post(C, json={"prompt": "fox", "max_tokens": 2})  # the server still answers on this client
        assert r.status_code == 200


def test_chunked_body_over_the_limit_gets_413(small_body_server):
    with httpx.Client(base_url=small_body_server, timeout=30) as http:
        r = http.post(C, content=chunks(BODY_LIMIT * 3), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert error_of(r, 413)["code"] == "request_too_large"
        r = http.post(C, content=chunks(200), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_body_limit_comes_before_routing_and_parsing(small_body_server):
    for path in ("/nope", "/health", CH):
        r = httpx.post(small_body_server + path, content=b"{" * (BODY_LIMIT + 10), timeout=30)
        assert error_of(r, 413)["code"] == "request_too_large"


def test_concurrent_huge_bodies_do_not_block_good_requests(small_body_server):
    results: list[int] = []

    def huge() -> None:
        results.append(httpx.post(small_body_server + C, content=b"x" * (4 << 20), timeout=60).status_code)

    threads = [threading.Thread(target=huge) for _ in range(4)]
    for t in threads:
        t.start()
    assert httpx.post(small_body_server + C, json={"prompt": "fox", "max_tokens": 2}, timeout=30).status_code == 200
    for t in threads:
        t.join(60)
    assert results == [413] * 4


@pytest.mark.parametrize("field", [{"logit_bias": {"42": 100}}, {"best_of": 3}])
def test_parameters_that_change_the_output_are_refused_not_ignored(field: dict) -> None:
    from lowbit.serve.schema import CompletionRequest

    with pytest.raises(ValueError, match="not supported|must be 1"):
        CompletionRequest(prompt="hi", **field)
    CompletionRequest(prompt="hi", logit_bias={}, best_of=1)  # the neutral values stay accepted
