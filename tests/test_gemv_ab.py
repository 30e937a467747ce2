"""benchmarks/gemv_ab.py: a kernel switch against the default, fastest run of each side compared."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gemv_ab  # noqa: E402
import gemv_speed  # noqa: E402


def _row(shape: tuple[int, int], m: int, ms: float, fmt: str = "nz2_ch") -> dict:
    return {"label": "x", "format": fmt, "batch": m, "shape": list(shape), "ms": ms, "frac_of_copy_bw": 0.01 / ms,
            "speedup_vs_fp16": 3.0}


def test_each_side_keeps_its_fastest_run_and_b_is_compared_to_a() -> None:
    s = (4096, 4096)
    a_runs = [[_row(s, 1, 0.010), _row(s, 8, 0.020)], [_row(s, 1, 0.009), _row(s, 8, 0.022)]]
    b_runs = [[_row(s, 1, 0.012), _row(s, 8, 0.015)], [_row(s, 1, 0.011)]]  # a run that stopped early
    rows = {r["batch"]: r for r in gemv_ab.compare(a_runs, b_runs)}
    assert rows[1]["a_us"] == pytest.approx(9.0) and rows[1]["b_us"] == pytest.approx(11.0)
    assert rows[8]["b_over_a"] == pytest.approx(0.015 / 0.020)


def test_rows_one_side_lacks_are_left_out() -> None:
    s = (4096, 4096)
    assert gemv_ab.compare([[_row(s, 1, 0.01), _row(s, 8, 0.02)]], [[_row(s, 1, 0.01)]])[0]["batch"] == 1
    assert gemv_ab.compare([[_row(s, 1, 0.01)]], [[_row(s, 1, 0.01, "q4_0")]]) == []


def test_summary_lines_count_the_shapes_within_1_5x_on_each_side() -> None:
    ones = [_row(s, 1, 0.010) for s in gemv_speed.LARGE]
    a = gemv_speed.summarize(ones + [_row(s, 8, 0.016) for s in gemv_speed.LARGE])  # 1.6x everywhere
    b = gemv_speed.summarize(ones + [_row(s, 8, 0.014) for s in gemv_speed.LARGE])  # 1.4x everywhere
    lines = gemv_ab.summary_lines(a, b)
    assert len(lines) == 2 and "within 1.5x" not in lines[0]
    assert "within 1.5x 0 -> 5 of 5" in lines[1]


def test_switches_must_be_lowbit_name_value_pairs() -> None:
    assert gemv_ab.parse_sets(["LOWBIT_CUDA_STAGED_ROWS_BIG=0", "LOWBIT_CUDA_TILES=2"]) == {
        "LOWBIT_CUDA_STAGED_ROWS_BIG": "0", "LOWBIT_CUDA_TILES": "2"}
    for bad in ("LOWBIT_CUDA_TILES", "CUDA_VISIBLE_DEVICES=1"):
        with pytest.raises(SystemExit, match="LOWBIT_NAME=VALUE"):
            gemv_ab.parse_sets([bad])


def test_runs_alternate_and_side_b_alone_gets_the_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(env: dict, passthrough: list, tag: str) -> dict:
        calls.append((tag, env.get("LOWBIT_CUDA_STAGED_ROWS_BIG"), passthrough))
        ms = 0.010 if env.get("LOWBIT_CUDA_STAGED_ROWS_BIG") == "0" else 0.012
        return {"device": "GPU", "copy_bw": 3e12, "rows": [_row((4096, 4096), 8, ms)]}

    monkeypatch.setattr(gemv_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(gemv_ab, "run_side", fake_run)
    monkeypatch.delenv("LOWBIT_CUDA_STAGED_ROWS_BIG", raising=False)
    argv = ["--set", "LOWBIT_CUDA_STAGED_ROWS_BIG=0", "--formats", "nz2_ch", "--batch", "8", "--tag", "t"]
    assert gemv_ab.main(argv) == 0
    assert [(tag, v) for tag, v, _ in calls] == [("t-a0", None), ("t-b0", "0"), ("t-a1", None), ("t-b1", "0")]
    assert calls[0][2] == ["--formats", "nz2_ch", "--batch", "8"]
    out = json.loads((tmp_path / "gemv-ab-t.json").read_text())
    assert out["device"] == "GPU" and out["set"] == {"LOWBIT_CUDA_STAGED_ROWS_BIG": "0"} and len(out["rows"]) == 4
    assert out["compare"][0]["b_over_a"] == pytest.approx(10 / 12)


def test_a_tree_puts_side_b_on_another_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []

    def fake_run(env: dict, passthrough: list, tag: str) -> dict:
        paths.append((tag, env.get("PYTHONPATH")))
        return {"device": "GPU", "copy_bw": 3e12, "rows": [_row((4096, 4096), 1, 0.010)]}

    monkeypatch.setattr(gemv_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(gemv_ab, "run_side", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/site")
    with pytest.raises(SystemExit):
        gemv_ab.main(["--tree", str(tmp_path / "base"), "--repeats", "1", "--tag", "t"])  # no checkout there yet
    assert paths == []
    (tmp_path / "base" / "src" / "lowbit").mkdir(parents=True)
    assert gemv_ab.main(["--tree", str(tmp_path / "base"), "--repeats", "1", "--tag", "t"]) == 0
    assert paths == [("t-a0", "/site"), ("t-b0", os.pathsep.join([str(tmp_path / "base" / "src"), "/site"]))]
    assert json.loads((tmp_path / "gemv-ab-t.json").read_text())["tree"] == str(tmp_path / "base")
    with pytest.raises(SystemExit):
        gemv_ab.main(["--tag", "t"])  # neither a switch nor a tree
