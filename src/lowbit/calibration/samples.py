"""Calibration samples: n windows of seqlen tokens drawn at seeded random offsets from calibration text."""

from __future__ import annotations

import torch

from lowbit.data.corpus import load_text
from lowbit.errors import LowbitError

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048


def calibration_samples(tokenizer: object, nsamples: int = DEFAULT_NSAMPLES, seqlen: int = DEFAULT_SEQLEN,
                        text_path: str | None = None, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids from the bundled ``calib`` split (or a user's text file).

    As in GPTQ: one token stream, random window starts (seeded, so runs are reproducible).
    """
    if nsamples < 1 or seqlen < 2:
        raise LowbitError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    ids = _token_stream(tokenizer, text_path)
    if ids.numel() <= seqlen:
        raise LowbitError(f"calibration text has {ids.numel()} tokens; need more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


_STREAMS: dict[tuple[int, str | None], torch.Tensor] = {}


def _token_stream(tokenizer: object, text_path: str | None) -> torch.Tensor:
    """Tokenized calibration text, memoized per tokenizer (tokenizing ~10 MB takes seconds)."""
    key = (id(tokenizer), text_path)
    if key not in _STREAMS:
        text = load_text("calib", text_path)
        _STREAMS.clear()
        _STREAMS[key] = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return _STREAMS[key]
