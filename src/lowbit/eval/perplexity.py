"""Perplexity with the standard protocol (as in GPTQ/QuIP#/llama.cpp papers' WikiText-2 numbers).

The text is tokenized as one stream, cut into non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped), each window is scored independently from an empty context, and
perplexity = exp(total NLL / number of predicted tokens), each window predicting its last seqlen-1 tokens.

Given a reference (the 16-bit model), the same pass also measures the mean KL divergence KL(reference || model)
of the next-token distributions and the top-1 agreement, as ``llama-perplexity --kl-divergence`` does: on a small
model perplexity is noisy, KL is the sharper ruler.
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
    kl: float | None = None  # mean KL(reference || model), nats per predicted token
    top1: float | None = None  # fraction of predicted positions where both models' most likely token agree

    def __str__(self) -> str:
        extra = "" if self.kl is None else f", KL {self.kl:.4f} nats/token, top-1 agreement {100 * self.top1:.1f}%"
        return (f"perplexity {self.ppl:.4f}{extra} (seqlen {self.seqlen}, {self.n_windows} windows, "
                f"{self.n_predicted} predicted tokens)")

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


class Reference:
    """A reference model's next-token log-probabilities per window, kept (in float16) while they fit the cache.

    One instance serves every model compared against the same reference, so its forward pass runs once per
    window instead of once per window and model.
    """

    def __init__(self, model: nn.Module, cache_bytes: float = 2e9):
        self.model = model
        self.cache_bytes = cache_bytes
        self._cache: dict[bytes, torch.Tensor] = {}  # keyed by the windows' token ids
        self._held = 0

    @torch.inference_mode()
    def logprobs(self, batch: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [batch, seqlen - 1, vocab] log-probs of the predicted positions of these windows.

        ``logits``: the reference model's own logits for ``batch`` when the caller already has them.
        """
        key = batch.cpu().numpy().tobytes()
        if key in self._cache:
            return self._cache[key].to(batch.device, torch.float32)
        if logits is None:
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=batch.to(device), use_cache=False).logits
        out = F.log_softmax(logits[:, :-1].float(), dim=-1)
        if self._held + out.numel() * 2 <= self.cache_bytes:
            self._cache[key] = out.half().cpu()
            self._held += out.numel() * 2
        return out.to(batch.device)


def kl_and_agreement(ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(sum over positions of KL(ref || model), count of positions whose top-1 tokens agree)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl.sum().item(), (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True, desc: str = "ppl",
               reference: Reference | None = None) -> PerplexityResult:
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise LowbitError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    nll, count, kl, agree = 0.0, 0, 0.0, 0
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
        if reference is not None:
            own = logits if reference.model is model else None  # the reference scoring itself: no second pass
            window_kl, window_agree = kl_and_agreement(reference.logprobs(batch, own), logits[:, :-1])
            kl, agree = kl + window_kl, agree + window_agree
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    if reference is None:
        return PerplexityResult(math.exp(nll / count), nll, count, n_windows, seqlen)
    return PerplexityResult(math.exp(nll / count), nll, count, n_windows, seqlen, kl / count, agree / count)
