"""benchmarks/prompt_matmul.py's table and paths (the timing itself needs CUDA)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import prompt_matmul  # noqa: E402


def _rows(name: str, route: str, lowbit: float, tiles: bool) -> list[dict]:
    rows = []
    for shape in prompt_matmul.LARGE:
        row = {"format": name, "shape": list(shape), "m": 512, "route": route, "lowbit": lowbit, "dense": 2.0,
               "reference": 10.0, "fp16": 1.0}
        rows.append(row | ({"tiles": lowbit} if tiles else {}))
    rows.append({"format": name, "shape": [4096, 4096], "m": 64, "route": route, "lowbit": 99.0, "dense": 99.0,
                 "reference": 99.0, "fp16": 99.0})  # another M: not in M = 512's table
    return rows


def test_table_sums_the_five_shapes_and_divides_by_fp16() -> None:
    results = _rows("q4_k", "triton", 2.0, tiles=False) + _rows("q4_0", "triton", 3.0, tiles=True)
    lines = prompt_matmul.table(results, 512).splitlines()
    assert lines[0].startswith("M = 512")
    q4k = next(line for line in lines if line.startswith("| q4_k |"))
    q40 = next(line for line in lines if line.startswith("| q4_0 |"))
    assert q4k == "| q4_k | triton | 10 (2.00x) | 10 (2.00x) |  | 50 (10.00x) | 5 (1.00x) |"
    assert q40 == "| q4_0 | triton | 15 (3.00x) | 10 (2.00x) | 15 (3.00x) | 50 (10.00x) | 5 (1.00x) |"


def test_only_the_scalar_grids_have_a_tile_kernel_and_only_layout_formats_a_held_path() -> None:
    tiles = [(16, 128), (16, 256)]
    base = {"lowbit", "dense", "reference", "fp16"}
    held = {"held 16x128", "held 16x256"}
    for name in ("q4_0", "nz2_ch"):
        assert set(prompt_matmul.paths(name, tiles)) == base | {"tiles"}
    assert set(prompt_matmul.paths("e8p_ch", tiles)) == base
    for name in ("q4_k", "iq2_xxs"):
        assert set(prompt_matmul.paths(name, tiles)) == base | held
    assert set(prompt_matmul.paths("int3_g128_sym", tiles)) == base | {"tiles"} | held
