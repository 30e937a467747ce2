"""OpenAI-compatible HTTP API over one loaded model: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

The wire format lives in ``lowbit.serve.schema``, the scheduling in ``lowbit.serve.engine``. Here:

* ``lowbit.serve.guard`` runs first: Host/Origin allow-list, API key and body size, before any parsing.
* The event loop only validates and streams; tokenizing runs on threads and forward passes on the engine's worker
  threads, so the server keeps answering (429s, /health, other streams) while a model runs.
* Order of the checks on a prompt, cheapest first: its byte count against ``max_prompt_tokens``, room in the
  queue, tokenizing, its token count, the context; only then does it wait for a generation slot.
* A client that disconnects cancels its job: a streaming response cancels it however the response ends, and a
  non-streaming request polls for the client while it waits.
* Shutdown (SIGINT/SIGTERM, ``LowbitServer``): uvicorn stops accepting connections; queued requests get 503 at
  once; in-flight requests get ``shutdown_timeout`` seconds, then streams end with the shutdown error event and
  ``data: [DONE]`` and other requests get 503, before uvicorn's own deadline (``SHUTDOWN_MARGIN_SECONDS`` later)
  would cut them; the lifespan hook finally stops the engine's worker threads.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.serve import SERVE_EXTRA_HINT
from lowbit.serve.engine import Engine, Job, QueueFullError, RequestError, ShuttingDownError
from lowbit.serve.generate import (
    SamplingParams,
    context_length,
    encode_chat,
    encode_prompt,
    fast_by_default,
    fast_or_loop,
)
from lowbit.serve.guard import (
    DEFAULT_MAX_BODY_BYTES,
    LOOPBACK_NAMES,
    AllowedHosts,
    BodyTooLargeError,
    Guard,
    body_too_large,
)
from lowbit.serve.schema import (
    ApiError,
    ChatRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    ResponseShape,
    SamplingRequest,
    queue_full_error,
    shutting_down_error,
    token_usage,
    validation_error,
)

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise LowbitError(SERVE_EXTRA_HINT) from e

CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the client is gone
SHUTDOWN_MARGIN_SECONDS = 5.0  # uvicorn's deadline after ours: time to send the answers of aborted requests


# ---------------------------------------------------------------------------------------------- errors


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.payload(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error_response(ApiError(400, str(exc), param=exc.param, code=exc.code))


async def _bad_input(request: Request, exc: LowbitError) -> JSONResponse:
    return _error_response(ApiError(400, str(exc)))


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return _error_response(queue_full_error())


async def _shutting_down(request: Request, exc: ShuttingDownError) -> JSONResponse:
    return _error_response(shutting_down_error())


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(exc.errors()))


async def _too_large(request: Request, exc: BodyTooLargeError) -> JSONResponse:
    return _error_response(body_too_large(exc.limit))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(exc.status_code, str(exc.detail), type_=kind))


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))


_EXCEPTION_HANDLERS: list[tuple[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]]] = [
    (ApiError, _api_error), (RequestError, _request_error), (LowbitError, _bad_input),
    (QueueFullError, _queue_full), (ShuttingDownError, _shutting_down), (RequestValidationError, _invalid),
    (BodyTooLargeError, _too_large), (StarletteHTTPException, _http), (Exception, _crash),
]


# ------------------------------------------------------------------------------------------- streaming


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class _JobStreamingResponse(StreamingResponse):
    """A streaming response that cancels its job however the response ends (done, disconnect, shutdown)."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _sse(job: Job, shape: ResponseShape, include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in shape.first_chunks():
            yield _event(chunk)
        async for delta in job.deltas():
            yield _event(shape.chunk(delta, None))
        reason = job.stream.finish_reason
        if reason == "cancelled":  # only the server cancels a stream whose client is still reading: shutdown
            yield _event(shutting_down_error().payload())
        else:
            yield _event(shape.chunk(None, reason))
            if include_usage:
                yield _event(shape.usage_chunk(token_usage(job.stream.prompt_tokens, job.stream.completion_tokens)))
    except ShuttingDownError:  # aborted at the end of the shutdown grace period
        yield _event(shutting_down_error().payload())
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        yield _event(ApiError(500, f"generation failed: {e}", type_="server_error").payload())
    yield _event("[DONE]")


async def _whole_body(request: Request, job: Job, shape: ResponseShape) -> Response:
    """The non-streaming answer: all of the job's text in one body, unless the client left or the server stops."""
    try:
        text = "".join([d async for d in job.deltas(request.is_disconnected)])
    finally:
        job.cancel()  # no-op when finished; stops the thread if this handler is cancelled (shutdown)
    stream = job.stream
    if job.client_gone:
        return Response(status_code=CLIENT_CLOSED)
    if stream.finish_reason == "cancelled":
        raise shutting_down_error()
    return JSONResponse(shape.body(text, stream.finish_reason, token_usage(stream.prompt_tokens,
                                                                           stream.completion_tokens)))


# ------------------------------------------------------------------------------------------- endpoints


def _sampling_params(req: SamplingRequest, budget: int, extra_stop: Sequence[str]) -> SamplingParams:
    """OpenAI's defaults where the client gave nothing: temperature 1, top_p 1."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    return SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p, top_k=req.top_k or 0,
                          seed=req.seed, stop=tuple(dict.fromkeys((*req.stop_list(), *extra_stop))))


class OpenAIRoutes:
    """The endpoints for one engine serving its model under ``model_id``."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        self.engine, self.model_id = engine, model_id
        self.created = int(time.time())

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lowbit"}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(404, f"The model '{name[:200]}' does not exist; this server serves '{self.model_id}'.",
                           param="model", code="model_not_found")

    async def health(self) -> dict:
        engine = self.engine
        health = {"status": "ok", "model": self.model_id, "running": engine.running, "waiting": engine.waiting}
        if engine.decoder_cache:  # --fast: decoders free now, their cache, generations on them and past them
            health["fast"] = {"free": engine.free_decoders, "cache": engine.decoder_cache,
                              "decoded": engine.stats["fast"], "fallback": engine.stats["fast_fallback"]}
        return health

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def one_model(self, name: str) -> dict:
        self._check_model(name)
        return self._model_card()

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = await self._tokenize("prompt", _utf8_len(prompt), encode_prompt, prompt)
        else:
            self.engine.check_prompt_tokens(len(prompt), "prompt")
            ids = self.engine.check_token_ids(prompt)
        # OpenAI's default length for completions is 16 tokens.
        return await self._generate(request, req, CompletionShape(self.model_id), ids, 16, "prompt")

    async def chat_completions(self, req: ChatRequest, request: Request) -> Response:
        self._check_model(req.model)
        messages = [m.as_dict() for m in req.messages]
        # The template adds text around the messages, never removes theirs: their bytes bound the prompt's.
        n_bytes = sum(_utf8_len(m["content"]) for m in messages)
        ids, extra_stop = await self._tokenize("messages", n_bytes, encode_chat, messages)
        # OpenAI's chat fills the context unless told otherwise: no default length.
        return await self._generate(request, req, ChatShape(self.model_id), ids, None, "messages", extra_stop)

    async def _tokenize(self, what: str, n_bytes: int, fn: Callable[..., Any], *args: object) -> Any:
        """``fn(tokenizer, *args)`` once the size and the queue allow it; a tokenizer error is the input's fault."""
        engine = self.engine
        engine.check_prompt_bytes(n_bytes, what)
        try:
            result = await engine.tokenize(n_bytes, fn, engine.tokenizer, *args)
        except (QueueFullError, ShuttingDownError):
            raise
        except LowbitError as e:  # a chat template that rejects the messages, an empty prompt without BOS
            raise ApiError(400, str(e), param=what) from None
        except Exception as e:  # noqa: BLE001 - whatever else a tokenizer finds wrong with the text is the text's
            raise ApiError(400, f"The {what} could not be tokenized ({type(e).__name__}: {e}).", param=what) from None
        ids = result[0] if isinstance(result, tuple) else result
        engine.check_prompt_tokens(len(ids), what)
        return result

    async def _generate(self, request: Request, req: SamplingRequest, shape: ResponseShape, ids: list[int],
                        default_max: int | None, what: str, extra_stop: Sequence[str] = ()) -> Response:
        """Admit the request, run it, answer as a stream or as one body."""
        budget = self.engine.token_budget(len(ids), req.requested_max_tokens(), default_max, what)
        stream = self.engine.stream(ids, _sampling_params(req, budget, extra_stop))
        if not await self.engine.acquire(request.is_disconnected):
            return Response(status_code=CLIENT_CLOSED)
        job = self.engine.start(stream)
        if req.stream:
            return _JobStreamingResponse(_sse(job, shape, req.wants_usage()), job)
        return await _whole_body(request, job, shape)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------------------------ the app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await app.state.engine.close()


def create_app(model: nn.Module, tokenizer: object, model_id: str, max_concurrency: int = 1,
               max_queue: int = 16, weight_cache: bool = True, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_prompt_tokens: int | None = None, allowed_hosts: AllowedHosts | None = None,
               api_key: str | None = None, fast: bool | None = None, compile: bool = False,
               fast_cache: int | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` under the name ``model_id``; ``app.state.engine`` holds the Engine.

    ``weight_cache`` keeps quantized layers' dequantized weights in memory (see ``use_weight_cache``).
    ``max_prompt_tokens`` defaults to the model's context. ``allowed_hosts`` defaults to the loopback names on any
    port (``serve`` passes the bound address); with ``api_key`` every request but ``/health`` needs it.
    ``fast``: decode with one StaticDecoder per slot (:func:`fast_decoders`; on CUDA from the packed weights,
    without the weight cache), ``compile`` adding torch.compile, each holding ``fast_cache`` positions (default:
    the model's context, at most :data:`FAST_CACHE_DEFAULT`); generations that do not fit run the dynamic-cache
    loop. By default (None) the server decodes that way where ``compile`` or ``fast_cache`` asks for it (and on
    CUDA once :func:`serves_fast` says so), falling back to the loop with a warning where its decoders cannot be
    built (an architecture a static cache cannot serve, or no memory for the caches).
    """
    if max_body_bytes < 1:
        raise LowbitError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if (compile or fast_cache is not None) and fast is False:
        raise LowbitError("compile and fast_cache need fast decode (--fast)")
    if fast_cache is not None:  # a size that cannot work is the caller's to fix, not a reason to fall back
        fast_cache_len(model, fast_cache)
    decoders = fast_or_loop(model, serves_fast(model, fast, compile, fast_cache), fast is None, weight_cache,
                            lambda: fast_decoders(model, max_concurrency, fast_cache, compile),
                            "serving with the dynamic cache: no fast decoders for this model") or []
    engine = Engine(model, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue,
                    max_prompt_tokens=max_prompt_tokens, decoders=decoders)
    routes = OpenAIRoutes(engine, model_id)
    app = FastAPI(title="lowbit", version=__version__, lifespan=_lifespan)
    app.state.engine = engine
    app.state.model_id = model_id
    hosts = allowed_hosts if allowed_hosts is not None else AllowedHosts(LOOPBACK_NAMES)
    app.add_middleware(Guard, hosts=hosts, api_key=api_key, max_body_bytes=max_body_bytes)
    for exc_class, handler in _EXCEPTION_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", routes.one_model, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


def serves_fast(model: nn.Module, fast: bool | None, compile: bool = False, fast_cache: int | None = None) -> bool:
    """Whether the server decodes with StaticDecoders (:func:`fast_by_default`): by default for a model on CUDA
    (``"serve_fast"`` put back in ``verified.GPU_UNVERIFIED`` makes the loop the default there again), elsewhere
    where ``fast``, ``compile`` or ``fast_cache`` asks for it."""
    from lowbit.kernels import verified

    on_cuda = "serve_fast" not in verified.GPU_UNVERIFIED
    return fast_by_default(model, fast, compile or fast_cache is not None, on_cuda=on_cuda)


# Static KV cache of a fast decoder when the model's context is longer (or unknown): a 7B model's fp16 cache takes
# 0.5 MB a position, and a step reads only the positions written so far.
FAST_CACHE_DEFAULT = 4096


def fast_cache_len(model: nn.Module, cache: int | None = None) -> int:
    """Positions of each fast decoder's static cache: ``cache`` checked against the model's context, by default
    the context, at most :data:`FAST_CACHE_DEFAULT`."""
    context = context_length(model)
    cache = cache if cache is not None else min(context or FAST_CACHE_DEFAULT, FAST_CACHE_DEFAULT)
    if cache < 2:
        raise LowbitError(f"the fast decoder's cache needs >= 2 positions, got {cache}")
    if context is not None and cache > context:
        raise LowbitError(f"a fast decoder's cache of {cache} positions passes the model's context ({context})")
    return cache


def fast_decoders(model: nn.Module, count: int, cache: int | None = None, compile: bool = False) -> list:
    """``count`` batch-1 StaticDecoders of ``model``, each of ``cache`` positions (:func:`fast_cache_len`), warmed
    up (compiled and captured now rather than on the first request)."""
    from lowbit.serve.fast_decode import StaticDecoder

    cache = fast_cache_len(model, cache)
    decoders = [StaticDecoder(model, max_cache_len=cache, compile=compile) for _ in range(count)]
    for d in decoders:
        d.warm_up()
    return decoders


class LowbitServer(uvicorn.Server):
    """uvicorn's server plus the engine's part of a graceful shutdown: when uvicorn begins to shut down (a signal,
    or ``should_exit``), queued requests get 503 at once and running ones are ended properly after ``grace``
    seconds, before uvicorn's own deadline would cancel their tasks (a plain-text 500, a cut stream, a traceback)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0,
                 log_level: str = "info") -> None:
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=grace + SHUTDOWN_MARGIN_SECONDS))
        self.engine: Engine = app.state.engine
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.begin_shutdown(self.grace)
        await super().shutdown(sockets)


def serve(model: nn.Module, tokenizer: object, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          max_concurrency: int = 1, max_queue: int = 16, shutdown_timeout: float = 10,
          log_level: str = "info", weight_cache: bool = True, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_prompt_tokens: int | None = None, allowed_hosts: Sequence[str] = (),
          api_key: str | None = None, fast: bool | None = None, compile: bool = False,
          fast_cache: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_timeout`` seconds to finish. ``fast``,
    ``compile``, ``fast_cache``: as :func:`create_app` takes them.

    Requests must name ``host:port`` in their Host header (any loopback name when ``host`` is a loopback address,
    any IP address when it is 0.0.0.0 or ::) or one of ``allowed_hosts`` (``NAME``, ``NAME:PORT`` or ``*``).
    """
    hosts = AllowedHosts.for_bind(host, port, allowed_hosts)
    app = create_app(model, tokenizer, model_id, max_concurrency=max_concurrency, max_queue=max_queue,
                     weight_cache=weight_cache, max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                     allowed_hosts=hosts, api_key=api_key, fast=fast, compile=compile, fast_cache=fast_cache)
    server = LowbitServer(app, host=host, port=port, grace=shutdown_timeout, log_level=log_level)
    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once it has shut down; by then everything
    # is stopped, so end quietly (exit status 0) instead of dying from the re-raised SIGTERM or KeyboardInterrupt.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
