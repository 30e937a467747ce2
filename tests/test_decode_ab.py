"""benchmarks/decode_ab.py: a kernel switch against the default in the decode step, runs alternating."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import decode_ab  # noqa: E402


def _row(variant: str, tok_s: float, head: str = "fp16", agree: str = "8/8") -> dict:
    return {"variant": variant, "lm_head": head, "tok_s": tok_s, "reference_agree": agree}


def test_variants_compare_by_their_best_run() -> None:
    a = [[_row("nz2_ch", 800.0), _row("fp16", 160.0)], [_row("nz2_ch", 810.0)]]
    b = [[_row("nz2_ch", 780.0, agree="7/8")], [_row("nz2_ch", 790.0), _row("q4_0", 500.0)]]
    rows = decode_ab.compare(a, b)
    assert [r["variant"] for r in rows] == ["nz2_ch"]  # fp16 and q4_0 ran on one side only
    assert rows[0]["a_tok_s"] == [800.0, 810.0] and rows[0]["b_tok_s"] == [780.0, 790.0]
    assert rows[0]["b_over_a"] == pytest.approx(790 / 810) and rows[0]["agree"] == ["7/8", "8/8"]


def test_prefill_times_are_kept_per_run() -> None:
    a = [[_row("q4_0", 500.0) | {"prefill_ms": 291.0}], [_row("q4_0", 501.0) | {"prefill_ms": 292.0}]]
    b = [[_row("q4_0", 499.0) | {"prefill_ms": 46.9}], [_row("q4_0", 502.0)]]  # a run without the field
    row = decode_ab.compare(a, b)[0]
    assert row["a_prefill_ms"] == [291.0, 292.0] and row["b_prefill_ms"] == [46.9]


def test_the_same_variant_with_another_head_is_another_row() -> None:
    a = [[_row("e8p_ch+rht", 578.0), _row("e8p_ch+rht", 611.0, head="e8p_ch")]]
    b = [[_row("e8p_ch+rht", 580.0), _row("e8p_ch+rht", 600.0, head="e8p_ch")]]
    assert {r["lm_head"]: round(r["b_over_a"], 3) for r in decode_ab.compare(a, b)} == {
        "fp16": round(580 / 578, 3), "e8p_ch": round(600 / 611, 3)}


def test_runs_alternate_and_decode_gets_everything_after_the_separator(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(env: dict, passthrough: list, tag: str) -> dict:
        calls.append((tag, env.get("LOWBIT_CUDA_WARPS"), passthrough))
        return {"meta": {"device": "GPU"}, "rows": [_row("nz2_ch", 700.0 if env.get("LOWBIT_CUDA_WARPS") else 750.0)]}

    monkeypatch.setattr(decode_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(decode_ab, "run_side", fake_run)
    monkeypatch.delenv("LOWBIT_CUDA_WARPS", raising=False)
    argv = ["--set", "LOWBIT_CUDA_WARPS=8", "--tag", "t", "--", "--compile", "--formats", "nz2_ch"]
    assert decode_ab.main(argv) == 0
    assert [(tag, w) for tag, w, _ in calls] == [("t-a0", None), ("t-b0", "8"), ("t-a1", None), ("t-b1", "8")]
    assert calls[0][2] == ["--compile", "--formats", "nz2_ch"]
    out = json.loads((tmp_path / "decode-ab-t.json").read_text())
    assert out["device"] == "GPU" and out["set"] == {"LOWBIT_CUDA_WARPS": "8"} and len(out["rows"]) == 4
    assert out["compare"][0]["b_over_a"] == pytest.approx(700 / 750)


def test_a_tree_is_side_b_and_a_side_b_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []

    def fake_run(env: dict, passthrough: list, tag: str) -> dict:
        paths.append(env.get("PYTHONPATH", "").split(os.pathsep)[0])
        return {"meta": {"device": "GPU"}, "rows": [_row("nz2_ch", 700.0)]}

    monkeypatch.setattr(decode_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(decode_ab, "run_side", fake_run)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    (tmp_path / "base" / "src" / "lowbit").mkdir(parents=True)
    assert decode_ab.main(["--tree", str(tmp_path / "base"), "--repeats", "1", "--tag", "t", "--", "--compile"]) == 0
    assert paths == ["", str(tmp_path / "base" / "src")]
    assert json.loads((tmp_path / "decode-ab-t.json").read_text())["tree"] == str(tmp_path / "base")
    with pytest.raises(SystemExit):
        decode_ab.main(["--repeats", "1", "--", "--compile"])


def test_a_run_that_wrote_nothing_leaves_nothing_to_compare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_ab, "RESULTS", tmp_path)
    monkeypatch.setattr(decode_ab, "run_side", lambda env, passthrough, tag: {"rows": []})
    assert decode_ab.main(["--set", "LOWBIT_CUDA_WARPS=8", "--repeats", "1", "--", "--formats", "nz2_ch"]) == 2
    assert not list(tmp_path.iterdir())


def test_end_to_end_on_a_tiny_cpu_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real decode.py processes (2 layers of width 64 on the CPU, where the switch changes nothing)."""
    monkeypatch.setattr(decode_ab, "RESULTS", tmp_path)
    tiny = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab",
            "1000", "--prompt", "8", "--gen", "8", "--repeats", "1", "--formats", "fp16,nz2_ch", "--eager-repeats",
            "0", "--check-tokens", "4"]
    assert decode_ab.main(["--set", "LOWBIT_CUDA_WARPS=8", "--repeats", "1", "--tag", "tiny", "--", *tiny]) == 0
    out = json.loads((tmp_path / "decode-ab-tiny.json").read_text())
    assert [r["variant"] for r in out["compare"]] == ["fp16", "nz2_ch"]
    assert all(r["agree"] == ["4/4"] and len(r["a_tok_s"]) == len(r["b_tok_s"]) == 1 for r in out["compare"])
