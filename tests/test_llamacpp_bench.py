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
