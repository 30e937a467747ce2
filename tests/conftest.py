"""Tiny random models built in-test (no downloads) shared by the unit tests."""

from __future__ import annotations

import os

import pytest
import torch

from llama_cpp_runner import llama_cpp_logits  # noqa: F401 - the tests import it from here too

# pytest-xdist workers share the machine's cores: each gets its share of torch's threads. Left at torch's default,
# 16 workers on a 16-core GPU machine ran 256 threads, and quantizing a test's weights (IQ2_XXS, E8P, Q5_K at 11008
# columns: 2-6 s alone) did not finish in minutes (benchmarks/results/pinned-gpu-tests-h100.txt).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def _tokenizer(tmp_path_factory):
    """A small real byte-level BPE tokenizer trained on the fly (fast, deterministic, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return fast


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Low-bit quantization stores weights in two, three or four "
    "bits. Perplexity measures how surprised a language model is by held-out text. " * 20
)


@pytest.fixture(autouse=True)
def snapshot_every_layer(monkeypatch):
    """GPTQ checkpoints snapshot the activations at every layer in tests, the layout most tests inspect; the tests
    of replay (a resume that recomputes inputs from committed layers) set SNAPSHOT_SECONDS to infinity."""
    from lowbit.algorithms import sequential

    monkeypatch.setattr(sequential, "SNAPSHOT_SECONDS", 0.0)


@pytest.fixture
def text_file(tmp_path):
    """A small text file (calibration or evaluation text for the tiny models)."""
    f = tmp_path / "text.txt"
    f.write_text(SAMPLE_TEXT * 3)
    return str(f)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory)


def make_model(arch: str, vocab: int = 320, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_model("llama")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny random Llama saved as an ordinary HF directory with a tokenizer."""
    model = make_model("llama", vocab=len(tiny_tokenizer))
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _numpy_breaks_interpreter() -> bool:
    import numpy as np

    return tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 5)


def _skip_without_interpreter() -> None:
    from lowbit.kernels.dispatch import triton_available

    if not triton_available():
        pytest.skip("triton not installed")
    if _numpy_breaks_interpreter():
        pytest.skip("Triton 3.6's interpreter fails on runtime-bounded loops with numpy >= 2.5 (the test extra pins "
                    "numpy < 2.5; GPU images may ship 2.5)")


def run_in_interpreter(script: str, *args: object, parts: int = 2) -> dict:
    """Run ``script`` (which prints one JSON object last) under TRITON_INTERPRET=1 with LOWBIT_KERNELS=triton, in a
    subprocess because both flags are read at import; args are passed JSON-encoded. Skips without triton.

    The interpreter runs on one core: ``parts`` processes run at once, each given every ``parts``-th entry of the
    first argument (the cases; the rest go to each whole), and their objects are merged. A fixed number, not the
    machine's cores, so every machine draws the same inputs. ``parts=1`` for scripts whose work is not per case."""
    shares = [args] if parts == 1 or not args else [(args[0][i::parts], *args[1:]) for i in range(parts)]
    return run_scripts_in_interpreter([(script, share) for share in shares])


def run_scripts_in_interpreter(jobs: list[tuple[str, tuple]]) -> dict:
    """Each (script, args) of ``jobs`` as :func:`run_in_interpreter` runs one, all at once; their objects merged."""
    import json
    import os
    import subprocess
    import sys

    _skip_without_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1", LOWBIT_KERNELS="triton")
    procs = [subprocess.Popen([sys.executable, "-c", script, *(json.dumps(a) for a in args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for script, args in jobs]
    merged: dict = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        merged |= json.loads(stdout.strip().splitlines()[-1])
    return merged


def fails_on_call(real, call: int, error: BaseException):  # noqa: ANN001, ANN201 - wraps any callable
    """``real``, except that its ``call``-th call raises ``error`` (a crash injected mid-run); ``.calls`` counts the
    calls made."""
    calls: list[int] = []

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def sharpen_llama(model, qk: float = 8, head: float = 10):  # noqa: ANN001, ANN201 - a transformers Llama, rounded
    """Peaked attention and logits for a random tiny Llama: with the init's small weights attention is nearly
    uniform and RoPE (hence the GGUF Q/K permutation) barely changes the output; scaled up, a wrong layout moves
    the logits by ~4 (measured) instead of ~0.007."""
    from lowbit.models.walker import round_to_storage

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk)
            layer.self_attn.k_proj.weight.mul_(qk)
        model.lm_head.weight.mul_(head)
    return round_to_storage(model)


def exported_logits(model, tokenizer, path):  # noqa: ANN001, ANN201 - returns (lowbit, llama.cpp) np arrays
    """Export ``model`` to the GGUF ``path`` and return its logits on a fixed sentence from lowbit's own forward
    and from stock llama.cpp on the file (llama_cpp_runner.py: skips without a llama.cpp binding, fails under CI)."""
    from lowbit.io.gguf_export import export_gguf

    export_gguf(model, tokenizer, path)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. Low-bit quantization")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    return want, llama_cpp_logits(path, ids)


# Head of a child process script for the kill/resume tests: the n-th file the sequential checkpoint writes
# (args["kill_at"], args = json of argv[1]) is left half-written and the process SIGKILLed; the test appends the run.
SIGKILL_AT_SAVE = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)  # as the parent, which computes the rest of the model
args = json.loads(sys.argv[1])
from lowbit.algorithms import sequential
sequential.SNAPSHOT_SECONDS = 0.0  # as the conftest fixture: activations at every step
real, n = sequential.save_file, [0]
def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    n[0] += 1
    if n[0] == args["kill_at"]:  # half-written file, then a real SIGKILL
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
sequential.save_file = save_file
"""


def nvrtc_found() -> bool:
    """Whether NVRTC loads here (a CUDA build of PyTorch, or the nvidia-cuda-nvrtc wheel of the test extra)."""
    from lowbit.kernels import cuda_jit

    try:
        cuda_jit._nvrtc()
    except cuda_jit.CudaJitError:
        return False
    return True


def compile_all(jobs: list[tuple[str, str]], filename: str) -> None:
    """NVRTC-compile each (source, arch) of ``jobs`` as ``filename``, one compile per core (the programs are
    independent and ctypes lets go of the GIL, so the thread pool halves these tests on CI's two cores); each must
    give an ELF cubin."""
    from concurrent.futures import ThreadPoolExecutor

    from lowbit.kernels import cuda_jit

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        cubins = list(pool.map(lambda job: cuda_jit.compile_cubin(job[0], filename, job[1]), jobs))
    assert len(cubins) == len(jobs) and all(c[:4] == b"\x7fELF" for c in cubins)
