"""The README's Python quick start runs as written (on the bundled model, so it is a slow test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_quick_start() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_quick_start_is_found() -> None:
    code = python_quick_start()
    assert "import lowbit" in code and "lowbit.quantize(" in code
    compile(code, "README.md", "exec")


@pytest.mark.slow
def test_readme_python_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(python_quick_start(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "gptq_act:q4_0: 4.5" in out  # the summary: recipe and exact bits per weight of the decoder linears
    assert re.search(r"perplexity [\d.]+, KL [\d.]+ nats/token, top-1 agreement [\d.]+%", out)
    assert (tmp_path / "out/smol-q4_0/lowbit.json").exists() and (tmp_path / "out/smol-q4_0.gguf").exists()
    import lowbit

    reloaded, _ = lowbit.load("out/smol-q4_0", device="cpu")
    assert {m.format_name for m in reloaded.modules() if hasattr(m, "format_name")} == {"q4_0"}
