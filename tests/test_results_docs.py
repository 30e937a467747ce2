"""docs/results/*.md generated from benchmarks/results/*.json (lowbit.eval.results_docs)."""

import json
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.results_docs import (
    GENERATED_MARK,
    REGENERATE,
    render_results_pages,
    side_by_side,
    write_results_pages,
)

REPO = Path(__file__).resolve().parents[1]
HEADER = ("model: smollm2-135m (bundled); eval: bundled SOTU 2000-2021; GPTQ calibration 128 x 2048 tokens of SOTU "
          "before 2000, damp 0.01, block 128; seqlen 2048, 78 windows, 159666 predicted tokens; compute float32 on "
          "NVIDIA H100 80GB HBM3; lowbit 0.1.0, torch 2.11.0+cu130")

# Rows copied from the real files in benchmarks/results (some fields left out where the pages do not need them).
FP16 = {"variant": "fp16", "linear_bpw": 16.0, "linear_mb": 212.33664, "embed_head_mb": 56.623104,
        "total_mb": 269.030016, "ppl": 21.75011582140609, "delta_pct": 0.0, "quant_s": 2.4e-06, "eval_s": 4.1692}
QUALITY = {
    "quality-t-rtn.json": {"command": "python benchmarks/quality.py --no-progress --set rtn --tag h100-rtn",
                           "header": HEADER, "rows": [FP16, {
                               "variant": "int2_g64_sym", "linear_bpw": 2.25, "linear_mb": 29.85984,
                               "embed_head_mb": 56.623104, "total_mb": 86.553216, "ppl": 45457.40891744058,
                               "delta_pct": 208898.46828724555, "quant_s": 1.0327770689999625, "eval_s": 9.3723}]},
    "quality-t-w2.json": {"command": "python benchmarks/quality.py --no-progress --set w2 --tag h100-w2",
                          "header": HEADER, "rows": [FP16, {
                              "variant": "gptq+rht:nz2_ch", "linear_bpw": 2.0234375, "linear_mb": 26.85312,
                              "embed_head_mb": 56.623104, "total_mb": 83.546496, "ppl": 97.93647956742983,
                              "delta_pct": 350.2802668804293, "quant_s": 114.69958316199995, "eval_s": 23.7127}]},
    "quality-t-a4.json": {"command": "python benchmarks/quality.py --set a4 --tag h100-a4 --no-progress",
                          "header": HEADER, "rows": [FP16, {
                              "variant": "gptq+rht:nz2_ch", "linear_bpw": 2.0234375, "total_mb": 83.546496,
                              "ppl": 88.79806067086942, "delta_pct": 308.26477155342724}, {
                              "variant": "gptq+rht:nz2_ch+a4+kv4", "linear_bpw": 2.0234375, "total_mb": 83.546496,
                              "ppl": 135.66160458319334, "delta_pct": 523.7281938962252}]},
}
GGUF = {"meta": {"model": "bundled SmolLM2-135M", "ctx": 2048, "llama_ppl_chunks": 4,
                 "device": "NVIDIA H100 80GB HBM3", "imatrix": "128 x 512 tokens",
                 "command": "benchmarks/gguf_vs_llamacpp.py --llama-bin /root/llama --tag h100 --types iq2_xxs"},
        "rows": [
            {"label": "lowbit gptq_act+ft", "type": "iq2_xxs", "ppl": 26.617698200197474, "file_mb": 83.826112,
             "bpw_file": 4.98538345996307, "bpw_linears": 3.9046875,
             "matrix_types": {"Q8_0": 1, "IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, "IQ2_XXS": 27},
             "llama_ppl": 24.0723, "llama_ppl_err": 1.01926},
            {"label": "llama.cpp + imatrix", "type": "iq2_xxs", "ppl": 33.91945516313957, "file_mb": 83.826336,
             "bpw_file": 4.985396781896634, "bpw_linears": 3.9046875, "llama_ppl": 30.1151,
             "llama_ppl_err": 1.30305, "kl": 0.31234, "top1": 0.71234},
            {"label": "F16", "type": "F16", "file_mb": 270.9, "bpw_file": 16.11, "bpw_linears": 16.0, "ppl": 21.75,
             "note": "run 1 (H100, same command): transcribed from its printed table", "llama_ppl": 19.876,
             "llama_ppl_err": 0.834}]}
FINETUNE = {"meta": {"command": "benchmarks/finetune_sweep.py --plan pl/q4_0_mse.json --tag h100",
                     "device": "NVIDIA H100 80GB HBM3", "calibration": "128 x 2048"},
            "rows": [
                {"label": "gptq_act:q4_0_mse", "ppl": 23.349547023194418, "windows": 78, "file_mb": 91.892416},
                {"label": "gptq_act:q4_0_mse+ft 2:3e-3", "ppl": 22.415216404789994, "file_mb": 91.892416,
                 "steps": 64, "tuned_tensors": 274, "kl_first": 0.07207401096820831, "kl_last": 0.04207462817430496,
                 "seconds": 36.71146833199998,
                 "config": {"epochs": 2.0, "lr": 0.003, "batch_size": 4, "norms": True, "seed": 0}}]}
KERNELS = {"device": "NVIDIA H100 80GB HBM3", "copy_bw": 3000083437159.89,
           "rows": [{"config": "BLOCK_N: 8, BLOCK_W: 128, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None",
                     "shape": [4096, 4096], "format": "int4_g128_sym", "batch": 1, "bpw": 4.125,
                     "ms": 0.007069036916450218, "fp16_ms": 0.016492799917856852, "bytes": 8667136,
                     "frac_of_copy_bw": 0.4086787236319809, "speedup_vs_fp16": 2.333104228028118,
                     "rel_err": 0.00021394828786648563, "label": "llama2-7b qkvo"}],
           "summary": [{"format": "int4_g128_sym", "batch": 1, "min": 0.4086787236319809,
                        "mean": 0.5118618039329473, "max": 0.5686084603846656, "speedup": 2.363936065909657}]}


def _decode_row(variant: str, bpw: float, total: float, roofline: float, tok_s: float, frac: float) -> dict:
    return {"variant": variant, "bpw": bpw, "bytes": {"total": total}, "roofline_tok_s": roofline, "tok_s": tok_s,
            "prefill_ms": 33.5, "cuda_graph": True, "frac_roofline": frac, "reference_agree": "16/16",
            "profile": {"gpu_us_per_step": 5982.9, "matmul_us_per_step": 5084.4}}


DECODE = {"meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "dtype": "torch.float16",
                   "copy_bw": 2951851266541.6494,
                   "command": "python benchmarks/decode.py --tag h100 --compile --profile --eager-repeats 0",
                   "config": {"layers": 32, "hidden": 4096, "compile": True}, "params": 6738415616,
                   "note": "run with a change that the command no longer makes"},
          "rows": [_decode_row("fp16", 16.0, 13256900608.0, 222.6652634598714, 160.71092748818302, 0.7217602),
                   _decode_row("nz2_ch", 2.003359779792746, 1926610944.0, 1532.1470459484992, 361.76346586994885,
                               0.23611536949183204)]}

LLAMACPP = {"meta": {"command": "python benchmarks/llamacpp_cuda.py --src t.tgz --tag t", "device": "NVIDIA H200",
                     "flash_attn_kernels": False},
            "kernels": [{"type": "q4_0", "batch": 1, "rows": 4096, "cols": 14336, "us": 14.44, "runs": 69864,
                         "gb_s": None}],
            "decode": [{"type": "q2_k", "tok_s": 196.59445, "stddev": 1.292919, "size_gb": 2.532122624,
                        "n_gen": 128, "n_prompt": 0}]}


def _write(folder: Path, name: str, data: object) -> None:
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def _tables(md: str) -> dict[str, list[str]]:
    """Every table row of a page by its first cell (header rows included; later rows win)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)
    for name, data in QUALITY.items():
        _write(folder, name, data)
    _write(folder, "gguf-t.json", GGUF)
    _write(folder, "finetune-sweep-t.json", FINETUNE)
    _write(folder, "kernels-t.json", KERNELS)
    _write(folder, "decode-t.json", DECODE)
    _write(folder, "llamacpp-t.json", LLAMACPP)
    _write(folder, "gptq_layer-t.txt", "a log\n")
    return folder


def test_pages_from_each_family(results: Path, tmp_path: Path):
    out = tmp_path / "docs" / "results"
    written = write_results_pages(results, out)
    assert [p.name for p in written] == ["decode.md", "finetune.md", "gguf.md", "index.md", "kernels.md",
                                         "llamacpp.md", "quality.md"]
    pages = {p.name: p.read_text() for p in written}
    assert all(text.splitlines()[0] == GENERATED_MARK for text in pages.values())

    quality = pages["quality.md"]
    # sections in the sets' reading order, each with its command and the hardware from the header
    assert quality.index("## Round-to-nearest") < quality.index("## 2-bit level sets") < quality.index("## Simulated")
    assert "`python benchmarks/quality.py --no-progress --set w2 --tag h100-w2`" in quality
    assert "* Hardware: NVIDIA H100 80GB HBM3" in quality
    assert "[quality-t-rtn.json](../../benchmarks/results/quality-t-rtn.json)" in quality
    cells = _tables(quality)
    assert cells["int2_g64_sym"] == ["rtn", "2.250", "29.9", "86.6", "45,457", "+208,898", "1.0", "9.4"]
    assert cells["gptq+rht:nz2_ch+a4+kv4"][:6] == ["gptq+rht +a4+kv4", "2.023", "-", "83.5", "135.66", "+523.7"]
    assert cells["nz2_ch"] == ["2.023", "-", "97.94 / 88.80"]  # side by side: the two measurements, file order

    gguf = _tables(pages["gguf.md"])
    assert gguf["IQ2_XXS"] == ["lowbit gptq_act+ft", "83.8", "4.985", "3.905", "26.62", "-", "-", "24.07 ± 1.02",
                               "IQ2_XXS x27, IQ4_NL x150, Q2_K x3, Q4_0 x30, Q8_0 x1", ""]
    # KL to the F16 file and top-1 agreement where a row has them; "-" for rows from before they were measured
    llama_row = next(line for line in pages["gguf.md"].splitlines() if "| llama.cpp + imatrix |" in line)
    assert [c.strip() for c in llama_row.split("|")][7:9] == ["0.3123", "71.2%"]
    assert gguf["F16"][-1] == "[1]" and "[1] run 1 (H100, same command)" in pages["gguf.md"]
    assert pages["gguf.md"].index("| F16 ") < pages["gguf.md"].index("| IQ2_XXS ")  # the float reference first

    tuned = _tables(pages["finetune.md"])["gptq_act:q4_0_mse"]  # the tuned row comes second and wins
    assert tuned == ["2", "0.003", "4", "yes", "64", "274", "0.0721", "0.0421", "36.7", "91.9", "22.42", "-4.0"]

    kernels = _tables(pages["kernels.md"])
    assert kernels["int4_g128_sym"] == ["1", "41%", "51%", "57%", "2.36x"]
    assert kernels["llama2-7b qkvo"] == ["4096x4096", "int4_g128_sym", "1", "4.125", "7.1", "16.5", "41%", "2.33x",
                                         "2.1e-04", "BLOCK_N: 8, BLOCK_W: 128, num_warps: 4, num_stages: 3"]
    assert "`python benchmarks/gemv_speed.py --tag t`" in pages["kernels.md"]

    decode = _tables(pages["decode.md"])
    assert decode["nz2_ch"] == ["2.003", "1927", "1532.1", "361.8", "24%", "2.25x", "-", "-", "33.5",
                                "5983 / 5084", "16/16"]
    assert "copy bandwidth 2952 GB/s" in pages["decode.md"]
    assert "Note: run with a change that the command no longer makes" in pages["decode.md"]

    llamacpp = _tables(pages["llamacpp.md"])
    assert llamacpp["q4_0"] == ["1", "4096x14336", "14.4"] and llamacpp["q2_k"] == ["196.6", "1.3", "2.53"]
    assert "FlashAttention CUDA kernels: off (built without them)" in pages["llamacpp.md"]

    index = pages["index.md"]
    assert "[Quality: perplexity vs bits per weight](quality.md)" in index and REGENERATE in index
    assert "Every JSON file is rendered" in index
    assert "* [gptq_layer-t.txt](../../benchmarks/results/gptq_layer-t.txt)" in index


def test_unknown_json_is_listed_as_not_rendered(results: Path, tmp_path: Path):
    _write(results, "probe-t.json", {"something": [1, 2]})
    _write(results, "list-t.json", [1, 2])  # valid JSON, just not a results object
    _write(results, "decode-ab-t.json", {"compare": []})  # benchmarks/decode_ab.py's, not a decode.py file
    pages = render_results_pages(results, tmp_path / "out")
    assert "* [decode-ab-t.json](../benchmarks/results/decode-ab-t.json): not rendered" in pages["index.md"]
    assert "* [probe-t.json](../benchmarks/results/probe-t.json): not rendered" in pages["index.md"]
    assert "* [list-t.json](../benchmarks/results/list-t.json): not rendered" in pages["index.md"]
    assert "probe-t" not in "".join(text for name, text in pages.items() if name != "index.md")


@pytest.mark.parametrize(("name", "content", "why"), [
    ("quality-bad.json", '{"rows": [', "not valid JSON"),
    ("gguf-bad.json", {"meta": {}, "rows": [{"label": "x", "ppl": 1.0}]}, "rows\\[0\\] has no 'type'"),
    ("decode-bad.json", {"rows": []}, "no 'meta'"),
    ("kernels-bad.json", KERNELS | {"rows": [KERNELS["rows"][0] | {"ms": "fast"}]}, "TypeError"),
    ("quality-bad.json", {"rows": [FP16 | {"ppl": "high"}]}, "ValueError"),  # named, not the other quality files
    ("other-bad.json", "{", "not valid JSON"),  # malformed JSON fails even when no page would show it
    ("llamacpp-bad.json", {"meta": {}, "decode": [{"type": "q2_k"}]}, "decode\\[0\\] has no 'tok_s'"),  # optional
])
def test_malformed_file_is_an_error_naming_it(results: Path, tmp_path: Path, name: str, content: object, why: str):
    _write(results, name, content)
    with pytest.raises(LowbitError, match=f"{name}.*{why}"):
        write_results_pages(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written when a file is bad


def test_llamacpp_file_of_some_steps(results: Path, tmp_path: Path):
    """llamacpp_cuda.py --steps build,models,decode: decode rows and no GEMV rows."""
    _write(results, "llamacpp-t.json", {k: v for k, v in LLAMACPP.items() if k != "kernels"})
    page = render_results_pages(results, tmp_path / "out")["llamacpp.md"]
    assert _tables(page)["q2_k"] == ["196.6", "1.3", "2.53"]
    assert "ggml type" not in page  # no empty GEMV table


def test_stale_generated_page_is_removed_hand_written_kept(results: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-family.md").write_text(GENERATED_MARK + "\n# gone\n")
    (out / "notes.md").write_text("# written by hand\n")
    write_results_pages(results, out)
    assert not (out / "old-family.md").exists() and (out / "notes.md").exists()


def test_missing_results_folder(tmp_path: Path):
    with pytest.raises(LowbitError, match="results folder not found"):
        write_results_pages(tmp_path / "nope", tmp_path / "out")


def test_side_by_side_orders_methods_and_skips_simulation():
    rows = [FP16, {"variant": "gptq:int4_g128_sym", "linear_bpw": 4.135, "ppl": 33.63},
            {"variant": "int4_g128_sym", "linear_bpw": 4.135, "ppl": 30.34},
            {"variant": "rtn:int4_g128_sym+a4+kv4", "linear_bpw": 4.135, "ppl": 4548.3},
            {"variant": "gptq:int2_g64_sym", "linear_bpw": 2.25, "ppl": 416.58}]
    cells = _tables(side_by_side(rows))
    assert cells["format"] == ["bpw (linears)", "rtn ppl", "gptq ppl"]
    assert cells["fp16"] == ["16.000", "21.75", "21.75"]
    assert cells["int4_g128_sym"] == ["4.135", "30.34", "33.63"] and cells["int2_g64_sym"] == ["2.250", "-", "416.58"]
    assert "int4_g128_sym+a4+kv4" not in cells


def test_committed_pages_match_the_results_files():
    """docs/results/*.md is exactly what the JSON in benchmarks/results renders to: the pages cannot drift."""
    out = REPO / "docs" / "results"
    expected = render_results_pages(REPO / "benchmarks" / "results", out)
    committed = {p.name: p.read_text() for p in sorted(out.glob("*.md"))
                 if p.read_text().startswith(GENERATED_MARK + "\n")}
    stale = sorted(name for name in expected.keys() | committed.keys() if expected.get(name) != committed.get(name))
    assert not stale, f"docs/results out of date ({', '.join(stale)}): regenerate with {REGENERATE}"


def test_gguf_file_of_stock_perplexity_alone(results: Path, tmp_path: Path):
    """gguf_vs_llamacpp.py --max-windows 0 --llama-ppl-chunks -1: rows without lowbit's ppl, every window."""
    stock = {"meta": GGUF["meta"] | {"max_windows": 0, "llama_ppl_chunks": -1, "ctx": 512},
             "rows": [{k: v for k, v in r.items() if k not in ("ppl", "kl", "top1")} for r in GGUF["rows"]]}
    _write(results, "gguf-stock.json", stock)
    page = next(p for p in write_results_pages(results, tmp_path / "out") if p.name == "gguf.md").read_text()
    section = page[page.index("gguf-stock.json)\n"):]
    assert "Windows of 512 tokens: lowbit's protocol not run; llama-perplexity on every window" in section
    cells = next(cells for line in section.splitlines()
                 if (cells := [c.strip() for c in line.split("|")])[2:3] == ["lowbit gptq_act+ft"])
    assert cells[6:10] == ["-", "-", "-", "24.07 ± 1.02"]  # ppl, KL, top-1 not measured; llama-perplexity's
