"""benchmarks/gguf_vs_llamacpp.py's --lowbit-args take `lowbit export-gguf`'s defaults, the Hessian shrink included."""

import sys
from pathlib import Path

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
