"""Token-by-token generation shared by ``lowbit generate`` and ``lowbit serve``.

An explicit loop over ``model(input_ids, past_key_values=..., use_cache=True)`` rather than ``model.generate``:
it works the same for float models and models holding QuantLinear modules, it can be cancelled between any two
tokens (client disconnects, server shutdown), and it yields text deltas as soon as they are complete UTF-8.

Usage::

    stream = TextStream(model, tokenizer, encode_prompt(tokenizer, "Hello"), SamplingParams(temperature=0))
    for delta in stream:
        print(delta, end="", flush=True)
    stream.finish_reason, stream.prompt_tokens, stream.completion_tokens
"""

from __future__ import annotations

import inspect
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import model_max_length as context_length
from lowbit.models.quant_linear import QuantLinear

# Prompt format for tokenizers without a chat template: one "Role: content" line per message, then "Assistant:".
# Generation also stops at the next "\nUser:" so a base model does not write the user's turn too.
PLAIN_CHAT_STOP = "\nUser:"


class PromptTooLongError(LowbitError):
    """The prompt leaves no room for a single new token in the model's context."""


class ChatTemplateError(LowbitError):
    """The tokenizer's chat template rejected the messages (e.g. roles that do not alternate)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable filtering."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LowbitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise LowbitError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise LowbitError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LowbitError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise LowbitError("stop strings must not be empty")


def encode_prompt(tokenizer: object, text: str) -> list[int]:
    """Token ids of a raw completion prompt, with the tokenizer's usual special tokens (e.g. BOS for Llama)."""
    ids = list(tokenizer.encode(text))
    if not ids:  # an empty prompt: start from BOS (or EOS, as GPT-2 does) so there is something to condition on
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise LowbitError("empty prompt and the tokenizer has no BOS/EOS token to start from")
        ids = [start]
    return ids


def plain_chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The documented fallback chat format for tokenizers without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def encode_chat(tokenizer: object, messages: Sequence[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, extra stop strings) for a chat: the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja raises its own errors (raise_exception in templates): report, don't crash
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
        # The template already contains the special tokens (BOS, role markers); don't add them twice.
        return list(tokenizer.encode(text, add_special_tokens=False)), ()
    return encode_prompt(tokenizer, plain_chat_prompt(messages)), (PLAIN_CHAT_STOP,)


def eos_token_ids(model: nn.Module, tokenizer: object) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation config EOS (int or list)."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a 1-D float logits vector."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Any temperature > 0 must work, however small: in float32, dividing by 1e-40 gives inf and softmax NaN. In
    # float64 after subtracting the maximum, the best token scales to 0 and the rest to finite negatives or -inf.
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p; the best token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-byte characters split across byte-level BPE tokens and loses
    SentencePiece's leading spaces, so each step decodes a short window of recent tokens twice (with and without
    the new ones) and emits the difference, holding text back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as a full decode would)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of ``text`` (plus what was held back) that is safe to emit."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out
        keep = self._partial_suffix(self._pending)
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


def fast_by_default(model: nn.Module, fast: bool | None, asked: bool = False, on_cuda: bool = True) -> bool:
    """Whether to decode with a StaticDecoder: ``fast`` where given; by default (None) where ``asked`` (a setting
    only fast decoding has, such as ``compile``) and, with ``on_cuda``, for a model on CUDA, where the packed
    kernels and a CUDA graph a token make it several times faster than the dynamic-cache loop (which also keeps
    the dequantized weights beside the packed ones there)."""
    if fast is not None:
        return fast
    return asked or (on_cuda and next(model.parameters()).device.type == "cuda")


Built = TypeVar("Built")


def fast_or_loop(model: nn.Module, fast: bool, auto: bool, weight_cache: bool, build: Callable[[], Built],
                 fallback: str) -> Built | None:
    """What ``build`` makes (the fast decoder or decoders) where ``fast`` (:func:`fast_by_default`'s answer), else
    None, with the weight cache set for the path taken (:func:`use_weight_cache`). Where fast decoding was only the
    default (``auto``) and ``build`` fails, warns ``fallback`` with the error and returns None: the dynamic-cache
    loop decodes, with its weight cache; where it was asked for, the error propagates."""
    use_weight_cache(model, weight_cache, fast=fast)
    if not fast:
        return None
    note = slow_dtype_note(model)
    if note:
        warnings.warn(note, stacklevel=3)
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any model a static cache cannot serve decodes the ordinary way
        if not auto:
            raise
        warnings.warn(f"{fallback} ({e})", stacklevel=3)
        use_weight_cache(model, weight_cache)
        return None


def slow_dtype_note(model: nn.Module) -> str | None:
    """Why a model's packed matmuls would decode on slower kernels than it could: one on CUDA computing in another
    dtype than float16, the only one lowbit's CUDA GEMVs take (loaded with float32, ``lowbit.load``'s default for
    quantizing and evaluating). None where there is nothing to say."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cuda" or param.dtype == torch.float16:
        return None
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return None
    name = str(param.dtype).removeprefix("torch.")
    return (f"the model computes in {name}: lowbit's CUDA GEMVs take float16 activations, so its packed matmuls "
            "decode on slower kernels; load it with dtype='auto' (lowbit generate and serve do), or call "
            "model.half() on one in memory")


def use_weight_cache(model: nn.Module, enabled: bool = True, fast: bool = False) -> int:
    """Keep dequantized weights between decoding steps (on by default in generate/serve); returns the bytes it takes.

    Without it every QuantLinear dequantizes its whole weight on every token, which makes CPU decoding ~10-40x
    slower; the price is the weights in float (4 bytes per weight in float32) next to the packed ones. ``fast``
    (decoding with a StaticDecoder): off on CUDA, where the cache would bypass the packed kernels the fast path
    exists for; on a CPU, which has no packed kernels, kept as asked.
    """
    from lowbit.models.quant_linear import QuantLinear, cache_dequantized

    enabled = enabled and not (fast and next(model.parameters()).device.type == "cuda")
    cache_dequantized(model, enabled)
    if not enabled:
        return 0
    dtype = next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * size for m in model.modules() if isinstance(m, QuantLinear))


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _forward_kwargs(model: nn.Module) -> dict:
    """Ask for the last position's logits only when the model supports it (saves a vocab x prompt matmul)."""
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if _LOGITS_TO_KEEP[cls] else {}


_CACHE_ARG: dict[type, str] = {}


def cache_arg(model: nn.Module) -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` in newer transformers, where
    ``past_key_values`` is deprecated, ``past_key_values`` before."""
    cls = type(model)
    if cls not in _CACHE_ARG:
        _CACHE_ARG[cls] = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return _CACHE_ARG[cls]


def decoder_room(max_cache_len: int, n_prompt: int) -> int:
    """New tokens a static cache of ``max_cache_len`` positions holds after a prompt of ``n_prompt``: the last token
    sampled is never fed back, so it takes no position."""
    return max_cache_len - n_prompt + 1


class TextStream:
    """Iterate to generate: yields text deltas; afterwards holds finish_reason, token counts and timings.

    ``finish_reason`` is "stop" (EOS or a stop string), "length" (max_new_tokens or the context is full) or
    "cancelled" (``should_stop`` returned True). ``should_stop`` is polled before every forward pass, from the
    thread that iterates, so another thread can cancel by setting an Event.

    ``decoder`` (a :class:`lowbit.serve.fast_decode.StaticDecoder` of ``model``, batch 1): decode with its static
    cache (and CUDA graph) instead of the dynamic-cache loop; its ``max_cache_len`` must cover the prompt and
    ``max_new_tokens`` (the number of new tokens is capped to fit, finishing with "length").
    """

    def __init__(self, model: nn.Module, tokenizer: object, prompt_ids: Sequence[int], params: SamplingParams,
                 should_stop: Callable[[], bool] | None = None, extra_stop: Sequence[str] = (),
                 decoder: object | None = None):
        limit = context_length(model)
        if not prompt_ids:
            raise LowbitError("the prompt has no tokens")
        if limit is not None and len(prompt_ids) >= limit:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {limit} "
                                     f"tokens (room is needed for at least one new token)")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        # Never run past the positions the model was trained for: finish with "length" there.
        self.max_new_tokens = min(params.max_new_tokens, limit - len(prompt_ids)) if limit else params.max_new_tokens
        self.decoder = None
        self._started = False
        if decoder is not None:
            self.use_decoder(decoder)
        self.should_stop = should_stop or (lambda: False)
        self.stops = tuple(dict.fromkeys((*params.stop, *extra_stop)))
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.t_start = self.t_first = self.t_last = self.t_end = 0.0
        self.steps = 0  # forward passes that sampled a token (an EOS included)

    def fits(self, decoder: object) -> bool:
        """Whether ``decoder``'s static cache holds this whole generation: the prompt and ``max_new_tokens`` (the
        prompt alone at least, so :meth:`use_decoder` cannot refuse it)."""
        return max(self.max_new_tokens, 1) <= decoder_room(decoder.max_cache_len, len(self.prompt_ids))

    def use_decoder(self, decoder: object) -> None:
        """Decode with ``decoder`` (a batch-1 StaticDecoder of this model) instead of the dynamic-cache loop;
        ``max_new_tokens`` is capped to what its static cache holds (see :meth:`fits`)."""
        if self._started:
            raise RuntimeError("the stream has started; its decoder cannot change")
        if decoder.model is not self.model or decoder.batch_size != 1:
            raise LowbitError("the decoder must be a batch-1 StaticDecoder of this model")
        if len(self.prompt_ids) > decoder.max_cache_len:
            raise PromptTooLongError(f"the prompt has {len(self.prompt_ids)} tokens but the decoder's static cache "
                                     f"holds {decoder.max_cache_len}")
        self.max_new_tokens = min(self.max_new_tokens, decoder_room(decoder.max_cache_len, len(self.prompt_ids)))
        self.decoder = decoder

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def __iter__(self) -> Iterator[str]:
        if self._started:  # token ids, counts and timings describe one run
            raise RuntimeError("a TextStream generates once; make a new one")
        self._started = True
        return self._run()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.params.temperature == 0:
            return None
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed)

    def _run(self) -> Iterator[str]:
        model = self.model
        device = next(model.parameters()).device
        eos = eos_token_ids(model, self.tokenizer)
        decoder, stopper = IncrementalDecoder(self.tokenizer), StopMatcher(self.stops)
        rng = self._generator(device)
        ids = torch.tensor([self.prompt_ids], device=device)
        past, token = None, None  # token: the last one sampled (the static decoder's next input)
        if self.decoder is not None:
            self.decoder.reset()
        self.t_start = time.perf_counter()
        reason = "length"
        with torch.inference_mode():
            for _ in range(self.max_new_tokens):
                if self.should_stop():
                    reason = "cancelled"
                    break
                if self.decoder is not None:  # static cache (+ CUDA graph): prefill, then one step per token
                    logits = self.decoder.prefill(ids) if self.steps == 0 else self.decoder.step(token)
                    token = sample_next(logits[0], self.params, rng)
                else:
                    out = model(input_ids=ids, **{cache_arg(model): past}, use_cache=True, **_forward_kwargs(model))
                    past = getattr(out, cache_arg(model))
                    token = sample_next(out.logits[0, -1].float(), self.params, rng)
                self.steps += 1
                self.t_last = time.perf_counter()
                self.t_first = self.t_first or self.t_last
                if token in eos:
                    reason = "stop"
                    break
                self.token_ids.append(token)
                text = stopper.push(decoder.push(token))
                if text:
                    yield text
                if stopper.stopped:
                    reason = "stop"
                    break
                ids = torch.tensor([[token]], device=device)
        # Text held back (an incomplete character, a possible stop-string prefix) is final now.
        tail = stopper.push(decoder.flush())
        tail += stopper.flush()
        if stopper.stopped:
            reason = "stop"
        self.finish_reason = reason
        self.t_end = time.perf_counter()
        if tail:
            yield tail

    def text(self) -> str:
        """Run to the end and return the whole completion."""
        return "".join(self)

    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time, prompt processing included."""
        elapsed = self.t_end - self.t_start
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0

    def decode_tokens_per_second(self) -> float:
        """Steady-state speed: tokens sampled after the first one, per second (excludes the prompt's forward)."""
        elapsed = self.t_last - self.t_first
        return (self.steps - 1) / elapsed if self.steps > 1 and elapsed > 0 else 0.0

    def stats_line(self) -> str:
        """Tokens, time and speed of a finished stream, in one line."""
        first = self.t_first - self.t_start if self.t_first else 0.0
        return (f"{self.completion_tokens} tokens in {self.t_end - self.t_start:.2f}s "
                f"({self.tokens_per_second():.1f} tokens/s overall, {self.decode_tokens_per_second():.1f} tokens/s "
                f"after the first); prompt {self.prompt_tokens} tokens, first token after {first:.2f}s; "
                f"finish: {self.finish_reason}")
