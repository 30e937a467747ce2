"""Calibration windows (lowbit.calibration.samples): the tokenized calibration text is kept per tokenizer and
text contents, in memory and on disk, and a damaged or unwritable cache only costs time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.calibration import samples


class Tokenizer:
    """A fast-tokenizer stand-in: one id per character, a serialized form, and a count of its calls."""

    def __init__(self, spec: str = "chars-v1"):
        self.calls = 0
        self.backend_tokenizer = self
        self.spec = spec

    def to_str(self) -> str:
        return self.spec

    def __call__(self, text: str, add_special_tokens: bool, return_tensors: str) -> object:
        self.calls += 1
        ids = torch.tensor([[ord(c) % 97 for c in text]])
        return type("Encoding", (), {"input_ids": ids})()


@pytest.fixture
def text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(samples, "_STREAMS", {})
    path = tmp_path / "calib.txt"
    path.write_text("".join(chr(97 + (i * 7919) % 26) for i in range(3000)))
    return str(path)


def test_a_new_tokenizer_reads_the_ids_from_disk(text: str) -> None:
    first = Tokenizer()
    want = samples.calibration_samples(first, 4, 64, text_path=text)
    assert first.calls == 1 and len(list((Path(samples.cache_dir()) / "tokens").glob("*.pt"))) == 1
    samples._STREAMS.clear()  # as a new process
    again = Tokenizer()
    assert torch.equal(samples.calibration_samples(again, 4, 64, text_path=text), want) and again.calls == 0


def test_another_tokenizer_or_text_is_tokenized_again(text: str) -> None:
    samples.calibration_samples(Tokenizer(), 4, 64, text_path=text)
    other = Tokenizer("chars-v2")
    samples.calibration_samples(other, 4, 64, text_path=text)
    assert other.calls == 1
    Path(text).write_text(Path(text).read_text()[::-1])
    same = Tokenizer()
    samples.calibration_samples(same, 4, 64, text_path=text)
    assert same.calls == 1


def test_a_damaged_cache_file_is_tokenized_and_rewritten(text: str) -> None:
    want = samples.calibration_samples(Tokenizer(), 4, 64, text_path=text)
    (cached,) = (Path(samples.cache_dir()) / "tokens").glob("*.pt")
    cached.write_bytes(b"not a tensor")
    samples._STREAMS.clear()
    tok = Tokenizer()
    assert torch.equal(samples.calibration_samples(tok, 4, 64, text_path=text), want) and tok.calls == 1
    assert torch.equal(torch.load(cached, weights_only=True), samples._token_stream(tok, text))


def test_an_unwritable_cache_still_gives_the_windows(text: str, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "tokens").write_text("a file where the cache directory would be")
    tok = Tokenizer()
    assert samples.calibration_samples(tok, 4, 64, text_path=text).shape == (4, 64) and tok.calls == 1


def test_a_tokenizer_without_a_serialized_form_is_kept_in_memory_only(text: str) -> None:
    tok = Tokenizer()
    tok.backend_tokenizer = None
    samples.calibration_samples(tok, 4, 64, text_path=text)
    samples.calibration_samples(tok, 4, 64, text_path=text)
    assert tok.calls == 1 and not (Path(samples.cache_dir()) / "tokens").exists()
