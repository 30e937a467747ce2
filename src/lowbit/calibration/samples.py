"""Calibration samples: n windows of seqlen tokens drawn at seeded random offsets from calibration text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lowbit.atomic import atomic_file
from lowbit.data.assets import cache_dir
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


_STREAMS: dict[str, torch.Tensor] = {}


def _token_stream(tokenizer: object, text_path: str | None) -> torch.Tensor:
    """Tokenized calibration text. Tokenizing the ~10 MB calibration split takes 10-20 s on a 2-core CPU, every
    time a model (and so a tokenizer) is loaded: the ids are kept per (tokenizer, text) contents, in memory and,
    for tokenizers that serialize (the fast ones), in ``$LOWBIT_HOME/tokens``."""
    text = load_text("calib", text_path)
    key = _fingerprint(tokenizer, text)
    if key in _STREAMS:
        return _STREAMS[key]
    path = None if key.startswith("id-") else cache_dir() / "tokens" / f"{key}.pt"
    ids = _read_ids(path)
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        _write_ids(path, ids)
    _STREAMS.clear()
    _STREAMS[key] = ids
    return ids


def _fingerprint(tokenizer: object, text: str) -> str:
    """A digest of the tokenizer's serialized form and the text; ``id-...`` (this process only) for a tokenizer
    that does not serialize."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = backend.to_str() if backend is not None else None
    except Exception:  # noqa: BLE001 - any failure: no persistent key, tokenize as before
        spec = None
    h = hashlib.sha256(text.encode("utf-8"))
    if spec is None:
        return f"id-{id(tokenizer)}-{h.hexdigest()[:16]}"
    h.update(b"\0" + spec.encode("utf-8"))
    return h.hexdigest()[:32]


def _read_ids(path: Path | None) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        ids = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache file is tokenized again (and rewritten)
        return None
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 1 else None


def _write_ids(path: Path | None, ids: torch.Tensor) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) costs only the next run's time."""
    if path is None:
        return
    try:
        with atomic_file(path) as tmp:
            torch.save(ids, tmp)
    except (OSError, LowbitError):
        pass
