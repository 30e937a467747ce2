"""Stock llama.cpp for the agreement tests: its logits for a token sequence, its tokenizer and its own quantizer
(``llama-quantize``), on a GGUF file, through whichever Python binding is installed.

* ``cyllama`` (the ``test`` extra): a prebuilt manylinux2014 wheel with llama.cpp b9190 linked in (no compiler, no
  download at test time), used through its one-to-one wrappers of llama.h (LlamaModel, LlamaContext, LlamaBatch,
  LlamaVocab, model_quantize).
* ``llama_cpp`` (llama-cpp-python), where that is what is installed (PyPI has only its sdist: a ~35-minute build).

llama-cpp-py-sync was tried first: every version's wheel is tagged manylinux2014 but its libllama needs glibc 2.38
(``__isoc23_strtol`` & co.), and the Debian 12 machines CI runs on have 2.36, so it cannot load there.

Without a binding, the tests that need one skip, except where the environment variable ``CI`` is set (CI sets it):
there they fail, so a broken install can never pass as a run of skips.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import pytest

N_THREADS = 2
BACKENDS = ("cyllama", "llama_cpp")


@cache
def backend() -> str | None:
    """The installed binding (first of :data:`BACKENDS`), or None."""
    return next((name for name in BACKENDS if importlib.util.find_spec(name) is not None), None)


def require_llama_cpp() -> str:
    """The binding to use; without one, skip the calling test (fail it under CI)."""
    name = backend()
    if name is None:
        msg = "stock llama.cpp is not installed (pip install -e '.[test]' installs cyllama)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{msg}; CI runs every llama.cpp agreement test")
        pytest.skip(msg)
    return name


def llama_cpp_logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), n_vocab] for ``ids`` at positions 0, 1, ... of the GGUF ``path``: one batch
    that asks for every position's output, as perplexity scoring needs."""
    if require_llama_cpp() == "llama_cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=max(64, len(ids)), n_threads=N_THREADS,
                              verbose=False, seed=0)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    cy = _cyllama()
    with _cy_model(path) as model:
        n_ctx = max(64, len(ids))
        params = cy.LlamaContextParams()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = N_THREADS
        ctx = cy.LlamaContext(model, params)
        try:
            batch = cy.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
            for pos, token in enumerate(ids):
                batch.add(token, pos, [0], True)
            ctx.decode(batch)
            return np.array([ctx.get_logits_ith(i) for i in range(len(ids))], dtype=np.float32)
        finally:
            ctx.close()


def llama_cpp_tokenize(path: str | Path, text: str) -> list[int]:
    """llama.cpp's token ids for ``text`` with the GGUF's tokenizer: no BOS/EOS added, special tokens written in
    the text parsed (as Hugging Face's ``encode`` does)."""
    if require_llama_cpp() == "llama_cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
        return list(llm.tokenize(text.encode(), add_bos=False, special=True))
    with _cy_model(path) as model:  # the whole model: loading vocab_only aborts in llama-hparams.cpp (b9190)
        return list(model.get_vocab().tokenize(text, False, True))


def llama_cpp_quantize(src: str | Path, dst: str | Path, preset: str) -> None:
    """``llama-quantize SRC DST PRESET`` (no importance matrix): llama.cpp's own per-tensor type choice."""
    import gguf

    ftype = int(gguf.LlamaFileType[f"MOSTLY_{preset}"])
    if require_llama_cpp() == "llama_cpp":
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, N_THREADS
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        return
    cy = _cyllama()
    params = cy.LlamaModelQuantizeParams()  # llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, N_THREADS
    cy.model_quantize(str(src), str(dst), params)  # raises RuntimeError on failure


@cache
def _cyllama():  # noqa: ANN202 - the cyllama.llama.llama_cpp module
    import cyllama.llama.llama_cpp as cy

    cy.disable_logging()  # llama.cpp logs every load to stderr otherwise
    cy.llama_backend_init()
    return cy


@cache
def _cy_model_class() -> type:
    class Model(_cyllama().LlamaModel):
        """cyllama 0.2.18's get_logits / get_logits_ith read ``context.model.n_vocab``, which its LlamaModel lacks."""

        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    return Model


@contextmanager
def _cy_model(path: str | Path):  # noqa: ANN202 - yields a cyllama LlamaModel
    model = _cy_model_class()(str(path), _cyllama().LlamaModelParams())
    try:
        yield model
    finally:
        model.close()
