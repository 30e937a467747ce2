"""Bad text and GGUF inputs are one line naming the file, before the model is loaded where that is possible:
text files that are missing, a directory, not UTF-8, empty or too short for one window; GGUF files that are not
GGUF, truncated, damaged, of another architecture or of another model's shapes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
import lowbit.jobs
from conftest import SAMPLE_TEXT, make_model
from lowbit.algorithms.sequential import CalibConfig
from lowbit.cli import main
from lowbit.errors import BadFileError, LowbitError
from lowbit.io.gguf_export import export_gguf
from lowbit.io.gguf_import import load_gguf_weights
from lowbit.io.gguf_types import plan_like
from lowbit.models.walker import round_to_storage


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    """A tiny Llama directory, a Q4_0 GGUF of it, and float GGUFs of a Qwen2 and of a narrower Llama."""
    root = tmp_path_factory.mktemp("inputs")
    vocab = len(tiny_tokenizer)
    llama = round_to_storage(make_model("llama", vocab=vocab))
    llama.save_pretrained(root / "llama")
    tiny_tokenizer.save_pretrained(root / "llama")
    lowbit.quantize(llama, "q4_0", progress=False)
    export_gguf(llama, tiny_tokenizer, root / "llama.gguf")
    export_gguf(make_model("qwen2", vocab=vocab), tiny_tokenizer, root / "qwen2.gguf")
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    export_gguf(narrow, tiny_tokenizer, root / "narrow.gguf")
    return {"llama": root / "llama", "gguf": root / "llama.gguf", "qwen2": root / "qwen2.gguf",
            "narrow": root / "narrow.gguf"}


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(lowbit.jobs, "load", refuse)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line; it must be lowbit's only line on stderr and the last (transformers may draw a progress bar
    while the model loads, before a check that needs the tokenizer)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err, err
    assert lines[0].startswith("lowbit: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ text files

TEXTS = {
    "missing": (None, "text file not found"),
    "directory": ("dir", "is a directory"),
    "not utf-8": (b"caf\xe9 au lait " * 20, "is not UTF-8 text (byte 3 is 0xe9)"),
    "empty": (b" \n\t\n", "text file is empty"),
    "too short": (b"The quick brown fox.", "too few for one window of 64 (use a longer text or a smaller --seqlen)"),
}


def _text(tmp_path: Path, content: bytes | str | None) -> Path:
    path = tmp_path / "text.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(TEXTS))
def test_bad_eval_text_is_one_line(case: str, files: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    content, message = TEXTS[case]
    path = _text(tmp_path, content)
    argv = ["eval", str(files["llama"]), "--text", str(path), "--seqlen", "64", "--no-progress"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert message in err and str(path) in err


def test_bad_calibration_text_fails_before_loading(files: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = _text(tmp_path, b"\xff\xfe binary")
    out = tmp_path / "out"
    _no_loading(monkeypatch)
    argv = ["quantize", str(files["llama"]), "-f", "q4_0", "--method", "gptq", "--calib-text", str(bad), "-o",
            str(out), "--no-progress"]
    assert main(argv) == 2
    assert "is not UTF-8 text" in _one_error_line(capsys) and not out.exists()


def test_calibration_text_too_short_names_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    short = _text(tmp_path, b"The quick brown fox jumps over the lazy dog.")
    recipe = lowbit.Recipe("q4_0", method="gptq", calib=CalibConfig(nsamples=2, seqlen=64, text_path=str(short)))
    out = tmp_path / "out"
    with pytest.raises(BadFileError, match=rf"{short}: .* tokens.*smaller --calib-seqlen"):
        lowbit.convert(files["llama"], recipe, out, device="cpu", progress=False)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# ------------------------------------------------------------------------------------------------------ GGUF files


def test_like_that_is_not_a_gguf(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _no_loading(monkeypatch)
    text = _text(tmp_path, SAMPLE_TEXT.encode())
    out = tmp_path / "x.gguf"
    assert main(["export-gguf", str(files["llama"]), "--like", str(text), "-o", str(out), "--no-progress"]) == 2
    assert "is not a GGUF file (it starts with b'The '" in _one_error_line(capsys) and not out.exists()


def test_like_of_another_architecture_fails_before_loading(files: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _no_loading(monkeypatch)
    out = tmp_path / "x.gguf"
    assert main(["export-gguf", str(files["llama"]), "--like", str(files["qwen2"]), "-o", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"{files['qwen2']} is a GGUF of a 'qwen2' model; this llama model needs 'llama'" in err
    assert not out.exists()


def test_gguf_of_other_shapes_is_refused(files: dict[str, Path], tiny_tokenizer: Any) -> None:
    model = make_model("llama", vocab=len(tiny_tokenizer))
    with pytest.raises(BadFileError, match=r"narrow\.gguf: tensor blk\.0\.attn_q\.weight has shape \[32, 32\], "
                                           r"this model's is \[64, 64\]"):
        plan_like(model, files["narrow"])
    with pytest.raises(BadFileError, match="narrow.gguf: tensor"):
        load_gguf_weights(model, files["narrow"])


@settings(derandomize=True, max_examples=40, deadline=None)
@given(data=st.data())
def test_damaged_gguf_reads_or_raises_lowbit_error(files: dict[str, Path], tiny_tokenizer: Any,
                                                   data: st.DataObject) -> None:
    raw = bytearray(files["gguf"].read_bytes())
    where = st.integers(4, len(raw) - 1)  # past the magic, which has its own test
    for pos, xor in data.draw(st.lists(st.tuples(where, st.integers(1, 255)), max_size=6), label="flips"):
        raw[pos] ^= xor
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(where, label="length")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        path.write_bytes(bytes(raw))
        model = make_model("llama", vocab=len(tiny_tokenizer))
        for read in (plan_like, load_gguf_weights):
            try:
                read(model, path)
            except LowbitError:
                pass
