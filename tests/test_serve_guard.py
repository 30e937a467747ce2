"""lowbit serve's front door: Host and Origin allow-list (DNS rebinding, cross-site requests) and the API key, with
the OpenAI client and httpx against a real server on 127.0.0.1."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest
from openai import OpenAI

from lowbit.errors import LowbitError
from lowbit.serve.guard import AllowedHosts, split_host
from test_serve import MODEL_ID, loaded, running_server, tiny_dir  # noqa: F401 - fixtures used by name

KEY = "sk-test-0123456789"
EXTRA = "api.example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == code


# ------------------------------------------------------------------------------------------- host rules


@pytest.mark.parametrize("bind, port, extra, allowed, refused", [
    ("127.0.0.1", 8000, (), ["127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000"],
     ["evil.example:8000", "localhost:8001", "localhost", "127.0.0.2:8000", "", "a b:8000", "localhost:99999"]),
    ("::1", 80, (), ["[::1]", "[::1]:80", "localhost"], ["::1", "[::1]:8000", "evil.example"]),
    ("0.0.0.0", 8000, (), ["192.168.1.5:8000", "[fe80::1]:8000", "localhost:8000"],
     ["192.168.1.5:8001", "evil.example:8000", "[192.168.1.5]:8000", "fe80::1:8000"]),
    ("10.0.0.7", 8000, (EXTRA, "other.example:9000"), ["10.0.0.7:8000", EXTRA, f"{EXTRA}:443", "other.example:9000"],
     ["localhost:8000", "127.0.0.1:8000", "other.example:8000", "10.0.0.8:8000"]),
    ("127.0.0.1", 0, (), ["localhost:1234", "127.0.0.1:5"], ["evil.example:1234"]),
    ("127.0.0.1", 8000, ("*",), ["evil.example", "anything:1"], []),
])
def test_allowed_hosts(bind, port, extra, allowed, refused):
    hosts = AllowedHosts.for_bind(bind, port, extra)
    assert all(hosts.allows_host(h) for h in allowed), [h for h in allowed if not hosts.allows_host(h)]
    assert not any(hosts.allows_host(h) for h in refused), [h for h in refused if hosts.allows_host(h)]
    assert hosts.allows_host(None) == ("*" in extra)


def test_allowed_origins():
    hosts = AllowedHosts.for_bind("127.0.0.1", 8000, [EXTRA])
    for origin in ("http://localhost:3000", "http://127.0.0.1:8000", f"https://{EXTRA}", "http://[::1]:5173"):
        assert hosts.allows_origin(origin, "127.0.0.1:8000"), origin
    for origin in ("https://evil.example", "null", "file://", "localhost:3000", "ftp://localhost", "http://"):
        assert not hosts.allows_origin(origin, "127.0.0.1:8000"), origin
    wildcard = AllowedHosts.for_bind("0.0.0.0", 8000)
    assert wildcard.allows_origin("http://192.168.1.5:8000", "192.168.1.5:8000")  # the server's own origin
    assert not wildcard.allows_origin("http://6.6.6.6", "192.168.1.5:8000")  # a page on another address


def test_split_host_and_bad_entries():
    assert split_host("Example.COM:8080") == ("example.com", 8080) and split_host("[::1]") == ("[::1]", None)
    assert split_host("a:b") is None and split_host("x:65536") is None and split_host("user@host") is None
    for bad in ("a b", "host:port", "http://x", ""):
        with pytest.raises(LowbitError, match="not a host name"):
            AllowedHosts([bad])


# -------------------------------------------------------------------------------------- against a server


@pytest.fixture(scope="module")
def guarded(loaded):  # noqa: F811 - the fixture imported above
    port = free_port()
    hosts = AllowedHosts.for_bind("127.0.0.1", port, [EXTRA])
    with running_server(*loaded, allowed_hosts=hosts, api_key=KEY, port=port) as (base, _):
        yield base


def test_openai_client_with_and_without_the_key(guarded):
    ok = OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in ok.models.list().data] == [MODEL_ID]
    assert ok.completions.create(model=MODEL_ID, prompt="fox", max_tokens=2, temperature=0).choices[0].text
    for key in ("wrong", KEY + "x", KEY[:-1]):
        bad = OpenAI(base_url=f"{guarded}/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Basic " + KEY}, {"authorization": "Bearer"}, {"authorization": "Bearer wrong"},
    {"authorization": f"bearer {KEY}x"},
])
def test_requests_without_the_key_get_401(guarded, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/docs"), ("GET", "/nope")):
        r = httpx.request(method, guarded + path, headers=headers, json={"prompt": "hi"}, timeout=10)
        assert_openai_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_scheme_is_case_insensitive(guarded):
    assert httpx.get(f"{guarded}/health", timeout=10).json()["status"] == "ok"
    auth = {"authorization": f"bearer {KEY}"}
    assert httpx.get(f"{guarded}/v1/models", headers=auth, timeout=10).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1:1"])
def test_other_hosts_get_421_even_with_the_key(guarded, host):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name; neither /health nor the API answers it."""
    auth = {"authorization": f"Bearer {KEY}"}
    for path in ("/health", "/v1/models"):
        r = httpx.get(guarded + path, headers={"host": host, **auth}, timeout=10)
        assert_openai_error(r, 421, "invalid_host")


def test_allowed_names_and_origins(guarded):
    auth = {"authorization": f"Bearer {KEY}"}
    port = guarded.rsplit(":", 1)[1]
    for host in (EXTRA, f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{guarded}/v1/models", headers={"host": host, **auth}, timeout=10).status_code == 200
    r = httpx.get(f"{guarded}/v1/models", headers={"origin": "https://evil.example", **auth}, timeout=10)
    assert_openai_error(r, 403, "invalid_origin")
    r = httpx.get(f"{guarded}/v1/models", headers={"origin": "http://localhost:3000", **auth}, timeout=10)
    assert r.status_code == 200


def test_cli_refuses_bad_flags_before_loading(capsys):
    from lowbit.cli import main

    assert main(["serve", "no-such-model-dir", "--allowed-host", "bad host"]) == 2
    assert "not a host name" in capsys.readouterr().err
    assert main(["serve", "no-such-model-dir", "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes" in capsys.readouterr().err
