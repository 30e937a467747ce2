"""lowbit's Python API: load a model, quantize it with a :class:`~lowbit.recipe.Recipe`, measure it, save it.

>>> import lowbit
>>> model, tok = lowbit.load()                                   # bundled SmolLM2-135M, an HF dir or a hub id
>>> result = lowbit.quantize(model, "gptq_act:q4_0", tok)         # in place: a Recipe or its string
>>> lowbit.evaluate(model, tok, max_windows=4)                    # perplexity on held-out text
>>> lowbit.save(model, tok, "smol-q4_0", result=result)           # packed safetensors + lowbit.json
>>> lowbit.export_gguf(model, tok, "smol-q4_0.gguf")              # or a GGUF file for llama.cpp
>>> lowbit.export_hf(model, tok, "smol-gptq", to="gptq")          # or GPTQ / compressed-tensors for vLLM
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.finetune import FinetuneReport, host_copy
from lowbit.algorithms.finetune import finetune as tune_scales
from lowbit.algorithms.mixed import is_mix, mixed_plan
from lowbit.algorithms.plans import Plan, uniform_plan
from lowbit.algorithms.rtn import quantize_head, quantize_rtn
from lowbit.algorithms.sequential import calibration_set, quantize_sequential
from lowbit.atomic import check_destination
from lowbit.data.corpus import load_text, require_tokens
from lowbit.errors import BadFileError, LowbitError
from lowbit.eval.perplexity import PerplexityResult, Reference, choose_seqlen, perplexity, tokenize_stream
from lowbit.eval.sizes import SizeReport, model_size
from lowbit.io.checkpoint import save_quantized
from lowbit.io.gguf_export import ExportReport
from lowbit.io.gguf_export import export_gguf as _export_gguf
from lowbit.io.hf_export import HFExportReport, check_target
from lowbit.io.hf_export import export_hf as _export_hf
from lowbit.io.loader import load_model
from lowbit.models.fused_rotation import fuse_rotation
from lowbit.models.walker import default_device, round_to_storage
from lowbit.recipe import Recipe
from lowbit.serve.fast_decode import StaticDecoder
from lowbit.serve.generate import (
    SamplingParams,
    TextStream,
    encode_chat,
    encode_prompt,
    fast_by_default,
    fast_or_loop,
)


def load(model: str | Path | None = None, *, device: str | None = None,
         dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from the bundled default (``None``), an HF directory, a hub id in the local
    cache, or a lowbit checkpoint. Float weights are rounded to float16, as they are stored, and computed in
    ``dtype``: float32 by default (for quantizing, tuning and evaluating), ``"auto"`` for generating or serving:
    on CUDA float16 for a lowbit checkpoint, whose packed GEMVs take float16 activations (in float32 it decodes on
    slower kernels), and a float model's own float16 or bfloat16; float32 on a CPU
    (:func:`~lowbit.io.loader.decode_dtype`). Nothing is ever downloaded from a model hub.

    >>> model, tok = lowbit.load("path/to/llama-dir", device="cpu")
    >>> model, tok = lowbit.load("out/smol-q4_0", device="cuda", dtype="auto")   # to generate: float16
    """
    if dtype != "auto" and not isinstance(dtype, torch.dtype):
        raise LowbitError(f"dtype must be a torch dtype or 'auto', got {dtype!r}")
    m, tok = load_model(model, dtype=dtype, device=device or default_device())
    return round_to_storage(m), tok


@dataclass
class QuantizeResult:
    """What :func:`quantize` did: the recipe, per-linear statistics, the tuning report, time and size."""

    recipe: Recipe
    linears: dict[str, Any]
    seconds: float
    size: SizeReport
    finetune: FinetuneReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        head = f", LM head {self.extra['lm_head']['format']}" if "lm_head" in self.extra else ""
        return (f"{self.recipe}: {self.size.linear_bpw:.4f} bits/weight in decoder linears{head}, "
                f"{self.size.total_mb:.1f} MB total, quantized in {self.seconds:.1f}s")

    def to_json(self) -> dict[str, Any]:
        out = {**self.recipe.to_json(), "quantize_seconds": round(self.seconds, 2),
               "linear_bpw": self.size.linear_bpw, "total_bytes": self.size.total_bytes}
        if self.finetune:
            out["finetune"] = {**out["finetune"], **asdict(self.finetune)}
        return out


def quantize(model: nn.Module, recipe: Recipe | str, tokenizer: Any = None, *, device: str | None = None,
             checkpoint_dir: str | Path | None = None, progress: bool = True) -> QuantizeResult:
    """Quantize every decoder linear of ``model`` in place, as ``recipe`` says (and the LM head, rounded to nearest
    in ``recipe.head`` when that is set).

    Calibrated recipes (GPTQ, imatrix, mixed precision, ``+ft``) need the ``tokenizer``; they keep the model where
    it is and move one decoder layer at a time to ``device`` (default: CUDA if available). ``checkpoint_dir`` makes
    GPTQ resumable: rerun with the same arguments after a crash and it continues bit-identically.

    >>> lowbit.quantize(model, lowbit.Recipe("iq2_xxs", method="gptq", finetune=lowbit.FinetuneConfig()), tok)
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    if recipe.needs_calibration and tokenizer is None:
        raise LowbitError(f"{recipe} reads calibration text: pass the tokenizer")
    device = device or default_device()
    t0 = time.perf_counter()
    teacher = host_copy(model) if recipe.finetune else None  # on the host: +ft moves what it needs, when
    if recipe.fuse_rotation:  # rounded again: float tensors are stored as float16 by checkpoints and GGUF
        round_to_storage(fuse_rotation(model, seed=recipe.rotation_seed))
        if teacher is not None:  # the same function, in the student's rotated basis (block-wise +ft compares
            fuse_rotation(teacher, seed=recipe.rotation_seed)  # hidden states), not rounded: still the float model
    calibrated = recipe.method != "rtn" or recipe.finetune is not None  # a mix draws its own samples
    samples = _calibration(model, tokenizer, recipe) if calibrated else None
    plan = _plan(model, recipe, tokenizer, progress)
    seed = recipe.rotation_seed if recipe.rotate else None
    if recipe.method == "rtn":
        stats: dict[str, Any] = quantize_rtn(model, plan, progress=progress, rotate=recipe.rotate,
                                             seed=recipe.rotation_seed)
    else:
        stats = dict(quantize_sequential(model, tokenizer, plan, calib=recipe.calib, gptq=recipe.gptq,
                                         device=device, checkpoint_dir=checkpoint_dir, progress=progress,
                                         samples=samples, rounding=recipe.method, rotation_seed=seed).linears)
    report = tune_scales(model, teacher, samples, recipe.finetune, device, progress) if teacher else None
    extra = {}
    if recipe.head:  # after +ft, which tunes the decoder against the float head
        head_format, head_error = quantize_head(model, recipe.head)
        extra["lm_head"] = {"format": head_format, "rel_error": head_error}
    return QuantizeResult(recipe, stats, time.perf_counter() - t0, model_size(model), report, extra)


def _calibration(model: nn.Module, tokenizer: Any, recipe: Recipe) -> torch.Tensor:
    try:
        return calibration_set(model, tokenizer, recipe.calib)
    except LowbitError as e:  # a user's text too short for one window: say which file and which flag
        path = recipe.calib.text_path
        if path is None or str(path) in str(e):
            raise
        raise BadFileError(f"{path}: {e} (use a longer text or a smaller --calib-seqlen)") from None


def _plan(model: nn.Module, recipe: Recipe, tokenizer: Any, progress: bool) -> Plan:
    if not isinstance(recipe.format, str):
        return dict(recipe.format)
    if is_mix(recipe.format):
        calib = recipe.calib
        return mixed_plan(model, tokenizer, recipe.format, rotate=recipe.rotate, seqlen=min(512, calib.seqlen),
                          seed=calib.seed, text_path=calib.text_path, progress=progress).plan
    return uniform_plan(model, recipe.format)


def save(model: nn.Module, tokenizer: Any, out: str | Path, *, result: QuantizeResult | None = None,
         source: str | None = None, overwrite: bool = False) -> Path:
    """Write a quantized model to the directory ``out`` atomically (packed safetensors, config, tokenizer and
    ``lowbit.json`` with the recipe from ``result``). ``lowbit.load(out)`` reads it back bit for bit.

    >>> lowbit.save(model, tok, "smol-q4_0", result=lowbit.quantize(model, "q4_0"))
    """
    meta: dict[str, Any] = result.to_json() if result else {}
    if source:
        meta["source"] = source
    check_destination(out, model_size(model).total_bytes, overwrite)  # a clear error before any byte is written
    return save_quantized(model, tokenizer, out, meta=meta, overwrite=overwrite)


def export_gguf(model: nn.Module, tokenizer: Any, out: str | Path, *, embed_type: str = "f16",
                fallback: str | None = None, tokenizer_pre: str | None = None,
                overwrite: bool = False, output_type: str | None = None) -> ExportReport:
    """Write ``model`` (float or quantized into GGUF-typed formats) as a GGUF file that stock llama.cpp runs.

    Quantized linears are copied without re-rounding; ``fallback`` (e.g. ``"q8_0"``) re-quantizes those GGUF cannot
    hold as stored, ``embed_type`` sets the token embeddings' / output matrix's type, ``output_type`` an untied
    output matrix's own (e.g. ``"q6_k"``, as llama.cpp's presets).

    >>> lowbit.export_gguf(model, tok, "smol-q4_0.gguf", embed_type="q8_0")
    """
    check_destination(out, model_size(model).total_bytes, overwrite)
    return _export_gguf(model.cpu(), tokenizer, out, fallback=fallback, embed_type=embed_type,
                        tokenizer_pre=tokenizer_pre, output_type=output_type)


def export_hf(model: nn.Module, tokenizer: Any, out: str | Path, *, to: str, act_order: bool = False,
              overwrite: bool = False) -> HFExportReport:
    """Write a quantized model as a GPTQ (``to="gptq"``) or compressed-tensors (``to="compressed-tensors"``)
    checkpoint directory that transformers' ``from_pretrained`` and ``vllm serve`` load.

    Codes and scales are copied, not re-rounded: the export dequantizes to exactly lowbit's weights. Formats with
    no such layout (E8P, IQ2_XXS, k-quants, level sets, float-min ``_asym``, ``+rht``) are refused before anything
    is written. ``act_order`` records a ``gptq_act`` quantization in the config (lowbit's groups are static).

    >>> lowbit.export_hf(model, tok, "smol-gptq", to="gptq")
    """
    check_target(to)  # a bad target is refused before the size estimate builds anything
    check_destination(out, model_size(model).total_bytes, overwrite)
    return _export_hf(model.cpu(), tokenizer, out, to, act_order=act_order, overwrite=overwrite)


def evaluate(model: nn.Module, tokenizer: Any, *, text_file: str | Path | None = None, seqlen: int | None = None,
             max_windows: int | None = None, reference: nn.Module | Reference | None = None,
             progress: bool = True) -> PerplexityResult:
    """Perplexity on held-out text (the bundled eval split, or ``text_file``), in windows of ``seqlen`` tokens.

    With a ``reference`` (the 16-bit model, or a :class:`~lowbit.eval.perplexity.Reference` shared by several
    calls) the result also has the mean KL divergence and top-1 agreement to it.

    >>> print(lowbit.evaluate(quantized, tok, max_windows=8, reference=lowbit.load()[0]))
    """
    ids = tokenize_stream(tokenizer, load_text("eval", None if text_file is None else str(text_file)))
    seqlen = choose_seqlen(model, seqlen)
    if text_file is not None:
        require_tokens(text_file, ids.numel(), seqlen, "--seqlen")
    if isinstance(reference, nn.Module):
        reference = Reference(reference)
    return perplexity(model, ids, seqlen, max_windows=max_windows, progress=progress, reference=reference)




def generate(model: nn.Module, tokenizer: Any, prompt: str, *, chat: bool = False, system: str | None = None,
             params: SamplingParams | None = None, fast: bool | None = None, compile: bool = False,
             weight_cache: bool = True) -> TextStream:
    """A :class:`~lowbit.serve.generate.TextStream` of the continuation of ``prompt``: iterate it for text deltas.

    ``chat`` wraps the prompt as a user message in the model's chat template. ``fast`` decodes with a static KV
    cache and one CUDA graph per token, from the packed weights on CUDA (``compile`` adds torch.compile). By default
    (None) a model on CUDA decodes that way, falling back to the dynamic-cache loop with a warning where a static
    decoder cannot be built for it, and a model on a CPU runs the dynamic-cache loop. Without ``fast``, and with it
    on a CPU, dequantized weights are cached between tokens unless ``weight_cache`` is False.

    >>> print("".join(lowbit.generate(model, tok, "The capital of France is", params=SamplingParams(temperature=0))))
    """
    params = params or SamplingParams()
    if compile and fast is False:
        raise LowbitError("compile needs fast decoding (fast=True or None)")
    extra_stop: tuple[str, ...] = ()
    if chat:
        messages = [{"role": "system", "content": system}] if system else []
        ids, extra_stop = encode_chat(tokenizer, [*messages, {"role": "user", "content": prompt}])
    else:
        ids = encode_prompt(tokenizer, prompt)
    positions = len(ids) + params.max_new_tokens
    decoder = fast_or_loop(model, fast_by_default(model, fast, compile), fast is None, weight_cache,
                           lambda: StaticDecoder(model, max_cache_len=positions, compile=compile),
                           "decoding with the dynamic cache: no fast decoder for this model")
    return TextStream(model, tokenizer, ids, params, extra_stop=extra_stop, decoder=decoder)
