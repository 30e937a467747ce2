"""Text for calibration and evaluation.

Default: the State of the Union corpus (see :mod:`lowbit.data.assets`), split by year so the splits are
disjoint: ``eval`` = addresses from 2000 on (~160k SmolLM2 tokens, the held-out set perplexity is measured
on), ``calib`` = addresses before 2000 (~1.9M tokens). A user's own UTF-8 text file can replace either.
``factbook`` is a second held-out text of another kind (encyclopedic country profiles from the CIA World Factbook,
~150k tokens): quality measured on it shows whether calibration and tuning on the speeches carry over.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.data.assets import corpus_dir, factbook_dir
from lowbit.errors import BadFileError, LowbitError

EVAL_FROM_YEAR = 2000
SPLITS = ("eval", "calib", "factbook")
NAMED_TEXTS = ("factbook",)  # what --text accepts besides a file


def read_text_file(path: str | Path) -> str:
    """The contents of a user's text file; one LowbitError line naming it if it is missing, a directory,
    unreadable, not UTF-8 or empty (whitespace only)."""
    p = Path(path)
    if not p.exists():
        raise BadFileError(f"text file not found: {p}")
    if p.is_dir():
        raise BadFileError(f"{p} is a directory; pass a UTF-8 text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(f"{p} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise BadFileError(f"cannot read {p}: {e.strerror or e}") from None
    if not text.strip():
        raise BadFileError(f"text file is empty: {p}")
    return text


def bundled_name(path: str | Path | None) -> str | None:
    """``path`` as the name of a bundled held-out text (``--text factbook``), unless a file of that name exists."""
    return str(path) if path is not None and str(path) in NAMED_TEXTS and not Path(path).exists() else None


def load_text(split: str = "eval", path: str | Path | None = None) -> str:
    """The text of ``split`` (documents joined by blank lines), or the contents of ``path`` if given (a file, or
    a bundled text's name)."""
    if (name := bundled_name(path)) is not None:
        split, path = name, None
    if path is not None:
        return read_text_file(path)
    if split not in SPLITS:
        raise LowbitError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "factbook":
        return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in sorted(factbook_dir().glob("*.txt")))
    docs = []
    for f in sorted(corpus_dir().glob("*.txt")):
        year = int(f.name[:4])
        if (year >= EVAL_FROM_YEAR) == (split == "eval"):
            docs.append(f.read_text(encoding="utf-8").strip())
    return "\n\n".join(docs)


def require_tokens(path: str | Path, n_tokens: int, needed: int, flag: str) -> None:
    """A user's text must hold ``needed`` tokens (one window); the error names the file and the flag to lower."""
    if n_tokens < needed:
        raise BadFileError(f"{path} has {n_tokens} tokens, too few for one window of {needed} (use a longer text "
                           f"or a smaller {flag})")
