"""benchmarks/llamacpp_cuda.py without a GPU: its parsers on llama.cpp's own output formats, and its random GGUF,
which stock llama.cpp must load, run and quantize."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import llamacpp_cuda as bench  # noqa: E402
from llama_cpp_runner import llama_cpp_logits, llama_cpp_quantize  # noqa: E402

# test-backend-ops perf console lines (ANSI colours and alignment as it prints them)
PERF = """Testing 2 devices

Backend 1/2: CUDA0
  Device description: NVIDIA H200
  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1):            \
     69540 runs -    14.48 us/run - 117.44 MFLOP/run -   8.11 \x1b[1;34mTFLOPS\x1b[0m
  MUL_MAT(type_a=iq2_xxs,type_b=f32,m=4096,n=8,k=14336,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1):         \
     8520 runs -    31.02 us/run - 939.52 MFLOP/run -  30.29 \x1b[1;34mTFLOPS\x1b[0m
  MUL_MAT(type_a=f16,type_b=f32,m=4096,n=1,k=14336,bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1): not supported
  Backend CUDA0: OK
"""


def test_perf_lines_are_parsed():
    rows = bench.parse_perf(PERF)
    assert rows == [
        {"type": "q4_0", "batch": 1, "rows": 4096, "cols": 14336, "us": 14.48, "runs": 69540, "gb_s": None},
        {"type": "iq2_xxs", "batch": 8, "rows": 4096, "cols": 14336, "us": 31.02, "runs": 8520, "gb_s": None},
    ]


def _perf_line(t: str, m: int, n: int, k: int, us: float) -> str:
    params = f"type_a={t},type_b=f32,m={m},n={n},k={k},bs=[1,1],nr=[1,1],per=[0,1,2,3],k_v=0,o=1"
    return f"  MUL_MAT({params}): 100 runs - {us} us/run"


def test_kernels_keep_the_five_shapes_and_the_fastest_of_a_repeated_case(monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["pattern"] = cmd[cmd.index("-p") + 1]
        return "\n".join([_perf_line("q4_K", 14336, 1, 4096, 9.5), _perf_line("q4_K", 14336, 1, 4096, 9.0),
                          _perf_line("q4_K", 4096, 1, 14336, 12.0), _perf_line("q4_K", 6144, 1, 4096, 5.0)])

    monkeypatch.setattr(bench, "run", fake_run)
    rows = bench.kernels(Path("bin"), ["q4_K"], [1])
    assert sorted((r["rows"], r["cols"], r["us"]) for r in rows) == [(4096, 14336, 12.0), (14336, 4096, 9.0)]
    import re

    for m, k in bench.SHAPES:  # the filter passes every shape test-backend-ops is asked for
        assert re.search(seen["pattern"], f"type_a=q4_K,type_b=f32,m={m},n=1,k={k},bs=[1,1]")


def test_perf_shapes_are_added_once_beside_ggmls_own_case(tmp_path):
    cpp = tmp_path / "tests" / "test-backend-ops.cpp"
    cpp.parent.mkdir()
    body = ("static std::vector<std::unique_ptr<test_case>> make_test_cases_perf() {\n" + bench._PERF_ANCHOR +
            "        for (ggml_type type_a : all_types) {\n")
    cpp.write_text(body)
    assert bench.add_perf_shapes(tmp_path) is True
    text = cpp.read_text()
    assert text.index(bench._PERF_MARK) < text.index(bench._PERF_ANCHOR) and text.endswith(body.split("\n", 1)[1])
    assert all(f"{{{m}, {k}}}" in text for m, k in bench.SHAPES if (m, k) != bench.GGML_PERF_SHAPE)
    assert "{4096, 14336}" not in text  # ggml's perf set has it already
    assert bench.add_perf_shapes(tmp_path) is False and cpp.read_text() == text  # once
    cpp.write_text("another version of the file\n")
    assert bench.add_perf_shapes(tmp_path) is False and cpp.read_text() == "another version of the file\n"


def test_a_source_folder_is_copied_without_history_builds_or_models(tmp_path):
    src = tmp_path / "llama.cpp"
    for f in ("CMakeLists.txt", "cmake/build-info.cmake", "common/build-info.cpp.in", "build/bin/x", "build-cuda/y",
              ".git/HEAD", "models/ggml-vocab.gguf", "tests/test-backend-ops.cpp"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text(f)
    tree = bench.source_tree(src, tmp_path / "work")
    kept = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert kept == ["CMakeLists.txt", "cmake/build-info.cmake", "common/build-info.cpp.in",
                    "tests/test-backend-ops.cpp"]
    assert tree != src and (src / "build/bin/x").exists()


def test_bench_json_is_parsed():
    text = json.dumps([{"model_type": "llama 7B Q4_0", "model_size": 3825065984, "n_prompt": 0, "n_gen": 128,
                        "avg_ts": 221.4, "stddev_ts": 0.8}])
    assert bench.parse_bench(text) == [{"tok_s": 221.4, "stddev": 0.8, "size_gb": 3.825065984, "n_gen": 128,
                                        "n_prompt": 0}]


def test_build_options_are_read_from_the_cmake_cache(tmp_path):
    assert bench.cmake_option(tmp_path, "GGML_CUDA_FA") is None  # not built yet
    (tmp_path / "CMakeCache.txt").write_text("GGML_CUDA:BOOL=ON\nGGML_CUDA_FA:BOOL=OFF\n")
    assert bench.cmake_option(tmp_path, "GGML_CUDA_FA") is False
    assert bench.cmake_option(tmp_path, "GGML_CUDA") is True
    assert bench.cmake_option(tmp_path, "GGML_CUDA_GRAPHS") is None


def test_random_gguf_runs_and_quantizes_in_stock_llama_cpp(tmp_path):
    shape = {"layers": 2, "hidden": 256, "intermediate": 512, "heads": 4, "vocab": 320}
    f16 = tmp_path / "random-f16.gguf"
    bench.write_random_f16(f16, shape)
    import gguf

    reader = gguf.GGUFReader(str(f16))
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 3 + 9 * shape["layers"]
    assert names["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert list(names["blk.1.ffn_down.weight"].shape) == [512, 256]  # ggml order: columns first
    logits = llama_cpp_logits(f16, [1, 5, 9, 300])
    assert logits.shape == (4, shape["vocab"]) and np.isfinite(logits).all()
    q4 = tmp_path / "random-q4_0.gguf"
    llama_cpp_quantize(f16, q4, "Q4_0")
    assert q4.stat().st_size < f16.stat().st_size / 2


def test_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--src", "/nonexistent", "--steps", "build,warp"])
    assert "unknown steps" in capsys.readouterr().err
