"""Property tests of lowbit serve's request handling: generated bodies (arbitrary JSON, strings with any code point,
numbers at and past float/int64 limits, nested junk, raw bytes) and headers against the in-process app on a tiny
random Llama. Whatever comes in: never a 5xx, OpenAI's error JSON for every refusal, a well-formed answer
otherwise, and /health still answers. Seeded and bounded (a few hundred requests, seconds on 2 cores)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.serve.app import create_app
from lowbit.serve.guard import LOOPBACK_NAMES, AllowedHosts
from test_serve import MODEL_ID, loaded, tiny_dir  # noqa: F401 - fixtures used by name

KEY = "sk-fuzz"
SETTINGS = {"derandomize": True, "deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# ---------------------------------------------------------------------------------------------- strategies

EDGE_NUMBERS = [0, -0.0, 1, 2, 0.5, 1.5, -1, 5e-324, 1e-300, 1e-40, 1e308, -1e308, 2**31, 2**53 + 1, 2**63 - 1,
                2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, float("nan"), float("inf"), float("-inf")]
numbers = st.one_of(st.sampled_from(EDGE_NUMBERS), st.floats(), st.integers(max_value=0),
                    st.integers(min_value=2**31))
any_char = st.characters(exclude_categories=())  # every code point, lone surrogates included
texts = st.one_of(st.text(any_char, max_size=40),
                  st.sampled_from(["", "\x00", "\ud800", "\udfff a", "<eos>", "{{ 7*7 }}", "{% endfor %}",
                                   "\u202e\ufeff\uffff", "x" * 3000, "fox " * 300]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                    max_leaves=12)
# A body is a well-typed request whose values sit at the edges of what is valid (any code point in the texts,
# 5e-324 as a temperature, seeds around int64), with up to two fields then replaced by junk: mostly-valid bodies
# reach tokenizing and sampling, which arbitrary JSON alone almost never does. Lengths stay small: short runs.
EDGE_FLOATS = [0, -0.0, 5e-324, 1e-300, 1e-40, 1e-7, 0.5, 1, 2]
temperatures = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(0, 2))
probabilities = st.one_of(st.sampled_from([f for f in EDGE_FLOATS if f <= 1]), st.floats(0, 1))
int64_edges = st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1,
                               2**64, 10**30])
token_ids = st.lists(st.one_of(st.integers(-3, 330), int64_edges), min_size=0, max_size=6)
prompts = st.one_of(texts, st.lists(texts, min_size=1, max_size=2), token_ids, st.lists(token_ids, max_size=2))
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "User"])
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]), "text": texts}),
                 max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={"content": st.one_of(texts, parts, st.none())}),
                    min_size=1, max_size=3)
SAMPLING = {"model": st.one_of(st.just(MODEL_ID), texts), "temperature": temperatures, "top_p": probabilities,
            "top_k": st.one_of(st.integers(0, 400), int64_edges), "seed": st.one_of(st.integers(), int64_edges),
            "n": st.just(1), "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "stop": st.one_of(texts, st.lists(texts, max_size=5)), "presence_penalty": st.sampled_from([0, -0.0]),
            "frequency_penalty": st.sampled_from([0, -0.0]), "user": junk}


@st.composite
def bodies(draw: st.DrawFn, required: dict, optional: dict) -> dict:
    body = draw(st.fixed_dictionaries(required, optional=optional))
    for key in draw(st.lists(st.sampled_from(sorted({*required, *optional})), max_size=2, unique=True)):
        body[key] = draw(st.one_of(numbers, junk))
    return body


completion_bodies = bodies({"prompt": prompts}, {**SAMPLING, "max_tokens": st.integers(1, 3),
                                                 "echo": st.just(False), "suffix": st.none()})
chat_bodies = bodies({"messages": messages, "max_tokens": st.integers(1, 3)},
                     {**SAMPLING, "max_completion_tokens": st.integers(1, 3), "logprobs": st.just(False)})
header_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
LOOPBACK = AllowedHosts(LOOPBACK_NAMES)  # what create_app allows by default


# ------------------------------------------------------------------------------------------------ checks


@pytest.fixture(scope="module")
def client(loaded) -> Iterator[TestClient]:  # noqa: F811 - the fixture imported above
    with TestClient(create_app(*loaded, MODEL_ID), base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture(scope="module")
def keyed(loaded) -> Iterator[TestClient]:  # noqa: F811
    with TestClient(create_app(*loaded, MODEL_ID, api_key=KEY), base_url="http://127.0.0.1:8000") as c:
        yield c


def check_answer(r: httpx.Response) -> None:
    """No 5xx; an error is OpenAI's JSON; a success is a complete completion or a stream ending in [DONE]."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
        assert err["param"] is None or isinstance(err["param"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""] and not any('"error"' in e for e in events), r.text[-500:]
    else:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")


def post(client: TestClient, path: str, body: object, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals and \\ud800 escapes, as sent on a wire
    check_answer(client.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})}))
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------------- tests


@settings(max_examples=80, **SETTINGS)
@given(body=completion_bodies)
def test_fuzz_completions(client, body):
    post(client, "/v1/completions", body)


@settings(max_examples=80, **SETTINGS)
@given(body=chat_bodies)
def test_fuzz_chat_completions(client, body):
    post(client, "/v1/chat/completions", body)


@settings(max_examples=40, **SETTINGS)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=junk)
def test_fuzz_arbitrary_json(client, path, body):
    post(client, path, body)


@settings(max_examples=30, **SETTINGS)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models/x"]), raw=st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_fuzz_raw_bytes(client, path, raw, content_type):
    check_answer(client.post(path, content=raw, headers={"content-type": content_type}))
    assert client.get("/health").status_code == 200


def expected_status(host: str, origin: str | None, auth: str) -> int:
    """The guard's order: Host, then Origin, then the key."""
    scheme, _, token = auth.strip().partition(" ")
    if not LOOPBACK.allows_host(host):
        return 421
    if origin is not None and not LOOPBACK.allows_origin(origin, host):
        return 403
    return 200 if scheme.lower() == "bearer" and token.strip() == KEY else 401


@settings(max_examples=40, **SETTINGS)
@given(host=st.one_of(st.just("127.0.0.1:8000"), st.just("localhost"), header_values),
       origin=st.one_of(st.none(), st.just("http://localhost:3000"), header_values),
       auth=st.one_of(st.just(f"Bearer {KEY}"), header_values.map(lambda v: f"Bearer {v}"), header_values))
def test_fuzz_headers(keyed, host, origin, auth):
    headers = {"host": host, "authorization": auth, **({"origin": origin} if origin is not None else {})}
    r = keyed.post("/v1/completions", json={"prompt": "fox", "max_tokens": 1}, headers=headers)
    check_answer(r)
    assert r.status_code == expected_status(host, origin, auth), (headers, r.text)
    assert keyed.get("/health").status_code == 200
