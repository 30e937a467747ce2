"""Text for calibration and evaluation.

Default: the State of the Union corpus (see :mod:`lowbit.data.assets`), split by year so the splits are
disjoint: ``eval`` = addresses from 2000 on (~160k SmolLM2 tokens, the held-out set perplexity is measured
on), ``calib`` = addresses before 2000 (~1.9M tokens). A user's own UTF-8 text file can replace either.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.data.assets import corpus_dir
from lowbit.errors import LowbitError

EVAL_FROM_YEAR = 2000
SPLITS = ("eval", "calib")


def load_text(split: str = "eval", path: str | Path | None = None) -> str:
    """The text of ``split`` (documents joined by blank lines), or the contents of ``path`` if given."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LowbitError(f"text file not found: {p}")
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise LowbitError(f"text file is empty: {p}")
        return text
    if split not in SPLITS:
        raise LowbitError(f"unknown split {split!r}; choose one of {SPLITS}")
    docs = []
    for f in sorted(corpus_dir().glob("*.txt")):
        year = int(f.name[:4])
        if (year >= EVAL_FROM_YEAR) == (split == "eval"):
            docs.append(f.read_text(encoding="utf-8").strip())
    return "\n\n".join(docs)
