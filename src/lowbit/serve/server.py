"""OpenAI-compatible HTTP API over one loaded model: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

How requests flow, and why:

* The event loop only validates, tokenizes (in the thread pool) and streams; forward passes run on a
  ``ThreadPoolExecutor`` of ``max_concurrency`` workers, so the server keeps answering (429s, /health, other
  streams) while a model runs.
* Admission: a request that would have to wait for a generation slot while ``max_queue`` others already wait is
  refused at once with 429 + ``Retry-After`` instead of piling up.
* A slot belongs to the job's worker thread from start to finish and is released by that thread (not by the HTTP
  handler), so a cancelled job never overlaps the next one: forward passes stay at ``max_concurrency`` at most.
* Cancellation: every job has an Event polled before each forward pass; it is set when the client disconnects
  (closed stream, or a polled check while a non-streaming client waits), and on server shutdown.
* Shutdown (SIGINT/SIGTERM, handled by uvicorn): stop accepting connections, let in-flight requests finish for up
  to ``shutdown_timeout`` seconds, then cancel them; the lifespan hook finally stops the worker threads.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.serve.generate import (
    SamplingParams,
    TextStream,
    context_length,
    encode_chat,
    encode_prompt,
    use_weight_cache,
)

POLL_SECONDS = 0.25  # how often a waiting request checks whether its client is still there
RETRY_AFTER_SECONDS = 1
CLIENT_CLOSED = 499  # nginx's convention; nobody reads it, the client is gone

IsDisconnected = Callable[[], Awaitable[bool]]


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def _queue_full() -> ApiError:
    return ApiError(429, "The server is busy: too many requests are waiting. Retry later.", type_="requests",
                    code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 list of pydantic errors -> one OpenAI-style 400 naming the first bad parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "invalid JSON")
        return ApiError(400, f"We could not parse the JSON body of your request ({detail}).", code="invalid_json")
    # Drop "body" and pydantic's union-branch names ("str", "list[int]") from the location.
    loc = [str(p) for p in first["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in ("str", "int")))]
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        if not param:
            return ApiError(400, "The request body is empty: send a JSON object.", code="missing_body")
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return ApiError(400, f"Invalid value for '{param}': {msg}." if param else f"Invalid request body: {msg}.",
                    param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields (user, metadata, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # optional here (curl convenience); when given it must name the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI; vLLM-style extension
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        return v

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]] | None) -> str | None:
        """Content parts (``[{"type": "text", "text": ...}]``) are joined; images and audio are refused."""
        if not isinstance(v, list):
            return v
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(p["text"] for p in v)

    def as_dict(self) -> dict[str, str]:
        text = self.content or ""
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v


# ------------------------------------------------------------------------------------------- the engine


class QueueFullError(Exception):
    pass


class Job:
    """One generation on a worker thread; its text deltas come back to the event loop through an asyncio queue."""

    _DONE = object()

    def __init__(self, stream: TextStream, stopping: threading.Event, on_finish: Callable[[Job], None]):
        self.stream = stream
        self._cancel = threading.Event()
        stream.should_stop = lambda: self._cancel.is_set() or stopping.is_set()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._on_finish = on_finish
        self.client_gone = False

    def cancel(self) -> None:
        self._cancel.set()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (end of shutdown): nobody is listening any more
            pass

    def run(self) -> None:
        """Worker-thread body: generate, forward deltas, hand the slot back however it ends."""
        try:
            for delta in self.stream:
                self._put(delta)
            self._put(self._DONE)
        except Exception as e:  # noqa: BLE001 - reported to the waiting request, which answers 500
            self._put(e)
        finally:
            try:
                self._loop.call_soon_threadsafe(self._on_finish, self)
            except RuntimeError:
                pass

    async def deltas(self, is_disconnected: IsDisconnected | None = None) -> AsyncIterator[str]:
        """Text deltas until the job ends. With ``is_disconnected``, the client is checked while waiting and the
        job cancelled (iteration ends, ``client_gone`` set) when it has left."""
        while True:
            if is_disconnected is None:
                item = await self._queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self._queue.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        self.client_gone = True
                        self.cancel()
                        return
                    continue
            if item is self._DONE:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class Engine:
    """Owns the model: admission (bounded queue), generation slots and worker threads."""

    def __init__(self, model: nn.Module, tokenizer: object, max_concurrency: int = 1, max_queue: int = 16):
        if max_concurrency < 1 or max_queue < 0:
            raise LowbitError("max_concurrency must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._slots = asyncio.Semaphore(max_concurrency)  # binds to the serving loop on first use
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="lowbit-generate")
        self._stopping = threading.Event()
        self.waiting = 0
        self.running = 0
        self.stats: Counter[str] = Counter()  # finish reasons, "refused", "failed"

    async def acquire(self, is_disconnected: IsDisconnected) -> bool:
        """Wait for a slot: True once held, False if the client left meanwhile; QueueFullError when too many wait."""
        if self._stopping.is_set():
            raise _shutting_down()
        if self._slots.locked() and self.waiting >= self.max_queue:
            self.stats["refused"] += 1
            raise QueueFullError
        self.waiting += 1
        task = asyncio.ensure_future(self._slots.acquire())
        acquired = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                if done:
                    acquired = True
                    return True
                if await is_disconnected():
                    return False
        finally:
            self.waiting -= 1
            if not acquired:  # gave up (client gone, or this handler was cancelled): don't leak a won slot
                task.cancel()
                task.add_done_callback(lambda t: None if t.cancelled() else self._slots.release())

    def start(self, stream: TextStream) -> Job:
        """Run ``stream`` on a worker thread; the caller must hold a slot, which passes to the job."""
        job = Job(stream, self._stopping, self._finished)
        self.running += 1
        try:
            self._executor.submit(job.run)
        except RuntimeError:  # executor shut down: we are stopping
            self._finished(job)
            raise _shutting_down() from None
        return job

    def _finished(self, job: Job) -> None:
        self.running -= 1
        self.stats[job.stream.finish_reason or "failed"] += 1
        self._slots.release()

    async def close(self) -> None:
        """Cancel every job and wait for the worker threads (each stops before its next forward pass)."""
        self._stopping.set()
        await run_in_threadpool(self._executor.shutdown, True, cancel_futures=True)


# ------------------------------------------------------------------------------------ response shapes


class _Shape:
    """OpenAI's response and stream-chunk objects for one endpoint."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model_id: str):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id

    def _envelope(self, name: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}

    def first_chunks(self) -> list[dict]:
        return []

    def chunk(self, text: str | None, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        raise NotImplementedError

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope(self.chunk_name, [], usage=usage)


class _CompletionShape(_Shape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def chunk(self, text: str | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_name, [choice])

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage)


class _ChatShape(_Shape):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def first_chunks(self) -> list[dict]:  # OpenAI announces the role in a first, content-less chunk
        return [self._envelope(self.chunk_name, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}])]

    def chunk(self, text: str | None, finish_reason: str | None) -> dict:
        delta = {} if text is None else {"content": text}
        return self._envelope(self.chunk_name, [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}])

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage)


def _usage(stream: TextStream) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class _JobStreamingResponse(StreamingResponse):
    """A streaming response that cancels its job however the response ends (done, disconnect, shutdown)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _sse(job: Job, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in shape.first_chunks():
            yield _event(chunk)
        async for delta in job.deltas():
            yield _event(shape.chunk(delta, None))
        reason = job.stream.finish_reason
        if reason == "cancelled":  # only the server cancels a stream whose client is still reading: shutdown
            yield _event(_shutting_down().payload())
        else:
            yield _event(shape.chunk(None, reason))
            if include_usage:
                yield _event(shape.usage_chunk(_usage(job.stream)))
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        yield _event({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                "code": None}})
    yield _event("[DONE]")


# ------------------------------------------------------------------------------------------------ the app


def create_app(model: nn.Module, tokenizer: object, model_id: str, max_concurrency: int = 1,
               max_queue: int = 16, weight_cache: bool = True) -> FastAPI:
    """The FastAPI app serving ``model`` under the name ``model_id``; ``app.state.engine`` holds the Engine.

    ``weight_cache`` keeps quantized layers' dequantized weights in memory (see ``use_weight_cache``).
    """
    use_weight_cache(model, weight_cache)
    engine = Engine(model, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue)
    ctx = context_length(model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.close()

    app = FastAPI(title="lowbit", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LowbitError)
    async def _bad_input(request: Request, exc: LowbitError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "lowbit"}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict:
        check_model(name)
        return model_card()

    def sampling(req: _Sampling, max_tokens: int | None, default_max: int | None, n_prompt: int, param: str,
                 extra_stop: Sequence[str] = ()) -> SamplingParams:
        """Check lengths against the context (OpenAI's 400s) and build the sampling parameters.

        ``max_tokens`` is what the client asked for (checked strictly); ``default_max`` applies when it asked for
        nothing (None: fill the context, as OpenAI's chat does), and is trimmed to the room left.
        """
        if ctx is not None and n_prompt >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the {param} has "
                                f"{n_prompt} tokens. Please shorten it.", param=param, code="context_length_exceeded")
        if ctx is not None and max_tokens is not None and n_prompt + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {param} or the completion.",
                           param="max_tokens", code="context_length_exceeded")
        room = ctx - n_prompt if ctx is not None else None
        if max_tokens is not None:
            budget = max_tokens
        elif default_max is not None:
            budget = min(default_max, room) if room is not None else default_max
        else:
            budget = room if room is not None else 256
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        return SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p, top_k=req.top_k or 0,
                              seed=req.seed, stop=tuple(dict.fromkeys((*req.stop_list(), *extra_stop))))

    async def respond(request: Request, req: _Sampling, shape: _Shape, prompt_ids: list[int],
                      params: SamplingParams) -> Response:
        stream = TextStream(model, tokenizer, prompt_ids, params)
        try:
            if not await engine.acquire(request.is_disconnected):
                return Response(status_code=CLIENT_CLOSED)
        except QueueFullError:
            raise _queue_full() from None
        job = engine.start(stream)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStreamingResponse(_sse(job, shape, include_usage), job)
        try:
            text = "".join([d async for d in job.deltas(request.is_disconnected)])
        finally:
            job.cancel()  # no-op when finished; stops the thread if this handler is cancelled (shutdown)
        if job.client_gone:
            return Response(status_code=CLIENT_CLOSED)
        if stream.finish_reason == "cancelled":
            raise _shutting_down()
        return JSONResponse(shape.body(text, stream.finish_reason, _usage(stream)))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(
            req.prompt[0], str | list) else req.prompt
        if isinstance(prompt, str):
            ids = await run_in_threadpool(encode_prompt, tokenizer, prompt)
        else:
            ids = list(prompt)
            vocab = model.get_input_embeddings().num_embeddings
            if not ids or any(not 0 <= i < vocab for i in ids):
                raise ApiError(400, f"token-id prompts must be non-empty with ids in [0, {vocab})", param="prompt")
        params = sampling(req, req.max_tokens, 16, len(ids), "prompt")  # OpenAI's default for completions: 16
        return await respond(request, req, _CompletionShape(model_id), ids, params)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        check_model(req.model)
        messages = [m.as_dict() for m in req.messages]
        try:
            ids, extra_stop = await run_in_threadpool(encode_chat, tokenizer, messages)
        except LowbitError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, max_tokens, None, len(ids), "messages", extra_stop)
        return await respond(request, req, _ChatShape(model_id), ids, params)

    return app


def serve(model: nn.Module, tokenizer: object, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          max_concurrency: int = 1, max_queue: int = 16, shutdown_timeout: int = 10,
          log_level: str = "info", weight_cache: bool = True) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_timeout`` seconds to finish."""
    import uvicorn

    app = create_app(model, tokenizer, model_id, max_concurrency=max_concurrency, max_queue=max_queue,
                     weight_cache=weight_cache)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once it has shut down; by then everything
    # is stopped, so end quietly (exit status 0) instead of dying from the re-raised SIGTERM or KeyboardInterrupt.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
