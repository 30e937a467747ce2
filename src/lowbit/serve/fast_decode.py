"""Fast small-batch decoding: a static KV cache, and the one-token decode step replayed as a CUDA graph.

At batch 1 a decode step reads every weight once and does little arithmetic, so a quantized model should run at
the memory-bandwidth limit. Launched op by op from Python it does not: a Llama-7B step is ~1000 kernels (224 of
them QuantLinear Triton launches, each with its Python dispatch), and the host cannot issue them as fast as the
GPU runs them. :class:`StaticDecoder` removes the host from the loop:

* the KV cache is a transformers ``StaticCache`` (fixed shapes and addresses; the attention mask covers the whole
  ``max_cache_len`` and hides the positions not written yet);
* the decode step reads its input token and position from static device buffers, and writes its logits, the
  greedy next token (fed back into the input buffer), the token history and the next position, all on the device;
* on CUDA that step is captured once as a ``torch.cuda.CUDAGraph`` (after warm-up steps on a side stream, so
  Triton kernels are compiled/autotuned and lazily built tables such as ``decode_lut`` exist before capture) and
  each later token is a single ``graph.replay()``: greedy generation needs no host synchronisation per token.

Everywhere else (CPU, or ``cuda_graph=False``) the very same step runs eagerly, which is what the CPU tests check.
Prefill runs eagerly into the same static cache. CUDA graphs were chosen over ``torch.compile(mode=
"reduce-overhead")``: no compilation time, no dependence on dynamo tracing the transformers model or the
QuantLinear dispatch (environment reads, dict caches, user Triton kernels), and identical kernels to eager mode.

Capture-safety: everything the step runs must be device-side. Host syncs (``.item()``, ``if tensor``) and
copies of CPU tensors to the GPU would break capture; QuantLinear's online rotations keep their sign/factor
tensors on the CPU, so :func:`place_rotations` gives each module device-resident copies first. With
``cuda_graph="auto"`` a failed capture falls back to eager decoding (``graph_error`` says why).

Batch > 1 decodes sequences of the same prompt length (no padding). Usage::

    dec = StaticDecoder(model, max_cache_len=prompt_len + max_new_tokens)
    tokens = dec.generate_greedy(prompt_ids, max_new_tokens=128)       # [batch, 128] token ids
    # or step by step (sampling done by the caller):
    dec.reset(); logits = dec.prefill(prompt_ids)
    while ...: token = pick(logits); logits = dec.step(token)          # logits: a static buffer, read it now
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from lowbit.kernels.cuda_gemv import early_launch
from lowbit.kernels.device import hopper
from lowbit.kernels.triton_decode_attention import reserve as reserve_decode_attention
from lowbit.models import fused_norms, step_tables
from lowbit.models.decode_attention import advance_lengths, defer_lengths, unmasked_steps, use_decode_attention
from lowbit.models.fused_linears import fuse_siblings, hold_layouts
from lowbit.models.quant_linear import QuantLinear
from lowbit.serve.generate import _forward_kwargs, cache_arg

log = logging.getLogger(__name__)


def place_rotations(model: nn.Module, device: torch.device) -> int:
    """Give every rotated QuantLinear its own copies of the online transforms with their tensors on ``device``.

    The transforms are shared, cached objects holding CPU tensors that ``.to(x)`` copies to the GPU on every
    call: a host-to-device copy that a CUDA graph cannot capture (and a needless transfer per call anyway).
    Returns how many transforms were placed. The cached originals (used to rotate weights) are untouched.
    """
    n = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        for attr in ("_u", "_v"):
            t = getattr(m, attr)
            if t is None:
                continue
            moved = copy.copy(t)
            for name, value in vars(t).items():
                if isinstance(value, torch.Tensor) and value.device != device:
                    setattr(moved, name, value.to(device))
            setattr(m, attr, moved)
            n += 1
    return n


def _cache_state(cache: object) -> list[tuple[object, str, torch.Tensor]]:
    """The cache's per-layer position counters (device tensors that each step increments in place)."""
    out = []
    for layer in getattr(cache, "layers", ()):
        for name in ("cumulative_length",):
            v = getattr(layer, name, None)
            if isinstance(v, torch.Tensor):
                out.append((layer, name, v))
    return out


def _pdl_applies(pdl: bool | str, compile: bool, device: torch.device) -> bool:
    """Whether the decode step uses programmatic dependent launch: only compiled (Inductor's kernels must take
    part) and only on a CUDA GPU of compute capability 9 or more, where "auto" turns it on. Models with online
    rotations take part too: their Hadamard kernels launch the same way (e8p_ch+rht, 7B shape on an H200: 339.8
    tok/s plain, 375.3 with PDL; before the transforms launched early, PDL measured slower, 302.4 against 310.5)."""
    if pdl not in (True, False, "auto"):
        raise ValueError(f"pdl must be True, False or 'auto', got {pdl!r}")
    possible = compile and hopper(device)
    if pdl is True and not possible:
        raise ValueError("pdl=True needs compile=True and a CUDA GPU of compute capability 9.0 or more "
                         f"(this decoder: compile={compile}, device {device})")
    return possible if pdl == "auto" else pdl is True


class StaticDecoder:
    """Greedy or step-by-step decoding of ``model`` (a transformers causal LM) with a static KV cache.

    ``cuda_graph``: "auto" (capture on CUDA, fall back to eager with a warning if capture fails), True (capture,
    raise on failure; CUDA only) or False (always eager). ``compile``: run the step through ``torch.compile``
    (compiled on the first step; the graph then replays the compiled step). ``fuse``: run q/k/v and gate/up as one
    packed matmul each (:func:`lowbit.models.fused_linears.fuse_siblings`; the model's QuantLinears then share
    storage with the fused weights, see there). ``fold_norms``: with ``fuse``, a Llama-family layer's RMSNorms and
    residual adds run inside its GEMVs (:func:`lowbit.models.fused_norms.fold_norms`: same function, four kernels
    fewer per layer on CUDA). ``fuse_attention``: with ``fold_norms`` and ``decode_attention``, a one-token step
    runs a layer's rotary embedding, cache write and attention as one kernel
    (:func:`lowbit.models.decode_attention.step_attention`). ``decode_attention``: on CUDA, switch a model that runs
    SDPA to :mod:`lowbit.models.decode_attention` (the same function; one-token steps read only the cache's used
    blocks, split over programs: on an H200 as fast as cuDNN's SDPA at a 144-position cache and ~20% faster per
    token at 4096 positions, docs/kernels.md). ``pdl``: with ``compile`` on Hopper or later, launch Inductor's
    kernels and lowbit's GEMVs as programmatic dependent launches, so each starts (loads its weights) while the
    kernel before it finishes: "auto" (the default) where the GPU has it, True (refused where it cannot apply) or
    False; on an H200 the 7B-shaped nz2_ch step went from 573.9 to 617.1 tok/s and e8p_ch+rht from 339.8 to 375.3
    (docs/kernel-measurements.md).
    One decoder serves any number of
    generations with the same batch size (``reset`` keeps the cache and the captured graph).
    """

    def __init__(self, model: nn.Module, max_cache_len: int, batch_size: int = 1,
                 cuda_graph: bool | str = "auto", warmup_steps: int = 2, compile: bool = False,
                 fuse: bool = True, decode_attention: bool = True, pdl: bool | str = "auto",
                 fold_norms: bool = True, fuse_attention: bool = True):
        from transformers import StaticCache

        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        if max_cache_len < 2 or batch_size < 1:
            raise ValueError(f"need max_cache_len >= 2 and batch_size >= 1, got {max_cache_len}, {batch_size}")
        self.model = model
        self.device = next(model.parameters()).device
        if cuda_graph is True and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        self.pdl = _pdl_applies(pdl, compile, self.device)
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.warmup_steps = max(1, warmup_steps)
        self._graph_mode = cuda_graph
        self.use_graph = self.device.type == "cuda" and cuda_graph is not False
        self.graph_error: str | None = None
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self._kwargs = _forward_kwargs(model)
        with torch.inference_mode():
            self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
            self._pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
            # token at each position; one spare slot for the token that follows the last cached position
            self._hist = torch.zeros(batch_size, max_cache_len + 1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self.length = 0  # positions held in the cache
        self.prompt_length = 0
        place_rotations(model, self.device)
        # the rotary embedding's cos/sin for every cache position, computed once (models.step_tables)
        self._rotary = step_tables.install(model, max_cache_len + 1, self.device)
        # q/k/v and gate/up as one packed matmul each (models.fused_linears): same outputs, fewer short kernels
        self.fused_groups = fuse_siblings(model) if fuse else 0
        # one-token attention that reads only the visible part of the static cache (models.decode_attention)
        self.decode_attention = decode_attention and self.device.type == "cuda" and use_decode_attention(model)
        # ... each layer's norms and residual adds inside those GEMVs (models.fused_norms), and its rotary
        # embedding, cache write and attention one kernel (models.decode_attention.step_attention)
        self.fuse_attention = fuse_attention and self.decode_attention and fuse and fold_norms
        if fuse and fold_norms:
            fused_norms.fold_norms(model, attention=self.fuse_attention)
            self.folded_layers = fused_norms.folded_layers(model)  # those a decoder made earlier folded too
        else:
            self.folded_layers = 0
            fused_norms.unfold_norms(model)  # a decoder made earlier may have folded them
        # on a GPU, K-quant, IQ2_XXS and 3-, 5- and 6-bit weights keep only the CUDA GEMV's kernel layout there, their
        # stored bytes in host memory (models.fused_linears.hold_layouts): not both, twice the memory
        self.held_layouts = hold_layouts(model) if self.device.type == "cuda" else 0
        if self.decode_attention:  # before torch.compile traces a step: the kernel's counters exist already
            reserve_decode_attention(self.device, batch_size, model.config.num_attention_heads)
        # torch.compile of the step fuses the small ops between the matmuls (norms, rotary embedding, residual adds,
        # activation); QuantLinears enter the trace as the lowbit::qmatmul custom op. The CUDA graph, if any, then
        # records the compiled step.
        options = {"triton.enable_pdl": True} if self.pdl else None
        self._step = torch.compile(self._body, dynamic=False, options=options) if compile else self._body

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    # ----- state ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation (same buffers, same graph)."""
        with torch.inference_mode():
            self.cache.reset()
        self.length = self.prompt_length = 0

    def prefill(self, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompt ([batch, len] or one sequence) eagerly into the cache; returns float32 logits [batch, vocab]
        of its last position. The greedy next token is already queued as the next step's input."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        ids = ids.reshape(1, -1).expand(self.batch_size, -1) if ids.dim() == 1 else ids
        if ids.shape[0] != self.batch_size or ids.shape[1] < 1:
            raise ValueError(f"prompt shape {tuple(ids.shape)} does not fit batch size {self.batch_size}")
        n = ids.shape[1]
        if self.length + n > self.max_cache_len:
            raise ValueError(f"{self.length} cached + {n} prompt tokens exceed max_cache_len={self.max_cache_len}")
        with torch.inference_mode():
            pos = torch.arange(self.length, self.length + n, device=self.device).unsqueeze(0)
            out = self.model(input_ids=ids, position_ids=pos.expand(self.batch_size, -1),
                             **{cache_arg(self.model): self.cache}, use_cache=True, **self._kwargs)
            self.length += n
            self.prompt_length = self.length
            logits = out.logits[:, -1].float()
            nxt = torch.argmax(logits, dim=-1)
            self._hist[:, self.length] = nxt
            self._ids.copy_(nxt.unsqueeze(1))
            self._pos.fill_(self.length)
        return logits

    def step(self, token: int | torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Feed one token per sequence (None: the greedy token of the previous step) and return the float32 logits
        [batch, vocab] of the next position. On the graph path the logits are a static buffer that the next step
        overwrites: use (or clone) them before stepping again."""
        with torch.inference_mode():
            if token is not None:
                if isinstance(token, int):
                    self._ids.fill_(token)
                else:
                    t = torch.as_tensor(token, dtype=torch.long, device=self.device)
                    self._ids.copy_(t.reshape(-1, 1).expand(self.batch_size, 1))
                self._hist[:, self.length] = self._ids[:, 0]
            self._pos.fill_(self.length)
            return self._advance()

    def run_steps(self, n: int) -> None:
        """``n`` greedy steps with no host synchronisation (tokens land in the history, see :meth:`tokens`)."""
        with torch.inference_mode():
            for _ in range(n):
                self._advance()

    def tokens(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Token ids at positions [start, end) (default: everything after the prompt, the queued token included)."""
        start = self.prompt_length if start is None else start
        end = self.length + 1 if end is None else end
        return self._hist[:, start:end].clone()

    def generate_greedy(self, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
                        max_new_tokens: int, eos_token_ids: Iterable[int] = (), check_every: int = 16
                        ) -> torch.Tensor:
        """Greedy continuation [batch, <= max_new_tokens] of a prompt (resets the cache first).

        With ``eos_token_ids``, the host checks every ``check_every`` tokens whether every sequence has produced one
        and stops there; each row is returned in full (the EOS and whatever follows it are the caller's to cut).
        """
        eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self.reset()
        self.prefill(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.length + max_new_tokens - 1 > self.max_cache_len:
            raise ValueError(f"{self.length} prompt + {max_new_tokens} new tokens need max_cache_len >= "
                             f"{self.length + max_new_tokens - 1}, have {self.max_cache_len}")
        with torch.inference_mode():
            for i in range(1, max_new_tokens):
                if eos.numel() and i % check_every == 0:
                    if torch.isin(self.tokens(), eos).any(dim=1).all():
                        break
                self._advance()
        return self.tokens()

    def warm_up(self) -> None:
        """Compile and capture the step now (a one-token prompt and a few steps), so the first real generation
        does not wait for it; leaves the decoder reset."""
        self.reset()
        self.prefill([0])
        for _ in range(min(self.warmup_steps + 1, self.max_cache_len - 1)):
            self.step()
        self.reset()

    # ----- the decode step -----------------------------------------------------------------------------------
    def _body(self) -> torch.Tensor:
        """One decode step, entirely on the device: what the CUDA graph records."""
        defer_lengths(self.cache)  # the one-kernel attention steps' cache lengths: one kernel after the layers
        unmasked_steps(self.cache)  # no padding: the one-kernel attention needs no mask
        try:
            out = self.model(input_ids=self._ids, position_ids=self._pos, **{cache_arg(self.model): self.cache},
                             use_cache=True, **self._kwargs)
        finally:
            advance_lengths(self.cache)
            unmasked_steps(self.cache, False)
        logits = out.logits[:, -1].float()
        nxt = step_tables.first_argmax(logits)  # two reductions over the GPU instead of one program's
        self._hist.index_copy_(1, self._pos[0] + 1, nxt.unsqueeze(1))
        self._ids.copy_(nxt.unsqueeze(1))
        self._pos.add_(1)
        return logits

    def _run_step(self) -> torch.Tensor:
        # lowbit's GEMVs launched early only inside the PDL step: among plain kernels it measured slower
        with early_launch(True) if self.pdl else nullcontext(), step_tables.lookups(self._rotary):
            return self._step()

    def _advance(self) -> torch.Tensor:
        if self.length >= self.max_cache_len:
            raise ValueError(f"the static cache is full ({self.max_cache_len} positions)")
        if self.use_graph and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._run_step()
        self.length += 1
        return logits

    def _capture(self) -> None:
        """Warm up (compile kernels, build caches) on a side stream, undo the warm-up's position updates, capture."""
        cur = torch.cuda.current_stream(self.device)
        saved = [(layer, name, v.clone()) for layer, name, v in _cache_state(self.cache)]
        saved_ids, saved_pos = self._ids.clone(), self._pos.clone()

        def restore() -> None:
            for layer, name, v in saved:
                getattr(layer, name).copy_(v)
            self._ids.copy_(saved_ids)
            self._pos.copy_(saved_pos)

        # Warm-up steps write K/V (and history) at positions >= length: not yet attended (masked), and overwritten
        # by the real steps before they are. They must stay inside the cache: index_copy_ out of range is fatal.
        warm = min(self.warmup_steps, self.max_cache_len - self.length)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                for _ in range(warm):
                    self._run_step()
                    restore()
            cur.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._run_step()
            self._graph, self._logits = graph, logits
        except Exception as e:  # capture is an optimisation: decode eagerly unless the caller insisted on graphs
            self._graph = self._logits = None
            self.use_graph = False
            self.graph_error = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize(self.device)
            restore()
            if self._graph_mode is True:
                raise
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {self.graph_error}", stacklevel=3)
        # Capture records the step without running it: positions and inputs are as before.
