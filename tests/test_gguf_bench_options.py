"""benchmarks/gguf_vs_llamacpp.py's --lowbit-args take `lowbit export-gguf`'s defaults, the Hessian shrink included."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gguf_vs_llamacpp as bench  # noqa: E402


def shrink(extra: str) -> float:
    recipe, _ = bench.lowbit_recipes("gptq_act", bench.lowbit_options(extra))["gptq_act"]
    return recipe.gptq.shrink


def test_shrink_is_the_clis_unless_given():
    from lowbit.cli import HESSIAN_SHRINK

    assert HESSIAN_SHRINK > 0
    assert shrink("--nsamples 64 --calib-seqlen 128") == HESSIAN_SHRINK  # 8k tokens: the CPU default
    assert shrink("") == HESSIAN_SHRINK  # 128 x 2048: the GPU default
    assert shrink("--nsamples 16 --calib-seqlen 512 --shrink 0") == 0.0
    assert shrink("--shrink 0.3") == 0.3


def test_methods_none_is_llama_cpp_files_alone():
    assert bench.lowbit_recipes("none", bench.lowbit_options("")) == {}


def fake_tool(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "llama-perplexity"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


def test_llama_perplexity_reads_the_final_estimate_and_passes_the_windows(tmp_path):
    exe = fake_tool(tmp_path, 'echo "[1]12.1,[2]12.4"; echo "Final estimate: PPL = 12.3456 +/- 0.10250" >&2')
    ppl, err = bench.llama_perplexity(exe, Path("m.gguf"), Path("t.txt"), 512, -1, 3, tmp_path / "log")
    assert (ppl, err) == (12.3456, 0.1025)
    assert (tmp_path / "args").read_text().split() == ["-m", "m.gguf", "-f", "t.txt", "-c", "512", "-b", "512",
                                                       "--chunks", "-1", "-t", "3"]


def test_llama_perplexity_without_an_estimate_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="no final estimate"):
        bench.llama_perplexity(fake_tool(tmp_path, "echo nothing"), Path("m"), Path("t"), 512, 4, 1, tmp_path / "l")
