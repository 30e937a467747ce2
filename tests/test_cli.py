import json

import pytest

from lowbit.cli import main


def test_quantize_info_eval_round_trip(tiny_model_dir, tmp_path, text_file, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 0
    assert "4.5000 bits/weight" in capsys.readouterr().out
    info = json.loads((out / "lowbit.json").read_text())
    assert set(info["formats"].values()) == {"q4_0"} and info["method"] == "rtn"
    assert main(["info", str(out)]) == 0
    assert "14 x q4_0" in capsys.readouterr().out
    assert main(["eval", str(out), "--text", text_file, "--seqlen", "64", "--no-progress"]) == 0
    q_out = capsys.readouterr().out
    assert main(["eval", str(tiny_model_dir), "--text", text_file, "--seqlen", "64", "--no-progress"]) == 0
    f_out = capsys.readouterr().out
    assert "perplexity" in q_out and "seqlen 64" in q_out and q_out != f_out
    # refuses to clobber without --overwrite
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_gptq_via_cli_resumable_dir_cleaned(tiny_model_dir, tmp_path, text_file):
    out = tmp_path / "g"
    args = ["quantize", str(tiny_model_dir), "-f", "int3_g32_asym", "-o", str(out), "--method", "gptq",
            "--nsamples", "4", "--calib-seqlen", "32", "--calib-text", text_file, "--no-progress"]
    assert main(args) == 0
    info = json.loads((out / "lowbit.json").read_text())
    assert info["method"] == "gptq" and info["calibration"]["nsamples"] == 4
    assert not (tmp_path / "g.partial").exists()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "/nonexistent/model", "-f", "q4_0", "-o", "x"], "not found"),
    (["quantize", "MODEL", "-f", "nf4", "-o", "OUT"], "unknown format"),
    (["eval", "MODEL", "--text", "/nonexistent.txt"], "text file not found"),
    (["info", "MODEL"], "not a lowbit quantized model"),
    (["formats", "--shape", "12"], "--shape"),
])
def test_clear_errors(argv, message, tiny_model_dir, tmp_path, capsys):
    argv = [str(tiny_model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lowbit: error:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_nan_weights_clear_error_nothing_written(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    f = tiny_model_dir / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("mlp.down_proj.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_formats_lists_exact_bpw(capsys):
    assert main(["formats", "--shape", "4096x11008"]) == 0
    out = capsys.readouterr().out
    assert "q4_0" in out and "4.500" in out


def test_calibration_size_defaults_follow_the_device():
    from argparse import Namespace

    from lowbit.cli import calib_size

    def size(device, nsamples=None, seqlen=None):
        return calib_size(Namespace(device=device, nsamples=nsamples, calib_seqlen=seqlen))

    assert size("cpu") == (64, 128) and size("cuda") == (128, 2048) and size("cuda:1") == (128, 2048)
    assert size("cpu", 64, 2048) == (64, 2048) and size("cuda", 0) == (0, 2048)  # given values kept (0: refused later)


def test_finetune_epochs_and_rate_follow_the_device_unless_given():
    from lowbit.cli import _recipe, build_parser

    def tuning(*flags):
        cfg = _recipe(build_parser().parse_args(["quantize", "-f", "q4_0", "-o", "x", "--finetune", *flags]),
                      "q4_0").finetune
        return cfg.epochs, cfg.lr

    # docs/gguf.md, "How long +ft tunes": 3 epochs at 3e-3 on a GPU, 2 at 1e-3 on a CPU's smaller batches
    assert tuning("--device", "cpu") == (2.0, 1e-3) and tuning("--device", "cuda") == (3.0, 3e-3)
    assert tuning("--device", "cuda", "--ft-epochs", "1", "--ft-lr", "1e-2") == (1.0, 1e-2)
    assert tuning("--device", "cpu", "--ft-epochs", "4", "--ft-lr", "3e-3") == (4.0, 3e-3)


def test_hessian_shrink_default_at_every_calibration_size_unless_given():
    from argparse import Namespace

    from lowbit.cli import _calib

    def shrink(nsamples, seqlen, given=None):
        args = Namespace(device="cpu", nsamples=nsamples, calib_seqlen=seqlen, calib_text=None, seed=0, blocksize=128,
                         damp=0.01, shrink=given)
        return _calib(args)[1].shrink

    assert shrink(None, None) == 0.5 and shrink(16, 512) == 0.5  # the CPU default (64 x 128) and 16 x 512: 8k tokens
    assert shrink(128, 2048) == 0.5  # the GPU default: 256k tokens of one kind of text (docs/gguf.md)
    assert shrink(16, 512, 0.0) == 0.0 and shrink(128, 2048, 0.3) == 0.3  # --shrink wins


@pytest.mark.parametrize(("argv", "want"), [
    (["generate", "-p", "hi"], "auto"), (["serve"], "auto"), (["generate", "-p", "hi", "--dtype", "bfloat16"], "bf16"),
    (["serve", "--dtype", "float32"], "fp32"), (["eval"], "fp32"), (["compare", "--formats", "q4_0"], "fp32")])
def test_generate_and_serve_load_for_decoding_evaluating_in_float32(argv, want, monkeypatch):
    """generate and serve load with dtype 'auto' (float16 on CUDA, where the packed GEMVs take it; float32 on a
    CPU) unless --dtype says otherwise; eval and compare keep float32."""
    import torch

    import lowbit
    from lowbit.cli import _load, build_parser

    seen = {}
    monkeypatch.setattr(lowbit, "load", lambda model, device=None, dtype=None: seen.setdefault("dtype", dtype))
    _load(build_parser().parse_args(argv))
    assert seen["dtype"] == {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[want]
