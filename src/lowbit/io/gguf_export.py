"""Export a (quantized) Llama / Mistral / Qwen2 model as a GGUF file that stock llama.cpp loads.

What is written follows llama.cpp's ``convert_hf_to_gguf.py``: the ``{arch}.*`` hyperparameters, the tokenizer
(byte-level BPE as ``tokenizer.ggml.model = gpt2``, the pre-tokenizer recognized by the same token-hash check,
tokens, token types, merges, special ids, chat template), ggml tensor names, and for the llama architecture the
Q/K row permutation (llama.cpp applies RoPE to interleaved pairs, Hugging Face to split halves).

Quantized linears are copied, not re-quantized: their packed codes and fp16 scales are re-laid out as ggml blocks
(``io/gguf_blocks.py``), so the GGUF dequantizes bit for bit to what lowbit computes with. The permutation moves
whole rows of those bytes (every ggml block lies inside one row). A linear that GGUF cannot hold as stored (a
format without a ggml type, rows that do not fill whole blocks, a lowbit rotation) is an error, or with
``fallback`` is re-quantized from its dequantized weight into the fallback format, and reported as such.
Everything else: norms and biases F32, embeddings / output F16 (or ``embed_type="q8_0"``; an untied output matrix
``output_type``, e.g. a preset's Q6_K), other matrices F16.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.formats import QuantizedTensor, get_format, row_format
from lowbit.io.gguf_blocks import gguf_type, to_ggml_blocks, unsupported_reason
from lowbit.io.gguf_types import gguf_arch, gguf_name
from lowbit.models.quant_linear import QuantLinear

# convert_hf_to_gguf's pre-tokenizer check: hash the token ids of this text and look the hash up. Only hashes of
# tokenizers lowbit's architectures ship with are listed; others get "default" (llama.cpp warns) or --tokenizer-pre.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
          "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
          "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}
_FILE_TYPES = {QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
               QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
               QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               QT.IQ2_XXS: gguf.LlamaFileType.MOSTLY_IQ2_XXS, QT.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
               QT.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QT.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
               QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
               QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}  # a k-quant's plain file type is llama.cpp's _S preset


@dataclass
class TensorRecord:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    qtype: str  # ggml type name
    shape: tuple[int, ...]  # [out, in] (numpy order)
    nbytes: int
    source: str  # lowbit format of the stored tensor, or "float"
    note: str = ""  # why a fallback happened

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class ExportReport:
    path: Path
    arch: str
    tokenizer_pre: str
    tensors: list[TensorRecord] = field(default_factory=list)
    file_bytes: int = 0
    imported_from: str = ""  # a GPTQ / AWQ / compressed-tensors checkpoint's method (io/hf_import.py), or ""

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.qtype for t in self.tensors))

    @property
    def fallbacks(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.note]

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight of the whole file (header, vocabulary and padding included)."""
        return 8.0 * self.file_bytes / self.n_params

    @property
    def linear_bpw(self) -> float:
        """Bits per weight of the decoder linears' tensor data (as lowbit reports its checkpoints)."""
        lin = [t for t in self.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        return 8.0 * sum(t.nbytes for t in lin) / max(1, sum(t.numel for t in lin))

    def summary(self) -> str:
        counts = ", ".join(f"{n} x {k}" for k, n in sorted(self.type_counts().items()))
        lines = [f"wrote {self.path}: {self.file_bytes / 1e6:.1f} MB, {len(self.tensors)} tensors ({counts}); "
                 f"{self.bpw:.3f} bits/weight over the file, {self.linear_bpw:.4f} in decoder linears; "
                 f"arch {self.arch}, tokenizer pre {self.tokenizer_pre!r}"]
        if self.imported_from:  # every quantized linear of the checkpoint: copied or re-quantized
            lines += [f"  {t.name}: re-quantized from {t.source} to {t.qtype} ({t.note})" if t.note else
                      f"  {t.name}: copied ({t.source} -> {t.qtype})" for t in self.tensors if t.source != "float"]
        else:
            lines += [f"  fallback {t.name}: {t.source} -> {t.qtype} ({t.note})" for t in self.fallbacks]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def export_gguf(model: nn.Module, tokenizer: object, out: str | Path, fallback: str | None = None,
                embed_type: str = "f16", tokenizer_pre: str | None = None, name: str | None = None,
                output_type: str | None = None) -> ExportReport:
    """Write ``model`` (QuantLinear modules and/or float ones) with ``tokenizer`` to the GGUF file ``out``.

    ``fallback``: a lowbit format with a GGUF type (e.g. ``q8_0``) used to re-quantize linears that cannot be
    written as stored; without it they raise LowbitError. ``embed_type``: ``f16`` (exact) or such a format, used
    (the format's own fit, no calibration) for the token embeddings, and for an untied output matrix unless
    ``output_type`` gives it another (llama.cpp's presets give it Q6_K). A k-quant whose superblocks do not divide
    the rows takes llama.cpp's fallback (``formats.row_format``); rows no block divides stay F16.
    ``tokenizer_pre`` overrides the pre-tokenizer detection.
    """
    config = model.config
    arch = gguf_arch(config)
    output_type = output_type or embed_type
    for what, fmt in (("embed_type", embed_type), ("output_type", output_type)):
        if fmt != "f16":
            _check_fallback(fmt, what)
    if fallback is not None:
        _check_fallback(fallback)
    entries = list(_tensors(model, arch, fallback, {"token_embd": embed_type, "output": output_type}))
    out = Path(out)
    report = ExportReport(out, gguf.MODEL_ARCH_NAMES[arch], "")
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
        _write_hparams(writer, config, arch, name or _model_name(config))
        report.tokenizer_pre = _write_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
        for gname, data, qtype, record in entries:
            writer.add_tensor(gname, data, raw_dtype=qtype)
            report.tensors.append(record)
        writer.add_file_type(_file_type(report.tensors))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    report.file_bytes = out.stat().st_size
    return report


def _check_fallback(fallback: str, what: str = "fallback") -> None:
    if gguf_type(get_format(fallback)) is None:
        raise LowbitError(f"{what} {fallback!r} has no GGUF type; use q8_0, q4_0, q4_1, int5_g32_sym (Q5_0), "
                          "int5_g32_asym (Q5_1), iq4_nl or q2_k..q6_k")


def _model_name(config: object) -> str:
    source = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))
    return source.rstrip("/").split("/")[-1]


def _file_type(records: list[TensorRecord]) -> int:
    """general.file_type: the most common type among the decoder linears (llama.cpp only prints it)."""
    lin = Counter(QT[t.qtype] for t in records if t.name.startswith("blk.") and len(t.shape) == 2)
    top = lin.most_common(1)[0][0] if lin else QT.F16
    return int(_FILE_TYPES.get(top, gguf.LlamaFileType.GUESSED))


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------------------------------------------
def _rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if scaling not in (None, "default"):
        # llama3/yarn/linear scaling need extra GGUF keys or a rope_freqs tensor: not written yet.
        raise UnsupportedModelError(f"GGUF export does not handle rope scaling {scaling!r} yet")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _write_hparams(w: gguf.GGUFWriter, config: object, arch: gguf.MODEL_ARCH, name: str) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:  # llama.cpp assumes hidden / heads unless told
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def _write_tokenizer(w: gguf.GGUFWriter, tokenizer: object, vocab_size: int, pre: str | None) -> str:
    _check_byte_level_bpe(tokenizer)
    pre = pre or detect_pre_tokenizer(tokenizer)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        # SpecialVocab reads merges, special ids and the chat template from tokenizer files: write them once.
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = _adds_special(tokenizer)
    logging.getLogger("gguf.vocab").setLevel(logging.WARNING)
    special.add_to_gguf(w, quiet=True)
    return pre


def _check_byte_level_bpe(tokenizer: object) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    # A ByteLevel pre-tokenizer maps every byte to a token, so a byte_fallback flag (some transformers versions
    # set it when converting) never triggers: still GPT-2-style byte-level BPE.
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or (model.get("byte_fallback") and not byte_level):
        raise LowbitError("GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') only; "
                          f"this tokenizer is {model.get('type', type(tokenizer).__name__)}"
                          f"{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}")


def detect_pre_tokenizer(tokenizer: object) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, by convert_hf_to_gguf's token-hash check."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in KNOWN_PRE:
        logging.getLogger(__name__).warning("unrecognized BPE pre-tokenizer (hash %s): writing 'default'", chkhsh)
    return KNOWN_PRE.get(chkhsh, "default")


def vocab_tokens(tokenizer: object, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and ggml token types for ids 0..vocab_size-1 (as convert_hf_to_gguf.get_vocab_base)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise LowbitError(f"tokenizer has ids up to {max(reverse)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            # llama.cpp treats control/user-defined tokens as already normalized
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            special = decoder[i].special or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, [int(t) for t in types]


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or (tok.startswith("<") and tok.endswith(">") and
                                                             " " not in tok and len(tok) > 2)


def _adds_special(tokenizer: object) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, measured on the tokenizer itself (its config files may not say)."""
    ids = tokenizer.encode("a")
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return {"bos": bool(ids) and bos is not None and ids[0] == bos,
            "eos": bool(ids) and eos is not None and ids[-1] == eos}


# ----------------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------------
Entry = tuple[str, np.ndarray, "QT | None", TensorRecord]


def _tensors(model: nn.Module, arch: gguf.MODEL_ARCH, fallback: str | None,
             embed_types: dict[str, str]) -> Iterator[Entry]:
    config = model.config
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        items: list[tuple[str, object]] = [(f"{mname}.weight", mod)] if isinstance(mod, QuantLinear) else []
        items += [(f"{mname}.{p}", t) for p, t in mod.named_parameters(recurse=False)]
        for key, obj in items:
            if id(obj) in seen:  # tied lm_head: llama.cpp reuses token_embd when "output" is absent
                continue
            seen.add(id(obj))
            gname = gguf_name(model, key)
            if gname is None:
                raise UnsupportedModelError(f"no GGUF tensor name for {key!r} ({gguf.MODEL_ARCH_NAMES[arch]})")
            perm = _row_permutation(gname, config) if arch == gguf.MODEL_ARCH.LLAMA else None
            if isinstance(obj, QuantLinear):
                yield _quantized(gname, obj, perm, fallback)
            else:
                yield _float(gname, obj.detach(), perm, embed_types.get(gname.split(".")[0], "f16"))


def _row_permutation(gname: str, config: object) -> torch.Tensor | None:
    """convert_hf_to_gguf's LlamaModel.permute as a row index: HF's rotate-half RoPE layout -> ggml's pairs."""
    n_head = config.num_attention_heads
    if ".attn_q." in gname:
        return qk_permutation(n_head, _rows(config, n_head))
    if ".attn_k." in gname:
        n_kv = getattr(config, "num_key_value_heads", None) or n_head
        return qk_permutation(n_kv, _rows(config, n_kv))
    return None


def _rows(config: object, heads: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads * head_dim


def qk_permutation(n_head: int, rows: int) -> torch.Tensor:
    """Index p such that ``w[p] == permute(w, n_head)`` of convert_hf_to_gguf (per head: rows (i, j) -> (j, i))."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _quantized(gname: str, m: QuantLinear, perm: torch.Tensor | None, fallback: str | None) -> Entry:
    qt = m.quantized()
    fmt = get_format(qt.format)
    reason = "lowbit rotation (+rht) is not expressible in GGUF" if m.rotation is not None else \
        unsupported_reason(fmt, qt.shape)
    note = ""
    if reason:
        if fallback is None:
            raise LowbitError(f"{gname} ({qt.format}, {qt.shape[0]}x{qt.shape[1]}): {reason}; pass a fallback "
                              "(--fallback q8_0) to re-quantize such tensors from their dequantized weights")
        qt = _requantize(m, fallback, gname, reason)
        note = reason
    qtype, blocks = to_ggml_blocks(qt)
    if perm is not None:
        blocks = blocks[perm.numpy()]
    record = TensorRecord(gname, qtype.name, tuple(qt.shape), blocks.nbytes, m.format_name, note)
    return gname, np.ascontiguousarray(blocks), qtype, record


def _requantize(m: QuantLinear, fallback: str, gname: str, reason: str) -> QuantizedTensor:
    fmt = get_format(fallback)
    w = m.dequantize().detach().float().cpu()  # the effective (unrotated) weight lowbit computes with
    why_not = unsupported_reason(fmt, tuple(w.shape))
    if why_not:
        raise LowbitError(f"{gname}: {reason}, and the fallback {fallback} does not fit either: {why_not}")
    return fmt.quantize(w)


def _float(gname: str, t: torch.Tensor, perm: torch.Tensor | None, embed_type: str) -> Entry:
    """A float tensor; ``embed_type`` is the format of a token_embd / output matrix (``f16`` for any other)."""
    t = t.float().cpu()
    if perm is not None:
        t = t[perm]
    fmt = row_format(embed_type, t.shape[-1]) if t.dim() == 2 and embed_type != "f16" else None
    if t.dim() == 1:  # norms and biases: F32, as llama.cpp expects
        data, qtype = t.numpy(), None
    elif fmt is not None and unsupported_reason(get_format(fmt), tuple(t.shape)) is None:
        qtype, data = to_ggml_blocks(get_format(fmt).quantize(t))
    else:
        data, qtype = t.half().numpy(), None  # lowbit stores every float weight in fp16, so this is exact
    name = (qtype or (QT.F32 if data.dtype == np.float32 else QT.F16)).name
    record = TensorRecord(gname, name, tuple(t.shape), data.nbytes, "float")
    return gname, np.ascontiguousarray(data), qtype, record
