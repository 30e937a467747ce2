"""Read a GGUF file's weights back into a Hugging Face model of the same architecture (dequantized, float32).

This is how a GGUF written by anyone (lowbit, or llama.cpp's own quantizer) is scored with lowbit's perplexity
protocol on the GPU: every tensor is dequantized with the ``gguf`` package's reference dequantizers (the same
arithmetic as ggml's), Q/K rows are put back from llama.cpp's RoPE layout, and a file with a separate output
matrix unties the model's head.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from lowbit.errors import BadFileError, one_line
from lowbit.io.gguf_export import _row_permutation
from lowbit.io.gguf_types import gguf_arch, gguf_name, read_gguf


@torch.no_grad()
def load_gguf_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Overwrite ``model``'s parameters with the (dequantized) tensors of the GGUF file ``path``; returns it."""
    path = Path(path)
    llama = gguf_arch(model.config) == gguf.MODEL_ARCH.LLAMA
    tensors = {t.name: t for t in read_gguf(path, model.config).tensors}
    if "output.weight" in tensors and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for key, p in model.named_parameters():
        name = gguf_name(model, key)
        if key.startswith("lm_head.") and "output.weight" not in tensors:
            name = "token_embd.weight"  # tied in the file (llama.cpp reuses token_embd)
        if name not in tensors:
            raise BadFileError(f"{path} has no tensor {name} for {key}")
        t = tensors[name]
        w = _dequantize(path, t)
        if tuple(w.shape) != tuple(p.shape):  # before the row permutation, which assumes the model's shape
            raise BadFileError(f"{path}: tensor {name} has shape {list(w.shape)}, the model's is {list(p.shape)}")
        perm = _row_permutation(name, model.config) if llama else None
        if perm is not None:
            w = w[torch.argsort(perm)]  # the exporter wrote w[perm]
        p.copy_(w.to(p.dtype))
    return model


def _dequantize(path: Path, t: gguf.ReaderTensor) -> torch.Tensor:
    try:
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
    except (ValueError, NotImplementedError, TypeError) as e:  # damaged block data or a type gguf cannot read
        raise BadFileError(f"{path}: cannot read tensor {t.name} ({t.tensor_type.name}): {one_line(e)}") from None
