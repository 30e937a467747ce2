"""A benchmark script's name must not be an installed module's: ``python benchmarks/x.py`` puts benchmarks/ first on
sys.path, so a script named like a package a dependency imports (transformers imports ``kernels``) replaces it."""

import importlib.machinery
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    others = [p for p in sys.path if p and Path(p).resolve() != BENCHMARKS.resolve()]
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "gemv_speed" in names  # the GEMV benchmark, renamed from kernels.py (the HF `kernels` package)
    shadowed = [n for n in names if n in sys.builtin_module_names
                or importlib.machinery.PathFinder.find_spec(n, others) is not None]
    assert not shadowed, f"benchmarks/ scripts named like installed modules: {shadowed}"
