"""Perplexity with the standard protocol (as in GPTQ/QuIP#/llama.cpp papers' WikiText-2 numbers).

The text is tokenized as one stream, cut into non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped), each window is scored independently from an empty context, and
perplexity = exp(total NLL / number of predicted tokens), each window predicting its last seqlen-1 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

DEFAULT_SEQLEN = 2048


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_predicted: int
    n_windows: int
    seqlen: int

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.seqlen


def tokenize_stream(tokenizer: object, text: str) -> torch.Tensor:
    """The whole text as one [N] tensor of token ids (no special tokens, as the standard protocol)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def model_max_length(model: nn.Module) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def choose_seqlen(model: nn.Module, requested: int | None = None) -> int:
    limit = model_max_length(model)
    seqlen = requested or DEFAULT_SEQLEN
    return min(seqlen, limit) if limit else seqlen


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise LowbitError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    nll, count = 0.0, 0
    bar = tqdm(total=n_windows, desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        if not torch.isfinite(loss):
            raise LowbitError("non-finite loss while evaluating: the model produces NaN/Inf logits")
        nll += loss.item()
        count += batch[:, 1:].numel()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    return PerplexityResult(math.exp(nll / count), nll, count, n_windows, seqlen)
