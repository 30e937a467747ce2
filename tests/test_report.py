import json

from lowbit.cli import main
from lowbit.eval.report import Point, load_results, pareto_front, series_of


def _p(variant, bpw, ppl):
    return Point(variant, series_of(variant), bpw, ppl)


def _table(md):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return rows[1:]  # without the header


def test_pareto_front_keeps_only_undominated_points():
    pts = [_p("fp16", 16, 20.0), _p("a", 4, 30.0), _p("b", 4, 25.0), _p("c", 3, 40.0), _p("d", 3.5, 45.0),
           _p("e", 2, 100.0), _p("f", 5, 26.0), _p("g", 2, float("nan"))]
    assert [p.variant for p in pareto_front(pts)] == ["e", "c", "b", "fp16"]
    assert pareto_front([]) == []


def test_series_of_variants():
    assert series_of("int4_g128_sym") == "rtn"
    assert series_of("gptq+rht:nz2_ch/int4_g128_sym@15L") == "gptq+rht"
    assert series_of("gptq+rht:nz2_ch+a4+kv4") == "gptq+rht +a4+kv4"
    assert series_of("fp16+kv4") == "fp16 +kv4"


def test_report_from_results(tmp_path, capsys):
    rows = [{"variant": "fp16", "linear_bpw": 16.0, "total_mb": 10.0, "ppl": 20.0},
            {"variant": "int4_g128_sym", "linear_bpw": 4.135, "total_mb": 4.0, "ppl": 30.0},
            {"variant": "gptq:int4_g128_sym", "linear_bpw": 4.135, "total_mb": 4.0, "ppl": 25.0},
            {"variant": "gptq:int2_g64_sym", "linear_bpw": 2.25, "total_mb": 3.0, "ppl": 400.0}]
    f = tmp_path / "quality-x.json"
    f.write_text(json.dumps({"command": "cmd", "header": "model: tiny; H100", "rows": rows}))
    g = tmp_path / "quality-y.json"  # the fp16 row again (deduplicated) and one more variant
    g.write_text(json.dumps({"rows": [rows[0], {"variant": "rtn:int8_g32_sym", "linear_bpw": 8.5, "ppl": 20.1}]}))
    out = tmp_path / "rep"
    assert main(["report", "--from-results", str(f), str(g), "--out", str(out)]) == 0
    assert "gptq:int2_g64_sym, gptq:int4_g128_sym, rtn:int8_g32_sym, fp16" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    cells = {r[0]: r for r in _table(md)}
    assert "model: tiny; H100" in md and "pareto.png" in md and len(cells) == 5
    assert cells["gptq:int4_g128_sym"][1:7] == ["gptq", "4.135", "4.0", "25.00", "+25.0", "yes"]
    assert cells["int4_g128_sym"][6] == "" and cells["fp16"][6] == "yes"
    points, _ = load_results([f, g])
    assert len(points) == 5


def test_report_bad_results_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", "--from-results", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not a lowbit results file" in capsys.readouterr().err


def test_report_measures_end_to_end(tiny_model_dir, tmp_path, text_file, capsys):
    out = tmp_path / "rep"
    argv = ["report", str(tiny_model_dir), "--variants", "fp16,rtn:int4_g32_asym,rtn:int2_g64_sym", "--text",
            text_file, "--seqlen", "64", "--max-windows", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    md = (out / "report.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000
    cells = {r[0]: r for r in _table(md)}
    assert {v: cells[v][2] for v in cells} == {"fp16": "16.000", "rtn:int4_g32_asym": "5.000",
                                              "rtn:int2_g64_sym": "2.250"}
    assert "2 windows x 64 tokens" in md and "command: `lowbit report" in md and "hardware:" in md
