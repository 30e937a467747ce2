"""benchmarks/rotation_sides.py: lowbit compare with +rht on input sides or both, one draw per seed, and its table."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():  # noqa: ANN202
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import rotation_sides
    finally:
        sys.path.remove(str(BENCHMARKS))
    return rotation_sides


@pytest.fixture
def bench(monkeypatch):  # noqa: ANN001, ANN201
    """The benchmark module; run() replaces the quantizers' rotation draw for the rest of its process, so the test
    puts the real one back afterwards."""
    import lowbit.algorithms.rtn as rtn
    import lowbit.algorithms.sequential as sequential

    for module in (rtn, sequential):
        monkeypatch.setattr(module, "layer_rotation", module.layer_rotation)
    return _bench()


def test_runs_pair_by_seed_and_tabulate(bench, tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    import lowbit.algorithms.rtn as rtn

    seen = []
    real = rtn.layer_rotation

    def spy(name, seed, output_side=False):  # noqa: ANN001, ANN202
        rotation = real(name, seed, output_side)
        seen.append((seed, rotation.seed_out is not None))
        return rotation

    monkeypatch.setattr("lowbit.models.fused_linears.layer_rotation", spy)
    files = []
    for sides in ("input", "both"):
        out = tmp_path / f"{sides}.json"
        args = ["run", "--sides", sides, "--seed", "3", "--out", str(out), "--", str(tiny_model_dir), "--text",
                text_file, "--seqlen", "32", "--max-windows", "2", "--formats", "fp16,rtn+rht:int4_g32_sym",
                "--no-progress"]
        assert bench.main(args) == 0
        assert json.loads(out.read_text())["rotation"] == {"sides": sides, "seed": 3}
        files.append(str(out))
    assert {s for s, _ in seen} == {3} and {o for _, o in seen} == {False, True}
    capsys.readouterr()
    combined = tmp_path / "all.json"
    assert bench.main(["table", *files, "--json", str(combined)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "rtn+rht:int4_g32_sym, both sides" in lines[0] and "rtn+rht:int4_g32_sym, input sides" in lines[0]
    assert [line.split(" |")[0] for line in lines[2:]] == ["| 3", "| mean"]
    assert bench.main(["table", str(combined)]) == 0  # the combined file gives the same table
    assert capsys.readouterr().out.strip().splitlines() == lines


def test_only_rotates_the_named_linears(bench, tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    import lowbit.algorithms.rtn as rtn

    rotated = []
    real = rtn.layer_rotation

    def spy(name, seed, output_side=False):  # noqa: ANN001, ANN202
        rotated.append(name)
        return real(name, seed, output_side)

    monkeypatch.setattr("lowbit.models.fused_linears.layer_rotation", spy)
    _run_input_sides(bench, ["--only", "mlp.down_proj"], tiny_model_dir, text_file, tmp_path, capsys,
                     {"only": ["mlp.down_proj"]}, "mlp.down_proj only")
    assert rotated and all(n.endswith(".mlp.down_proj") for n in rotated)


def _run_input_sides(bench, options, model_dir, text_file, tmp_path, capsys, recorded, label):  # noqa: ANN001, ANN202
    """``run --sides input`` with ``options`` on the tiny model: the file records them, the table labels them."""
    out = tmp_path / "run.json"
    args = ["run", "--sides", "input", *options, "--out", str(out), "--", str(model_dir), "--text", text_file,
            "--seqlen", "32", "--max-windows", "2", "--formats", "fp16,rtn+rht:int4_g32_sym", "--no-progress"]
    assert bench.main(args) == 0
    assert json.loads(out.read_text())["rotation"] == {"sides": "input", "seed": 0} | recorded
    capsys.readouterr()
    assert bench.main(["table", str(out)]) == 0
    assert f"rtn+rht:int4_g32_sym, input sides, {label}" in capsys.readouterr().out


def test_fold_norms_folds_before_quantizing(bench, tiny_model_dir, text_file, tmp_path, monkeypatch):
    import lowbit.comparison as comparison
    import lowbit.models.fused_rotation as fused_rotation

    monkeypatch.setattr(comparison, "quantize", comparison.quantize)
    folded = []
    real = fused_rotation.fold_layer_norms
    monkeypatch.setattr(fused_rotation, "fold_layer_norms", lambda model: folded.append(model) or real(model))
    out = tmp_path / "fold.json"
    args = ["run", "--sides", "input", "--fold-norms", "--out", str(out), "--", str(tiny_model_dir), "--text",
            text_file, "--seqlen", "32", "--max-windows", "2", "--formats", "fp16,rtn+rht:int4_g32_sym",
            "--no-progress"]
    assert bench.main(args) == 0
    assert len(folded) == 1  # the quantized variant's copy, not the fp16 reference
    assert json.loads(out.read_text())["rotation"] == {"sides": "input", "seed": 0, "fold_norms": True}


def test_blocks_drop_the_dense_factor_of_one_size(monkeypatch):
    import torch

    import lowbit.rotations.incoherence as incoherence

    monkeypatch.setattr(incoherence, "hadamard_of", incoherence.hadamard_of)
    _bench()._block_diagonal(192)
    h = incoherence.hadamard_of(192, 5, 2)  # 192 = 12 x 16: a Hadamard factor of order 12
    assert incoherence.hadamard_of(192, 5, 2) is h  # drawn once, as hadamard_of's users expect
    r = h.matrix()
    assert (h.m, h.p) == (12, 16) and torch.allclose(r @ r.t(), torch.eye(192), atol=1e-5)
    blocks = r.reshape(12, 16, 12, 16).permute(0, 2, 1, 3).abs().sum((2, 3))
    assert torch.count_nonzero(blocks) == 12 and torch.count_nonzero(blocks.diagonal()) == 12  # block-diagonal
    other = incoherence.hadamard_of(96, 5, 2)  # another size keeps its dense factor
    assert other.m > 1 and not torch.equal(other.factor, torch.eye(other.m))


def test_layout_draws_every_transform_in_that_layout(bench, tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    import lowbit.rotations.incoherence as incoherence

    layouts = []
    real = incoherence.hadamard_of
    monkeypatch.setattr(incoherence, "hadamard_of", lambda n, seed, layout: layouts.append(layout) or
                        real(n, seed, layout))
    _run_input_sides(bench, ["--layout", "3"], tiny_model_dir, text_file, tmp_path, capsys, {"layout": 3}, "layout 3")
    assert layouts and set(layouts) == {3}
