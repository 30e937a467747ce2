"""The import rule of docs/DESIGN.md: every module imports only from its own layer or the layers below it, and no
import loop exists anywhere (imports inside functions count: they are how loops hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A package name stands for all its modules; top-level modules not listed are in the top layer.
LAYERS: list[set[str]] = [
    {"lowbit.errors", "lowbit.atomic"},
    {"lowbit.data"},
    {"lowbit.rotations"},
    {"lowbit.formats"},
    {"lowbit.kernels"},
    {"lowbit.models"},
    {"lowbit.io"},
    {"lowbit.calibration"},
    {"lowbit.eval"},
    {"lowbit.algorithms"},
    {"lowbit.serve"},
]
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return TOP


MODULES = {module_name(p) for p in (SRC / "lowbit").rglob("*.py")}


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported lowbit module, line) for every import in the file, at any depth. ``from pkg import name`` counts
    as an import of ``pkg.name`` where that is a module (``from lowbit.kernels import cuda_gemv``), else of ``pkg``
    (``from lowbit import __version__`` imports nothing)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowbit":
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    found.append((f"{node.module}.{a.name}", node.lineno))
                elif node.module != "lowbit":
                    found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "lowbit"]
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    # The package root is a facade: it re-exports the API lazily and is imported by nothing inside lowbit.
    return {module_name(p): imports(p) for p in (SRC / "lowbit").rglob("*.py") if p.name != "__init__.py"
            or p.parent != SRC / "lowbit"}


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = [f"{mod} (layer {layer_of(mod)}) imports {target} (layer {layer_of(target)}) at line {line}"
              for mod, targets in graph().items() for target, line in targets if layer_of(target) > layer_of(mod)]
    assert not upward, "\n".join(upward)


def _resolve(target: str, modules: set[str]) -> str | None:
    """The module an import names, or the package's __init__ for `from pkg import name`."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_loops() -> None:
    g = graph()
    modules = set(g)
    edges = {m: {r for t, _ in ts if (r := _resolve(t, modules)) and r != m} for m, ts in g.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import loop: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for t in sorted(edges[m]):
            visit(t, path + [m])
        done.add(m)

    for m in sorted(modules):
        visit(m, [])


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import written into a file is reported."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from lowbit.serve.app import serve\n")
    assert imports(f) == [("lowbit.serve.app", 2)]
    f.write_text("from lowbit.kernels import dispatch, verified\nfrom lowbit.formats import UniformFormat\n")
    assert imports(f) == [("lowbit.kernels.dispatch", 1), ("lowbit.kernels.verified", 1), ("lowbit.formats", 2)]
    assert layer_of("lowbit.serve.app") > layer_of("lowbit.formats.base")
