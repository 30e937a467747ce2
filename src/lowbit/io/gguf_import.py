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

from lowbit.errors import LowbitError
from lowbit.io.gguf_export import _row_permutation
from lowbit.io.gguf_types import gguf_arch, gguf_name


@torch.no_grad()
def load_gguf_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Overwrite ``model``'s parameters with the (dequantized) tensors of the GGUF file ``path``; returns it."""
    path = Path(path)
    llama = gguf_arch(model.config) == gguf.MODEL_ARCH.LLAMA
    if not path.is_file():
        raise LowbitError(f"GGUF file not found: {path}")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in tensors and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for key, p in model.named_parameters():
        name = gguf_name(model, key)
        if key.startswith("lm_head.") and "output.weight" not in tensors:
            name = "token_embd.weight"  # tied in the file (llama.cpp reuses token_embd)
        if name not in tensors:
            raise LowbitError(f"{path} has no tensor {name} for {key}")
        t = tensors[name]
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        perm = _row_permutation(name, model.config) if llama else None
        if perm is not None:
            w = w[torch.argsort(perm)]  # the exporter wrote w[perm]
        if tuple(w.shape) != tuple(p.shape):
            raise LowbitError(f"{name}: file shape {tuple(w.shape)} does not match the model's {tuple(p.shape)}")
        p.copy_(w.to(p.dtype))
    return model
