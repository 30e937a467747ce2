"""Synthetic models of real shapes, for scale tests: Llama configs, seeded random weights generated a tensor at a
time, and a writer of such models as real Hugging Face checkpoints (safetensors shards + index, config, tokenizer).

Weights: every tensor is a deterministic function of (shape name, seed, tensor name), generated on the CPU in
seeded blocks of rows (so any prefix of rows costs one block, and a model with fewer layers has the same first
layers): linear weights and embeddings N(0, 0.02) as the Llama init, with a few input columns of every decoder
linear scaled by 4; norm weights 1 + N(0, 0.1), with the same few hidden channels x10 in every norm, so the
activations entering q/k/v and gate/up have outlier channels, as real models' do, and rounding is not trivially
easy. Nothing here claims a real model's quality: the point is real shapes, real files and real memory.

Tokenizer: a byte-level BPE without merges (ids 0-255 are the bytes, 256 is ``<|endoftext|>``), valid for every
shape (all vocabularies have more than 257 entries); text calibration through it touches only those ids, so the
scale benchmark draws calibration token ids uniformly from the whole vocabulary instead (:func:`random_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.atomic import atomic_dir, check_destination
from lowbit.errors import LowbitError
from lowbit.io.stream_writer import PendingTensor, write_safetensors

# name -> (vocab, hidden, intermediate, layers, heads, kv heads, context, rope theta), as the published configs
SHAPES: dict[str, tuple[int, int, int, int, int, int, int, float]] = {
    "tiny": (320, 64, 128, 4, 4, 2, 256, 10000.0),
    "llama-2-7b": (32000, 4096, 11008, 32, 32, 32, 4096, 10000.0),
    "llama-2-13b": (32000, 5120, 13824, 40, 40, 40, 4096, 10000.0),
    "llama-3-8b": (128256, 4096, 14336, 32, 32, 8, 8192, 500000.0),
    "llama-3-70b": (128256, 8192, 28672, 80, 64, 8, 8192, 500000.0),
}
STD = 0.02  # the Llama configs' initializer_range
NORM_NOISE, NORM_OUTLIER = 0.1, 10.0
COLUMN_OUTLIER = 4.0
ROW_BLOCK = 1024  # rows generated per seeded block
EOS = "<|endoftext|>"
DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise LowbitError(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}")


def synthetic_config(shape: str, num_layers: int | None = None, dtype: torch.dtype = torch.float16) -> Any:
    """The LlamaConfig of ``shape`` (``num_layers`` replaces its layer count: the same first layers, fewer of them)."""
    from transformers import LlamaConfig

    check_shape(shape)
    vocab, hidden, inter, layers, heads, kv, context, theta = SHAPES[shape]
    if num_layers is not None and not 1 <= num_layers <= layers:
        raise LowbitError(f"{shape} has {layers} decoder layers; asked for {num_layers}")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=num_layers or layers, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=context, rope_theta=theta, rms_norm_eps=1e-5,
                       initializer_range=STD, tie_word_embeddings=False, bos_token_id=None, eos_token_id=256,
                       dtype=str(dtype).removeprefix("torch."))


def synthetic_tensor(shape: str, seed: int, name: str, size: tuple[int, ...], dtype: torch.dtype = torch.float16,
                     rows: int | None = None) -> torch.Tensor:
    """Tensor ``name`` of the synthetic model ``shape`` (its first ``rows`` rows only, when given)."""
    if len(size) == 1:  # norm weights (Llama has no biases)
        w = 1 + NORM_NOISE * _randn(size, _gen(shape, seed, name))
        w[_outlier_channels(shape, seed, size[0])] *= NORM_OUTLIER
        return w[:rows].to(dtype)
    n = size[0] if rows is None else min(rows, size[0])
    out = torch.empty((n, *size[1:]), dtype=dtype)

    def fill(b: int) -> None:
        start = b * ROW_BLOCK
        stop = min(start + ROW_BLOCK, n)  # a block's values do not depend on how many of its rows are asked for
        block = _randn((min(ROW_BLOCK, size[0] - start), *size[1:]), _gen(shape, seed, name, b))
        out[start:stop] = block[: stop - start].mul_(STD)

    # Seeded generators draw on one thread each: blocks in parallel (each its own generator, so the same values
    # whatever the thread count). A 7B layer took ~1.6 s on one thread, longer than two GPUs' work on it.
    blocks = range(-(-n // ROW_BLOCK))
    workers = min(len(blocks), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="lowbit-synthetic") as pool:
            list(pool.map(fill, blocks))
    else:
        for b in blocks:
            fill(b)
    if ".layers." in name and len(size) == 2:  # decoder linears: a few input columns with larger weights
        cols = torch.randperm(size[1], generator=_gen(shape, seed, name, "columns"))[: max(1, size[1] // 256)]
        out[:, cols] *= COLUMN_OUTLIER
    return out


def _gen(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _randn(size: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(size, generator=g, dtype=torch.float32)


def _outlier_channels(shape: str, seed: int, hidden: int) -> torch.Tensor:
    return torch.randperm(hidden, generator=_gen(shape, seed, "outlier-channels"))[: max(1, hidden // 512)]


def random_tokens(vocab: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids drawn uniformly from the vocabulary (seeded): the scale benchmark's calibration."""
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def byte_tokenizer() -> Any:
    """The synthetic models' tokenizer: byte-level BPE without merges, 257 ids (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of the model ``config`` describes, in state-dict order, from a meta-device build."""
    from lowbit.io.validate import meta_model

    model = meta_model(config, Path("config.json"))
    seen, out = set(), {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = tuple(t.shape)
    return out


def write_synthetic(shape: str, out: str | Path, *, seed: int = 0, num_layers: int | None = None,
                    dtype: torch.dtype = torch.float16, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, progress: bool = True) -> Path:
    """Write the synthetic model ``shape`` as a Hugging Face checkpoint directory ``out``, atomically: config.json,
    ``model-0000i-of-0000n.safetensors`` shards of at most ``shard_bytes`` (a tensor is never split) with
    ``model.safetensors.index.json`` (a single ``model.safetensors`` when one shard holds everything) and the byte
    tokenizer. Tensors are generated and written one at a time, so memory holds one tensor; the free disk space is
    checked before anything is written.

    >>> lowbit.write_synthetic("llama-3-8b", "synth-llama-3-8b", num_layers=2)  # its first 2 layers, ~4.2 GB
    """
    config = synthetic_config(shape, num_layers, dtype)
    sizes = tensor_shapes(config)
    shards: list[list[str]] = [[]]
    used = 0
    itemsize = dtype.itemsize
    for key, size in sizes.items():
        nbytes = math.prod(size) * itemsize
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    total = sum(math.prod(s) for s in sizes.values()) * itemsize
    check_destination(out, total + (1 << 20), overwrite)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=total, desc=f"synth {shape}", unit="B", unit_scale=True, disable=not progress)

    def pending(key: str) -> PendingTensor:
        def produce() -> torch.Tensor:
            t = synthetic_tensor(shape, seed, key, sizes[key], dtype)
            bar.update(t.numel() * itemsize)
            return t

        return PendingTensor(key, dtype, sizes[key], produce)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, keys in zip(names, shards, strict=True):
            write_safetensors(tmp / name, [pending(k) for k in keys], {"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
    bar.close()
    return Path(out)
