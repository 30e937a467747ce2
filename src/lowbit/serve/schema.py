"""OpenAI's wire format for ``/v1/completions`` and ``/v1/chat/completions``: request models, response and
stream-chunk objects, usage, and errors.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from lowbit.errors import LowbitError
from lowbit.serve import SERVE_EXTRA_HINT

try:
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
except ImportError as e:
    raise LowbitError(SERVE_EXTRA_HINT) from e

RETRY_AFTER_SECONDS = 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's integers are int64; torch seeds take this range too
MAX_STOP_CHARS = 1024  # a stop string is matched against every token's text: keep that work small
MAX_MESSAGE_CHARS = 2000  # errors quote the request (a model name, a Host header): never a megabyte of it
MAX_PARAM_CHARS = 200


# ---------------------------------------------------------------------------------------------- errors


def _printable(text: str, limit: int) -> str:
    """``text`` as valid UTF-8 (a lone surrogate becomes '?': JSON responses are encoded as UTF-8) and at most
    ``limit`` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


class ApiError(Exception):
    """An error answered in OpenAI's shape. Message and param are made printable here, so an error that quotes the
    request can always be sent."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = _printable(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        param = None if param is None else _printable(param, MAX_PARAM_CHARS)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def queue_full_error() -> ApiError:
    return ApiError(429, "The server is busy: too many requests are waiting. Retry later.", type_="requests",
                    code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def shutting_down_error() -> ApiError:
    return ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """FastAPI's 422 list of pydantic errors -> one OpenAI-style 400 naming the first bad parameter."""
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


def _unicode(text: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``), which no tokenizer or UTF-8 encoder takes: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains a lone surrogate (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# Strict types: a string, bool or float where OpenAI's API wants another type is refused, not converted.
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Unknown fields (user, metadata, ...) are accepted and ignored."""

    model_config = STRICT

    model: Text | None = None  # optional here (curl convenience); when given it must name the served model
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=INT64_MAX)  # not OpenAI; vLLM-style extension
    n: Int64 | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, Any] | None = None  # refused when set: ignoring it would silently change the output

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
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_max_tokens(self) -> int | None:
        """The completion length the client asked for; None when it left it to the server."""
        return self.max_tokens

    def wants_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[Int64] | list[list[Int64]]
    echo: bool | None = False
    logprobs: Int64 | None = None
    suffix: Text | None = None
    best_of: Int64 | None = None

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of must be 1 (one candidate per request)")
        return v

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

    def single_prompt(self) -> str | list[int]:
        """The one prompt, text or token ids, unwrapped from a one-element batch."""
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], str | list) else p


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]] | None) -> str | None:
        """Content parts (``[{"type": "text", "text": ...}]``) are joined; images and audio are refused."""
        if not isinstance(v, list):
            return v
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return _unicode("".join(p["text"] for p in v))

    def as_dict(self) -> dict[str, str]:
        text = self.content or ""
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)  # the newer name of max_tokens
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by this server")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------------------ response shapes


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """OpenAI's response and stream-chunk objects for one endpoint."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model_id: str) -> None:
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


class CompletionShape(ResponseShape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def chunk(self, text: str | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_name, [choice])

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage)


class ChatShape(ResponseShape):
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
