"""The generation engine behind ``lowbit serve``: admission, generation slots, worker threads, cancellation.

It knows nothing of HTTP (torch and transformers are all it needs); ``lowbit.serve.app`` turns its outcomes into
OpenAI responses. How a request is scheduled, and why:

* Forward passes run on a ``ThreadPoolExecutor`` of ``max_concurrency`` workers, so the event loop keeps answering
  (refusals, health checks, other streams) while a model runs.
* Admission: a request that would have to wait for a generation slot while ``max_queue`` others already wait is
  refused at once (``QueueFullError``; the server answers 429 + ``Retry-After``) instead of piling up. The check
  runs before a prompt is tokenized too, so a full queue refuses work that costs nothing yet.
* Prompt size: ``max_prompt_tokens`` (default: the model's context) is enforced before a queue slot is taken. A
  text too long for it whatever its tokens is refused from its byte count without tokenizing (no token covers
  more bytes than its vocabulary string spells, ``bytes_per_token_bound``); others are tokenized on a thread,
  large ones ``TOKENIZE_AT_ONCE`` at a time, because tokenizing holds ~90 bytes of memory per byte of text.
* A slot belongs to the job's worker thread from start to finish and is released when that thread's generation has
  ended (not when the HTTP handler gives up), so a cancelled job never overlaps the next one: forward passes stay at
  ``max_concurrency`` at most. The release comes before the request's last item, so a client that holds its whole
  answer finds its slot free again.
* Admission counts each request once, from admission to the end of its job: a request passes from waiting to
  running in several event-loop steps, and counting the two apart would let a burst see it twice or not at all.
* Cancellation: every job has an Event polled before each forward pass; it is set when the client disconnects
  (closed stream, or a polled check while a non-streaming client waits), and on shutdown.
* Fast decode (``lowbit serve --fast``): the engine holds one StaticDecoder per slot (a static KV cache and a CUDA
  graph of the decode step, on the packed kernels). A job takes a free one when its prompt and token budget fit the
  decoder's cache and gives it back when it ends; a generation that does not fit runs the dynamic-cache loop, so
  no answer is cut short by the static cache's size.
* Shutdown: ``begin_shutdown(grace)`` refuses new and queued requests at once (``ShuttingDownError``) and aborts
  running jobs after ``grace`` seconds: their ``deltas`` end with ``ShuttingDownError`` right away, without waiting
  for the forward pass in progress, so the server can still answer them properly. ``close`` aborts what is left
  and waits for the worker threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from torch import nn

from lowbit.errors import LowbitError
from lowbit.serve.generate import SamplingParams, TextStream, context_length, decoder_room

POLL_SECONDS = 0.25  # how often a waiting request checks whether its client is still there
# A normalizer can make the text a tokenizer sees shorter than what was sent: NFC composes up to 3 characters into
# one (Hangul jamo, 9 bytes -> 3). With one, refusing from the byte count alone keeps a factor of 4 in hand.
NORMALIZER_SAFETY = 4
HEAVY_TEXT_BYTES = 1 << 16  # texts above this tokenize TOKENIZE_AT_ONCE at a time
TOKENIZE_AT_ONCE = 2

IsDisconnected = Callable[[], Awaitable[bool]]
T = TypeVar("T")


class QueueFullError(Exception):
    """Too many requests already wait for a generation slot."""


class ShuttingDownError(Exception):
    """The engine is stopping and takes no new jobs."""


class RequestError(LowbitError):
    """A request this model cannot serve as asked: ``param`` names the input at fault, ``code`` the reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def bytes_per_token_bound(tokenizer: object) -> int | None:
    """B such that a text of n UTF-8 bytes has at least n / B tokens; None when there is no such bound.

    No token stands for more text than its vocabulary string spells: byte-level BPE writes each byte as one
    character (so count characters), SentencePiece a space as the 3-byte '\u2581' and a fallback byte as '<0xAB>'
    (so count UTF-8 bytes). A normalizer may shrink the text first (``NORMALIZER_SAFETY``). Added tokens that strip
    the whitespace around them can swallow any amount of it: no bound then.
    """
    try:
        vocab = tokenizer.get_vocab()
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    except Exception:  # noqa: BLE001 - not a Hugging Face tokenizer: no bound, every prompt is tokenized
        return None
    if not vocab or any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) for t in added):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        longest = max(len(t) for t in vocab)
    else:
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in vocab)
    plain = backend is not None and backend.normalizer is None
    return longest * (1 if plain else NORMALIZER_SAFETY)


class Job:
    """One generation on a worker thread; its text deltas come back to the event loop through an asyncio queue."""

    _DONE = object()
    _ABORTED = object()

    def __init__(self, stream: TextStream, stopping: threading.Event, on_finish: Callable[[Job], None]) -> None:
        self.stream = stream
        self._cancel = threading.Event()
        stream.should_stop = lambda: self._cancel.is_set() or stopping.is_set()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._on_finish = on_finish
        self.client_gone = False
        self.decoder: object | None = None  # the engine's StaticDecoder this job holds, if any

    def cancel(self) -> None:
        self._cancel.set()

    def abort(self) -> None:
        """Shutdown (event loop only): stop the worker and end ``deltas`` now with ShuttingDownError."""
        self._cancel.set()
        self._queue.put_nowait(self._ABORTED)

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (end of shutdown): nobody is listening any more
            pass

    def _end(self, last: object) -> None:
        """Event loop: hand the slot back, then deliver the last item. In this order, a client that has its whole
        answer finds the slot free, so its next request is never refused because of the one just answered."""
        self._on_finish(self)
        self._queue.put_nowait(last)

    def run(self) -> None:
        """Worker-thread body: generate, forward deltas, hand the slot back however it ends."""
        last: object = self._DONE
        try:
            for delta in self.stream:
                self._put(delta)
        except BaseException as e:  # noqa: BLE001 - reported to the waiting request, which answers 500
            # BaseException too: a Rust panic in a tokenizer is one, and the request must never wait forever.
            last = e if isinstance(e, Exception) else RuntimeError(f"{type(e).__name__}: {e}")
        finally:
            try:
                self._loop.call_soon_threadsafe(self._end, last)
            except RuntimeError:  # the loop is closed (end of shutdown): nobody is listening any more
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
            if item is self._ABORTED:
                raise ShuttingDownError
            if isinstance(item, Exception):
                raise item
            yield item


class Engine:
    """Owns the model: admission (bounded queue), generation slots and worker threads."""

    def __init__(self, model: nn.Module, tokenizer: object, max_concurrency: int = 1, max_queue: int = 16,
                 max_prompt_tokens: int | None = None, decoders: Sequence[object] = ()) -> None:
        if max_concurrency < 1 or max_queue < 0 or (max_prompt_tokens is not None and max_prompt_tokens < 1):
            raise LowbitError("max_concurrency and max_prompt_tokens must be >= 1 and max_queue >= 0")
        if decoders and len(decoders) != max_concurrency:
            raise LowbitError(f"fast decode needs one decoder per slot: {len(decoders)} for {max_concurrency}")
        self.model, self.tokenizer = model, tokenizer
        self.context = context_length(model)
        self.max_prompt_tokens = max_prompt_tokens if max_prompt_tokens is not None else self.context
        self.bytes_per_token = bytes_per_token_bound(tokenizer)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._slots = asyncio.Semaphore(max_concurrency)  # binds to the serving loop on first use
        self._tokenize_slots = asyncio.Semaphore(TOKENIZE_AT_ONCE)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="lowbit-generate")
        self._stopping = threading.Event()
        self._draining = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._jobs: set[Job] = set()
        self._admitted = 0  # requests from admission until their job ends (or they give up waiting)
        self.running = 0
        self.stats: Counter[str] = Counter()  # finish reasons, "refused", "failed", "fast", "fast_fallback"
        self._decoders = list(decoders)  # the free ones; a running job holds its own
        self.decoder_cache = max((d.max_cache_len for d in decoders), default=0)

    # -------------------------------------------------------------------------------- building a generation

    def token_budget(self, n_prompt: int, max_tokens: int | None, default_max: int | None, what: str) -> int:
        """How many tokens to generate after a prompt of ``n_prompt`` tokens (the ``what`` of the request).

        ``max_tokens`` is what the client asked for (checked strictly against the context); ``default_max``
        applies when it asked for nothing (None: fill the context), and is trimmed to the room left. With fast
        decoders, a request that asks for nothing gets the room of their static cache where its prompt fits there
        (as a server's context bounds it), so it decodes on one; asked-for lengths past the cache run the loop.
        """
        ctx = self.context
        if ctx is not None and n_prompt >= ctx:
            raise RequestError(f"This model's maximum context length is {ctx} tokens, but the {what} has "
                               f"{n_prompt} tokens. Please shorten it.", param=what, code="context_length_exceeded")
        if ctx is not None and max_tokens is not None and n_prompt + max_tokens > ctx:
            raise RequestError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                               f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the "
                               f"completion). Please reduce the length of the {what} or the completion.",
                               param="max_tokens", code="context_length_exceeded")
        room = ctx - n_prompt if ctx is not None else None
        if max_tokens is not None:
            return max_tokens
        fast_room = decoder_room(self.decoder_cache, n_prompt)
        if self.decoder_cache and fast_room >= 1:
            room = fast_room if room is None else min(room, fast_room)
        if default_max is not None:
            return min(default_max, room) if room is not None else default_max
        return room if room is not None else 256

    def _too_long(self, what: str, size: str) -> RequestError:
        ctx = f" (the model's context length is {self.context} tokens)" if self.context else ""
        return RequestError(f"The {what} has {size}, more than this server's limit of {self.max_prompt_tokens} "
                            f"prompt tokens{ctx}. Please shorten it.", param=what, code="context_length_exceeded")

    def check_prompt_bytes(self, n_bytes: int, what: str) -> None:
        """Refuse, without tokenizing, a text of ``n_bytes`` UTF-8 bytes that cannot fit ``max_prompt_tokens``."""
        limit, per_token = self.max_prompt_tokens, self.bytes_per_token
        if limit is not None and per_token is not None and -(-n_bytes // per_token) > limit:
            raise self._too_long(what, f"{n_bytes} bytes (at least {-(-n_bytes // per_token)} tokens)")

    def check_prompt_tokens(self, n_tokens: int, what: str) -> None:
        """Refuse a prompt of more than ``max_prompt_tokens`` tokens."""
        if self.max_prompt_tokens is not None and n_tokens > self.max_prompt_tokens:
            raise self._too_long(what, f"{n_tokens} tokens")

    async def tokenize(self, n_bytes: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` (a tokenizer call on a text of ``n_bytes``, already checked with ``check_prompt_bytes``) on
        a thread, if the queue has room now: a request that would be refused anyway is not tokenized first. Large
        texts take turns, so concurrent ones cannot multiply the memory tokenizing holds."""
        self.check_admission()
        if n_bytes <= HEAVY_TEXT_BYTES:
            return await asyncio.to_thread(fn, *args)
        async with self._tokenize_slots:
            return await asyncio.to_thread(fn, *args)

    def check_token_ids(self, ids: Sequence[int]) -> list[int]:
        """A prompt given as token ids, refused unless every id is in the model's vocabulary."""
        ids = list(ids)
        vocab = self.model.get_input_embeddings().num_embeddings
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise RequestError(f"token-id prompts must be non-empty with ids in [0, {vocab})", param="prompt")
        return ids

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> TextStream:
        """A generation to hand to ``start`` once a slot is held."""
        return TextStream(self.model, self.tokenizer, prompt_ids, params)

    # ------------------------------------------------------------------------------------ slots and threads

    def check_admission(self) -> None:
        """ShuttingDownError when stopping, QueueFullError when a new request would wait behind a full queue."""
        if self._draining or self._stopping.is_set():
            raise ShuttingDownError
        # Counting every admitted request, not "waiting" and "running" apart: a request moves from one to the other
        # in steps (its slot is won, then its handler resumes, then its job starts), and a burst that looks at the
        # two counts between those steps would see one request too many or too few.
        if self._admitted >= self.max_concurrency + self.max_queue:
            self.stats["refused"] += 1
            raise QueueFullError

    async def acquire(self, is_disconnected: IsDisconnected) -> bool:
        """Wait for a slot: True once held, False if the client left meanwhile; QueueFullError when too many wait,
        ShuttingDownError when the server stops (also while waiting)."""
        self.check_admission()
        self._admitted += 1
        task = asyncio.ensure_future(self._slots.acquire())
        acquired = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                if self._draining:
                    raise ShuttingDownError
                if done:
                    acquired = True
                    return True
                if await is_disconnected():
                    return False
        finally:
            if not acquired:  # gave up (client gone, or this handler was cancelled): don't leak a won slot
                self._admitted -= 1
                task.cancel()
                task.add_done_callback(lambda t: None if t.cancelled() else self._slots.release())

    def start(self, stream: TextStream) -> Job:
        """Run ``stream`` on a worker thread; the caller must hold a slot, which passes to the job (and a free
        decoder with it, when the generation fits its static cache)."""
        job = Job(stream, self._stopping, self._finished)
        job.decoder = self._take_decoder(stream)
        self.running += 1
        self._jobs.add(job)
        try:
            self._executor.submit(job.run)
        except RuntimeError:  # executor shut down: we are stopping
            self._finished(job)
            raise ShuttingDownError from None
        return job

    @property
    def free_decoders(self) -> int:
        """Fast decoders no job holds now (0 without fast decode)."""
        return len(self._decoders)

    @property
    def waiting(self) -> int:
        """Admitted requests whose generation has not started yet."""
        return self._admitted - self.running

    def _take_decoder(self, stream: TextStream) -> object | None:
        if not self._decoders:
            return None
        if not stream.fits(self._decoders[-1]):
            self.stats["fast_fallback"] += 1
            return None
        decoder = self._decoders.pop()
        stream.use_decoder(decoder)
        self.stats["fast"] += 1
        return decoder

    def _finished(self, job: Job) -> None:
        if job.decoder is not None:  # the job's thread is done with it: it ran to its end, or never started
            self._decoders.append(job.decoder)
            job.decoder = None
        self.running -= 1
        self._admitted -= 1
        self._jobs.discard(job)
        self.stats[job.stream.finish_reason or "failed"] += 1
        self._slots.release()

    def begin_shutdown(self, grace: float) -> None:
        """Admit nothing more (queued requests get ShuttingDownError within POLL_SECONDS) and abort the running jobs
        after ``grace`` seconds. Call on the event loop; a second call changes nothing."""
        if self._draining:
            return
        self._draining = True
        self._abort_timer = asyncio.get_running_loop().call_later(grace, self._abort_all)

    def _abort_all(self) -> None:
        for job in list(self._jobs):
            job.abort()

    async def close(self) -> None:
        """Abort every job and wait for the worker threads (each stops before its next forward pass)."""
        self._draining = True
        self._stopping.set()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._abort_all()
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
