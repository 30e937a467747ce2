"""The checks every request passes before it reaches a route: Host and Origin allow-list, API key, body size.

A pure ASGI middleware (``Guard``), so a refused request costs no body parsing, no validation and no model time:

* **Host** (DNS rebinding): a web page on ``evil.example`` can make its name resolve to 127.0.0.1 and read a local
  server with the victim's browser; the browser still sends ``Host: evil.example``. Only the names this server was
  bound to (``AllowedHosts.for_bind``) or given (``--allowed-host``) are answered; others get 421.
* **Origin** (cross-site requests): a page on any site can POST to a local server (a "simple" request needs no
  CORS preflight); browsers send ``Origin`` with it. A request carrying an Origin that is neither this server nor
  an allowed name gets 403. Clients that are not browsers send no Origin and are not affected.
* **API key**: with ``api_key`` set, every request except ``GET /health`` needs ``Authorization: Bearer KEY``
  (what OpenAI's clients send for ``api_key``); others get 401.
* **Body size**: a declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body is
  counted while it is read and refused once it passes the limit (413). uvicorn discards the rest of an unread
  body, so the client still reads the 413 on an open connection.

Every refusal is OpenAI's error JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from lowbit.errors import LowbitError
from lowbit.serve import SERVE_EXTRA_HINT
from lowbit.serve.schema import ApiError

try:
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
except ImportError as e:
    raise LowbitError(SERVE_EXTRA_HINT) from e

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far above any context this server runs
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = frozenset({"/health"})  # answered without an API key (load balancers, liveness probes)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# name[:port]: a bracketed IPv6 literal or a name without brackets, colons, slashes, '@' or spaces.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^\[\]:/@\s]+)(?::(\d{1,5}))?")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``'Name:8000'`` -> ``('name', 8000)``, ``'[::1]'`` -> ``('[::1]', None)``; None when malformed."""
    m = _HOST.fullmatch(value.strip().lower())
    if m is None:
        return None
    port = int(m[2]) if m[2] else None
    return (m[1], port) if port is None or port <= 65535 else None


def is_ip_literal(name: str) -> bool:
    """An IPv4 address or a bracketed IPv6 one: a Host no DNS rebinding can produce."""
    bare = name[1:-1] if name.startswith("[") else name
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return False
    return (address.version == 6) == name.startswith("[")


def _host_name(bind_host: str) -> str:
    """How a bind address appears in a Host header (IPv6 in brackets)."""
    return f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host.lower()


class AllowedHosts:
    """Which Host headers (and Origin hosts) a server answers.

    Entries are ``name`` (any port), ``name:port`` (that port only) or ``*`` (no check). ``any_ip_port``: also any
    IP literal at that port (a server bound to every interface is reached by each interface's address).
    """

    def __init__(self, entries: Iterable[str], any_ip_port: int | None = None) -> None:
        self.anything = False
        self.names: set[str] = set()  # allowed with any port
        self.pairs: set[tuple[str, int]] = set()
        for entry in entries:
            self._add(entry)
        self.any_ip_port = any_ip_port

    def _add(self, entry: str) -> None:
        if entry.strip() == "*":
            self.anything = True
            return
        parsed = split_host(entry)
        if parsed is None:
            raise LowbitError(f"not a host name: {entry!r} (expected NAME or NAME:PORT)")
        name, port = parsed
        if port is None:
            self.names.add(name)
        else:
            self.pairs.add((name, port))

    @classmethod
    def for_bind(cls, bind_host: str, port: int, extra: Iterable[str] = ()) -> AllowedHosts:
        """The bound address with its port; with loopback also the other loopback names; port 0 (picked by the
        OS) allows any port."""
        name = _host_name(bind_host)
        wildcard = name in ("0.0.0.0", "[::]", "")
        loopback = wildcard or name in LOOPBACK_NAMES or (is_ip_literal(name) and _is_loopback(name))
        names = [name] if not wildcard else []
        names += list(LOOPBACK_NAMES) if loopback else []
        entries = [n if port == 0 else f"{n}:{port}" for n in names]
        return cls([*entries, *extra], any_ip_port=(port or None) if wildcard else None)

    def allows_host(self, value: str | None) -> bool:
        """Whether a request with this Host header is answered (no port means HTTP's default, 80)."""
        parsed = split_host(value) if value else None
        if self.anything:
            return True
        if parsed is None:
            return False
        name, port = parsed[0], 80 if parsed[1] is None else parsed[1]
        if name in self.names or (name, port) in self.pairs:
            return True
        return port == self.any_ip_port and is_ip_literal(name)

    def allows_origin(self, origin: str, host: str | None) -> bool:
        """Whether a browser request from ``origin`` is answered: the server's own origin, or an allowed name on
        any port (``http://localhost:3000``, a local web UI, calling a server bound to loopback)."""
        scheme, sep, rest = origin.partition("://")
        parsed = split_host(rest) if sep and scheme in ("http", "https") else None
        if self.anything:
            return True
        if parsed is None:  # "null" (sandboxed frames, file://) or junk
            return False
        if host is not None and parsed == split_host(host):
            return True
        return parsed[0] in self.names or any(parsed[0] == name for name, _ in self.pairs)


def _is_loopback(name: str) -> bool:
    return ipaddress.ip_address(name.strip("[]")).is_loopback


# ------------------------------------------------------------------------------------------------ errors


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when a body without a declared length passes the limit; FastAPI lets it through
    body parsing (it re-raises HTTPExceptions), and the app's handler answers ``body_too_large(limit)``."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"limit {limit} bytes")
        self.limit = limit


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                    code="request_too_large")


def _bad_host(host: str | None) -> ApiError:
    return ApiError(421, f"This server does not answer for the host {host!r}; start it with --allowed-host NAME to "
                    "accept another name.", code="invalid_host")


def _bad_origin(origin: str) -> ApiError:
    return ApiError(403, f"Requests from the origin {origin!r} are not allowed; start the server with "
                    "--allowed-host NAME to accept that origin's host.", code="invalid_origin")


def _bad_key(given: bool) -> ApiError:
    message = ("Incorrect API key provided." if given else
               "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer KEY'.")
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# -------------------------------------------------------------------------------------------- middleware


class Guard:
    """ASGI middleware: Host, Origin, API key, then body size; the app sees only requests that pass."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise LowbitError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.hosts, self.max_body_bytes = app, hosts, max_body_bytes
        self._key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await JSONResponse(refusal.payload(), refusal.status, headers=refusal.headers)(scope, receive, send)
            return
        await self.app(scope, _limited(receive, self.max_body_bytes), send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        """The first check this request fails, or None."""
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.hosts.allows_host(host):
            return _bad_host(host)
        origin = headers.get("origin")
        if origin is not None and not self.hosts.allows_origin(origin, host):
            return _bad_origin(origin)
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return _bad_key("authorization" in headers)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return body_too_large(self.max_body_bytes)
        return None

    def _authorized(self, scope: Scope) -> bool:
        raw = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        scheme, _, token = raw.strip().partition(b" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key or b"")


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that counts body bytes and raises BodyTooLargeError past ``limit`` (for chunked bodies, whose
    size nobody declared)."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLargeError(limit)
        return message

    return wrapped
