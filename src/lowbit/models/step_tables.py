"""Small pieces of a decode step made cheaper: the rotary embedding as a table lookup, the greedy argmax in two
reductions.

In a compiled 7B decode step on an H200 the rotary embedding's cos/sin took a matmul and three or four small
Inductor kernels (~11 µs a step) and the argmax over the vocabulary one reduction in one program (~7 µs),
docs/kernels.md. :class:`RotaryTable` holds the model's own cos/sin for the positions of a static cache, computed
once by its rotary module, and returns rows of them while :func:`lookups` is on (a decoder turns it on around its
compiled step only: any other call, e.g. a prompt past the table, computes them as before).
:func:`first_argmax` is ``torch.argmax(x, -1)``, first index of the largest included, as two reductions that spread
over the GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# rotary types whose cos/sin depend on the sequence length seen (transformers' dynamic_rope_update), not only on
# the position: no table for those
_LENGTH_DEPENDENT = ("dynamic", "longrope")


class RotaryTable(nn.Module):
    """``rotary``'s (cos, sin) for positions 0 .. ``positions`` - 1 in ``dtype``, looked up while ``on``, by the
    thread that turned it on (:func:`lookups`). A server runs ordinary forward passes of the same model on other
    threads beside a decoder's eager steps; those compute their own, so a position past the table never reaches
    it. (A traced step, whose Python does not run again, looks up in whichever thread replays it.)"""

    def __init__(self, rotary: nn.Module, positions: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.inner = rotary
        self.on = False
        self.thread = 0  # threading.get_ident() of the thread that turned it on
        with torch.no_grad():
            x = torch.empty(0, device=device, dtype=dtype)
            cos, sin = rotary(x, torch.arange(positions, device=device).unsqueeze(0))
        self.register_buffer("cos", cos[0].contiguous(), persistent=False)
        self.register_buffer("sin", sin[0].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.on or x.dtype != self.cos.dtype or not self._for_this_thread():
            return self.inner(x, position_ids)
        return self.cos[position_ids], self.sin[position_ids]  # position_ids [B, T] -> [B, T, D]

    def _for_this_thread(self) -> bool:
        # torch.compile traces the step in the decoder's own thread, and is_compiling() keeps the thread test out of
        # the trace (it would break the graph)
        return torch.compiler.is_compiling() or threading.get_ident() == self.thread


def install(model: nn.Module, positions: int, device: torch.device) -> RotaryTable | None:
    """Put a :class:`RotaryTable` of ``positions`` in place of the rotary module of ``model`` (a transformers
    causal LM whose base model has ``rotary_emb``); None where it has none or its cos/sin depend on more than the
    position. Idempotent: a table already there is rebuilt when it holds fewer positions."""
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return None
    if isinstance(rotary, RotaryTable):
        if rotary.cos.shape[0] >= positions and rotary.cos.device == device:
            return rotary
        rotary = rotary.inner
    if any(kind in str(getattr(rotary, "rope_type", "default")) for kind in _LENGTH_DEPENDENT):
        return None
    dtype = next(model.parameters()).dtype
    table = RotaryTable(rotary, positions, device, dtype)
    base.rotary_emb = table
    return table


@contextmanager
def lookups(table: RotaryTable | None) -> Iterator[None]:
    """Look the rotary embedding up in ``table`` (if any) inside the block."""
    if table is None:
        yield
        return
    table.on, table.thread = True, threading.get_ident()
    try:
        yield
    finally:
        table.on = False


def first_argmax(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)``: the first index of the largest value (NaN counting as largest, as there), as
    an argmax within chunks of ``chunk`` then one across the chunks' largest values."""
    pad = -x.shape[-1] % chunk
    if pad:
        x = F.pad(x, (0, pad), value=float("-inf"))  # after every real value: a tie keeps the real index
    parts = x.reshape(*x.shape[:-1], -1, chunk)
    inner = parts.argmax(-1)
    best = parts.gather(-1, inner.unsqueeze(-1)).squeeze(-1)
    which = best.argmax(-1, keepdim=True)
    return (which * chunk + inner.gather(-1, which)).squeeze(-1)
