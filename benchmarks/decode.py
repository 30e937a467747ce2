"""End-to-end decode speed (TG-128) of a Llama-2-7B-shaped model, fp16 vs packed low-bit decoder linears.

    PYTHONPATH=src python benchmarks/decode.py                                  # 7B shape on CUDA, ~2-4 min
    PYTHONPATH=src python benchmarks/decode.py --layers 4 --formats fp16,q4_0   # quick look
    PYTHONPATH=src python benchmarks/decode.py --compile --formats q4_k,Q4_K_M    # K-quants; a llama.cpp preset's mix
    PYTHONPATH=src python benchmarks/decode.py --compile --formats Q4_K_M --head preset   # ... with its Q6_K LM head
    PYTHONPATH=src python benchmarks/decode.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --vocab 1000 --prompt 8 --gen 8 --repeats 1 --out /tmp/decode-cpu.json   # CPU smoke test

The model is built directly on the device with random weights (no checkpoint, no CPU init). Each variant replaces
every decoder linear (each in the format named, or in the type llama.cpp's preset gives it: ``Q4_K_M``, ``Q6_K``,
...) by a QuantLinear holding random-but-valid packed weights (``--init random``: random codes,
scales sized for weights of std ~0.02; ``--init rtn``: RTN of the fp16 weights, slow for searched formats such as
nz2_ch); embeddings stay fp16, and so does the LM head unless ``--head`` names a format for it (``preset``: the
type llama.cpp's preset gives its output matrix; ``lowbit quantize --head`` makes such checkpoints). For each variant:
batch 1, a ``--prompt``-token prompt (eager prefill into a static KV cache), then ``--gen`` greedy decode steps
timed with the fast path (lowbit.serve.fast_decode.StaticDecoder: CUDA-graph replay per token, no host sync until
the end); the median of ``--repeats`` runs gives tokens/s. The same steps run eagerly (``--eager-repeats``) for the
launch-bound baseline, and the first ``--check-tokens`` tokens are compared with the plain dynamic-cache loop that
``lowbit generate`` uses (the same packed kernels on the model as the decoder left it: this checks the static
cache, graph, fusions and compiled step, not the GEMV kernels, which tests/test_cuda_gemv.py checks). With
``--compile`` on Hopper or later the step uses programmatic dependent launch where StaticDecoder's default does
(``--pdl auto``; ``on`` / ``off`` force it; each row records ``pdl``).

Roofline: bytes a decode step must read = decoder-linear weights as stored (codes + scales [+ mins]) + LM head +
one embedding row + norms + the KV cache at the mean context of the timed steps; divided by the measured
device-to-device copy bandwidth (read + write counted) that gives the tokens/s limit. Prints a markdown table and
writes benchmarks/results/decode-<tag>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.results_docs import decode_label
from lowbit.formats import IQ2XXSFormat, KQuantFormat, QuantizedTensor, get_format
from lowbit.io.gguf_presets import PRESETS, preset_plan
from lowbit.models.fused_linears import layer_rotation
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, empty_quant_linear, set_module
from lowbit.serve.fast_decode import StaticDecoder
from lowbit.serve.generate import cache_arg

FORMATS = "fp16,int4_g128_sym,q4_0,int2_g64_sym,nz2_ch"


def log(msg: str) -> None:
    print(f"[decode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- model ---------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random Llama built on ``device`` in ``dtype`` (nothing materialized on the CPU first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads or args.heads,
                      max_position_embeddings=max(4096, args.prompt + args.gen + 1), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # our own init: whatever transformers did (or skipped), weights are finite and sane
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=g)
            elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:
                m.weight.fill_(1.0)  # RMSNorm
    return model.eval().requires_grad_(False)


def _unit_stats(fmt_name: str, in_features: int, device: torch.device) -> tuple[float, float]:
    """Mean and std of weights decoded from random codes at unit scale (zero min): sizes the random scales."""
    fmt = get_format(fmt_name)
    data = {}
    for key, (shape, dt) in fmt.storage_spec((8, in_features)).items():
        if dt.is_floating_point:
            data[key] = torch.full(shape, 0.0 if key == "min" else 1.0, dtype=dt, device=device)
        else:
            data[key] = _random_ints(shape, dt, device)
    w = fmt.dequantize(QuantizedTensor(fmt.name, (8, in_features), data)).float()
    return float(w.mean()), float(w.std().clamp_min(1e-6))


def _random_signs(scales: torch.Tensor) -> None:
    """Negate a random half of ``scales`` in place. Random codes of a grid whose levels do not average zero (int3
    sym: -4..3) and no min to centre them put the same offset on every weight of a row, a rank-one gain of about
    |mean| x K per linear that compounds over the layers: a random 7B-shaped int3_g128_sym model's residual stream
    reached 5.1e4 after 3 layers (fp32, on a CPU: docs/kernels.md), and the fp16 reference loop overflowed to NaN.
    With random signs the offsets cancel; a kernel's work does not depend on them."""
    flip = torch.rand(scales.shape, device=scales.device) < 0.5
    scales.copy_(torch.where(flip, -scales, scales))


def _random_ints(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    info = torch.iinfo(dtype)
    lo, hi = (info.min, info.max + 1) if info.bits < 64 else (-(1 << 31), 1 << 31)
    return torch.randint(lo, hi, shape, dtype=dtype, device=device)


def _random_iq2xxs(lin: nn.Linear) -> QuantizedTensor:
    """Valid IQ2_XXS superblocks (random bytes would put NaNs in the fp16 d): random grid and sign indices,
    4-bit scales and d sized for weights of std ~0.02, packed by the format."""
    rows, cols = lin.weight.shape
    dev = lin.weight.device
    codes = torch.randint(0, 256 * 128, (rows, cols // 8), device=dev)
    d = torch.full((rows, -(-cols // 256)), 0.02 / (2.0 * 27), device=dev)  # mean (0.5 + ls) / 4 ~ 2, rms grid ~ 27
    ls = torch.randint(0, 16, (rows, cols // 32), device=dev).float()
    return get_format("iq2_xxs").pack(codes, {"d": d, "ls": ls}, (rows, cols))


def _uniform_moments(lo: int, hi: int) -> tuple[float, float]:
    """Mean and mean square of an integer drawn uniformly from lo..hi."""
    n = hi - lo + 1
    values = torch.arange(lo, hi + 1, dtype=torch.float64)
    return float(values.sum() / n), float(values.square().sum() / n)


def _random_kquant(lin: nn.Linear, fmt: KQuantFormat) -> QuantizedTensor:
    """Valid K-quant superblocks (random bytes would put NaNs in the fp16 d): random codes and integer scales (and
    mins), dmin at the mean code times d, so that ``d sc q - dmin mn`` averages zero (sc and mn are drawn alike),
    and d sized for weights of std ~0.02 with a random sign per superblock. An offset shared by every weight is a
    rank-one gain of about |mean| x K per linear that compounds over the layers: with dmin at 2^(bits-1) d, a
    random 7B-shaped Q4_K model's weights averaged -0.11 std and the fp16 reference loop reached NaN."""
    rows, cols = lin.weight.shape
    dev = lin.weight.device
    nsb = cols // 256
    codes = torch.randint(0, 1 << fmt.bits, (rows, cols), device=dev)
    params = {k: torch.randint(lo, hi + 1, (rows, nsb * fmt.n_sub), device=dev).float()
              for k, (lo, hi) in fmt.ints.items()}
    sc_mean, sc_sq = _uniform_moments(*fmt.ints["sc"])
    if "dmin" in fmt.halves:  # w / d = sc q - c mn, c the mean code: E = 0, E[w^2] / d^2 below
        c = ((1 << fmt.bits) - 1) / 2
        q_sq = _uniform_moments(0, (1 << fmt.bits) - 1)[1]
        unit_sq = sc_sq * (q_sq + c * c) - 2 * c * c * sc_mean * sc_mean
    else:  # w / d = sc (q - 2^(bits-1))
        unit_sq = sc_sq * _uniform_moments(-(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1)[1]
    d = torch.full((rows, nsb), 0.02 / math.sqrt(unit_sq), device=dev).half().float()
    _random_signs(d)
    params["d"] = d
    if "dmin" in fmt.halves:
        params["dmin"] = (d * c).half().float()
    return fmt.pack(codes, params, (rows, cols))


def rotation_sides(variant: str) -> tuple[str, bool, bool]:
    """``FORMAT[+rht|+rht2]`` -> (format, rotated, with output sides)."""
    for suffix, output_side in (("+rht2", True), ("+rht", False)):
        if variant.endswith(suffix):
            return variant.removesuffix(suffix), True, output_side
    return variant, False, False


def variant_formats(model: nn.Module, variant: str, head: str = "fp16") -> dict[str, str]:
    """Module name -> format name: every decoder linear in one format for ``FORMAT`` / ``FORMAT+rht[2]``, or in
    llama.cpp's per-tensor type for a preset (``Q4_K_M``: :func:`lowbit.io.gguf_presets.preset_plan`); plus the LM
    head in ``head`` unless that is fp16 (``preset``: the preset's output type, fp16 for a single format)."""
    names = list(decoder_linears(model))
    plan = preset_plan(model, variant) if variant in PRESETS else None
    if plan:
        formats = {n: plan.plan[n] for n in names}
    else:
        formats = {} if variant == "fp16" else dict.fromkeys(names, rotation_sides(variant)[0])
    if head == "preset":
        head = plan.output_type if plan else "fp16"
    if head != "fp16":
        formats["lm_head"] = head
    return formats


def quantize_model(model: nn.Module, variant: str, init: str, head: str = "fp16",
                   rht_only: tuple[str, ...] = (), rht_layout: int = 0) -> dict[str, nn.Module]:
    """Swap every decoder linear for a QuantLinear in the variant's format (``FORMAT``; ``FORMAT+rht``: with
    lowbit's incoherence rotations, input sides shared by siblings, undone online; ``FORMAT+rht2``: with output
    sides too, as checkpoints written before carry them; or a llama.cpp preset's types), and the LM head too unless
    ``head`` is fp16 (:func:`variant_formats`); returns the originals. ``rht_only``: name endings, the only linears
    a ``+rht`` variant rotates; ``rht_layout``: the rotation layout of their transforms (0: what lowbit draws)."""
    _, rotate, output_side = rotation_sides(variant)
    formats = variant_formats(model, variant, head)
    originals = {name: model.get_submodule(name) for name in formats}
    stats: dict[tuple[str, int], tuple[float, float]] = {}
    for name, lin in originals.items():
        fmt_name = formats[name]
        rotated = rotate and name != "lm_head" and (not rht_only or name.endswith(rht_only))
        rotation = layer_rotation(name, 0, output_side) if rotated else None
        if rotation is not None and rht_layout:
            rotation = dataclasses.replace(rotation, layout=rht_layout)
        q = empty_quant_linear(lin, fmt_name, rotation)
        fmt = get_format(fmt_name)
        if init == "rtn" or isinstance(fmt, IQ2XXSFormat | KQuantFormat):
            w = lin.weight.float() if rotation is None else rotation.rotate_weight(lin.weight.float())
            if init == "rtn":
                qt = fmt.quantize(w)
            else:
                qt = _random_iq2xxs(lin) if isinstance(fmt, IQ2XXSFormat) else _random_kquant(lin, fmt)
            for key in q._keys:
                getattr(q, key).copy_(qt.data[key])
        else:
            dev = lin.weight.device
            if (fmt_name, q.in_features) not in stats:
                stats[fmt_name, q.in_features] = _unit_stats(fmt_name, q.in_features, dev)
            mean, std = stats[fmt_name, q.in_features]
            s0 = 0.02 / std
            for key in q._keys:
                buf = getattr(q, key)
                if buf.dtype.is_floating_point:
                    if key == "min":
                        buf.fill_(-mean * s0)
                    else:
                        buf.uniform_(0.75 * s0, 1.25 * s0)
                        if "min" not in q._keys:
                            _random_signs(buf)
                else:
                    buf.copy_(_random_ints(tuple(buf.shape), buf.dtype, dev))
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.data.float())
        set_module(model, name, q)
    return originals


def restore_model(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, lin in originals.items():
        set_module(model, name, lin)


# ----- bytes and bandwidth -------------------------------------------------------------------------------------
def module_bytes(m: nn.Module) -> int:
    """Weight bytes of a linear as stored: packed buffers of a QuantLinear, else the weight (and the bias)."""
    total = sum(getattr(m, k).nbytes for k in m._keys) if isinstance(m, QuantLinear) else m.weight.nbytes
    return total + (m.bias.nbytes if getattr(m, "bias", None) is not None else 0)


def linear_bytes(model: nn.Module) -> int:
    return sum(module_bytes(m) for m in decoder_linears(model).values())


def step_bytes(model: nn.Module, mean_context: float) -> dict[str, float]:
    """Bytes one decode step must read (at least), by part."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    norms = sum(p.nbytes for n, p in model.named_parameters() if p.dim() == 1 and "norm" in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_pos = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size()
    parts = {"linears": float(linear_bytes(model)), "lm_head": float(module_bytes(model.get_output_embeddings())),
             "embed_row": float(emb.shape[1] * emb.element_size()), "norms": float(norms),
             "kv_cache": kv_per_pos * mean_context}
    parts["total"] = sum(parts.values())
    return parts


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy, read + write counted (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            t = a.elapsed_time(b) * 1e-3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 5:
            times.append(t)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ----- timing --------------------------------------------------------------------------------------------------
def time_decode(dec: StaticDecoder, prompt: torch.Tensor, gen: int, repeats: int) -> dict:
    """Median tokens/s of ``gen`` greedy steps after an eager prefill (one untimed warm-up run first)."""
    dev = dec.device
    tps, prefill_ms, tokens = [], [], None
    for r in range(repeats + 1):
        dec.reset()
        sync(dev)
        t0 = time.perf_counter()
        dec.prefill(prompt)
        sync(dev)
        t1 = time.perf_counter()
        dec.run_steps(gen)
        sync(dev)
        t2 = time.perf_counter()
        if r == 0:  # warm-up: kernel compilation, graph capture
            tokens = dec.tokens()[0].tolist()
            continue
        tps.append(gen / (t2 - t1))
        prefill_ms.append((t1 - t0) * 1e3)
    return {"tok_s": statistics.median(tps), "tok_s_runs": tps, "prefill_ms": statistics.median(prefill_ms),
            "tokens": tokens}


def profile_step(model: nn.Module, args: argparse.Namespace, prompt: torch.Tensor, steps: int = 8) -> dict:
    """GPU kernel time per decode step, by kernel (torch.profiler over eager static-cache steps: the same kernels
    the graph replays, without its launch savings). Shows where a token's time goes: packed GEMVs vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    dec = StaticDecoder(model, max_cache_len=cache_len(args), cuda_graph=False, compile=args.compile,
                        **decoder_fusions(args))
    dec.reset()
    dec.prefill(prompt)
    dec.run_steps(2)  # warm-up: autotuning, caches, compilation
    sync(prompt.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.run_steps(steps)
        sync(prompt.device)
    kernels, calls = {}, {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            kernels[e.key] = kernels.get(e.key, 0.0) + us / steps
            calls[e.key] = calls.get(e.key, 0.0) + e.count / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])
    total = sum(kernels.values())
    gemv = sum(us for k, us in kernels.items() if "gemv" in k.lower() or "dequant" in k.lower() or "gemm" in k.lower()
               or "sm90" in k.lower() or "cutlass" in k.lower())
    return {"gpu_us_per_step": total, "matmul_us_per_step": gemv,
            "launches_per_step": round(sum(calls.values()), 1),
            "top": [{"kernel": k[:90], "us_per_step": round(us, 2), "calls_per_step": round(calls[k], 1)}
                    for k, us in top[:16]]}


def decoder_fusions(args: argparse.Namespace) -> dict[str, bool]:
    """StaticDecoder's fusion switches as the command line sets them (timed and profiled decoders alike)."""
    return {"decode_attention": args.attention == "lowbit", "fold_norms": args.fold_norms == "on",
            "fuse_attention": args.fuse_attention == "on"}


def cache_len(args: argparse.Namespace) -> int:
    return max(args.cache_len, args.prompt + args.gen)


def reference_tokens(model: nn.Module, prompt: torch.Tensor, n: int) -> tuple[list[int], list[tuple[int, float]]]:
    """Greedy tokens of the plain dynamic-cache loop (as lowbit.serve.generate.TextStream runs it), and at each step
    the runner-up token and the gap between the top two logits (how near a tie the choice was)."""
    ids, past, out, runners = prompt, None, [], []
    with torch.inference_mode():
        for _ in range(n):
            o = model(input_ids=ids, **{cache_arg(model): past}, use_cache=True, logits_to_keep=1)
            past = getattr(o, cache_arg(model))
            top = torch.topk(o.logits[0, -1].float(), 2)
            t = int(top.indices[0])
            out.append(t)
            runners.append((int(top.indices[1]), float(top.values[0] - top.values[1])))
            ids = torch.tensor([[t]], device=prompt.device)
    return out, runners


def first_difference(ref: list[int], runners: list[tuple[int, float]], fast: list[int]) -> dict:
    """Where the fast path's tokens first leave the reference's: how many agree, and at the first difference the
    reference's top-two logit gap and whether the fast path took its runner-up (a near-tie, not a wrong kernel,
    when the gap is a few fp16 steps)."""
    k = next((i for i, (a, b) in enumerate(zip(ref, fast, strict=False)) if a != b), len(ref))
    out: dict = {"reference_agree": f"{k}/{len(ref)}"}
    if k < min(len(ref), len(fast)):
        out |= {"first_difference_gap": runners[k][1], "first_difference_runner_up": fast[k] == runners[k][0]}
    return out


def run_variant(model: nn.Module, variant: str, args: argparse.Namespace, prompt: torch.Tensor,
                bw: float) -> dict:
    dev = prompt.device
    t0 = time.perf_counter()
    quantized = variant != "fp16" or args.head not in ("fp16", "preset")
    only = tuple(filter(None, args.rht_only.split(",")))
    originals = quantize_model(model, variant, args.init, args.head, only, args.rht_layout) if quantized else None
    sync(dev)
    log(f"{variant}: weights ready in {time.perf_counter() - t0:.1f}s")
    try:
        n_weights = sum(m.in_features * m.out_features for m in decoder_linears(model).values())
        mean_ctx = args.prompt + (args.gen + 1) / 2  # keys attended per step, averaged over the timed steps
        parts = step_bytes(model, mean_ctx)
        out = model.get_output_embeddings()
        head = out.format_name if isinstance(out, QuantLinear) else "fp16"
        row: dict = {"variant": variant, "lm_head": head, "bpw": 8 * parts["linears"] / n_weights, "bytes": parts,
                     "roofline_tok_s": bw / parts["total"]}
        dec = StaticDecoder(model, max_cache_len=cache_len(args), cuda_graph=args.graph,
                            compile=args.compile, pdl=ON_OFF_AUTO[args.pdl], **decoder_fusions(args))
        t0 = time.perf_counter()
        fast = time_decode(dec, prompt, args.gen, args.repeats)
        if dev.type == "cuda":  # what decoding holds on the GPU: weights (kernel layouts), caches, activations
            row |= {"gpu_mb": torch.cuda.memory_allocated(dev) / 1e6, "held_layouts": dec.held_layouts}
            log(f"{variant}: {row['gpu_mb']:.0f} MB of GPU memory allocated while decoding; "
                f"{dec.held_layouts} weights hold their kernel layout alone there")
        row |= {"tok_s": fast["tok_s"], "tok_s_runs": fast["tok_s_runs"], "prefill_ms": fast["prefill_ms"],
                "cuda_graph": dec.graph_captured, "graph_error": dec.graph_error, "compiled": args.compile,
                "pdl": dec.pdl, "folded_layers": dec.folded_layers, "fused_attention": dec.fuse_attention,
                "frac_roofline": fast["tok_s"] / row["roofline_tok_s"]}
        log(f"{variant}: fast path {fast['tok_s']:.1f} tok/s (graph={dec.graph_captured}) "
            f"in {time.perf_counter() - t0:.1f}s")
        if dec.graph_error:
            log(f"{variant}: graph capture failed: {dec.graph_error}")
        del dec
        if args.eager_repeats > 0:
            dec = StaticDecoder(model, max_cache_len=cache_len(args), cuda_graph=False)
            eager = time_decode(dec, prompt, args.gen, args.eager_repeats)
            row |= {"eager_tok_s": eager["tok_s"], "graph_vs_eager": fast["tok_s"] / eager["tok_s"],
                    "eager_tokens_match": eager["tokens"] == fast["tokens"]}
            log(f"{variant}: eager static-cache path {eager['tok_s']:.1f} tok/s; "
                f"same tokens as the fast path: {row['eager_tokens_match']}")
            del dec
        if args.profile:
            row["profile"] = profile_step(model, args, prompt)
            p = row["profile"]
            log(f"{variant}: GPU time per step {p['gpu_us_per_step']:.0f} us, of which matmul kernels "
                f"{p['matmul_us_per_step']:.0f} us; top: " +
                "; ".join(f"{t['kernel'][:40]} {t['us_per_step']:.0f}" for t in p["top"][:5]))
        if args.check_tokens > 0:
            ref, runners = reference_tokens(model, prompt, args.check_tokens)
            row |= first_difference(ref, runners, fast["tokens"])
            gap = (f"; at the first difference the reference's top-two logit gap is {row['first_difference_gap']:.4f}"
                   f" and the fast path {'took' if row['first_difference_runner_up'] else 'did not take'} its "
                   "runner-up" if "first_difference_gap" in row else "")
            log(f"{variant}: first {row['reference_agree']} tokens agree with the dynamic-cache loop{gap}")
        return row
    finally:
        if originals is not None:
            restore_model(model, originals)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def default_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([AHBL]\d{2,3}|RTX\s?\d{4})\b", name)
    return (m.group(1) if m else name).lower().replace(" ", "")


def markdown(rows: list[dict]) -> str:
    fp16 = next((r["tok_s"] for r in rows if r["variant"] == "fp16"), None)
    lines = ["| variant | bpw (linears) | MB read/token | roofline tok/s | tok/s | % of roofline | eager tok/s | "
             "graph/eager | vs fp16 | prefill ms | GPU MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = f"{r['eager_tok_s']:.1f}" if "eager_tok_s" in r else "-"
        ge = f"{r['graph_vs_eager']:.2f}x" if "graph_vs_eager" in r else "-"
        vs = f"{r['tok_s'] / fp16:.2f}x" if fp16 else "-"
        mark = "" if r["cuda_graph"] else " (eager)"
        mb = r["bytes"]["total"] / 1e6
        lines.append(f"| {decode_label(r)} | {r['bpw']:.3f} | {mb:.{0 if mb >= 10 else 2}f} | "
                     f"{r['roofline_tok_s']:.1f} | {r['tok_s']:.1f}{mark} | {100 * r['frac_roofline']:.0f}% | "
                     f"{eager} | {ge} | {vs} | {r['prefill_ms']:.1f} | {r.get('gpu_mb', float('nan')):.0f} |")
    return "\n".join(lines)


ON_OFF_AUTO = {"auto": "auto", "on": True, "off": False}  # --graph / --pdl -> StaticDecoder's argument


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the random Llama-2-7B shape (decode_pdl.py builds the same model)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=FORMATS,
                    help="comma-separated: fp16 and/or lowbit format names, each optionally with +rht (rotated "
                         "on the input side, as lowbit quantizes) or +rht2 (both sides, as older checkpoints)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="float16 (default on CUDA), bfloat16 or float32 (default on CPU)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: --heads (Llama-2-7B has no GQA)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (prefill)")
    ap.add_argument("--gen", type=int, default=128, help="timed decode steps (TG-128)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eager-repeats", type=int, default=1, help="0 skips the eager comparison")
    ap.add_argument("--check-tokens", type=int, default=16, help="compare with the dynamic-cache loop (0: skip)")
    ap.add_argument("--init", choices=("random", "rtn"), default="random")
    ap.add_argument("--graph", default="auto", choices=("auto", "on", "off"),
                    help="CUDA graphs: auto (fall back to eager if capture fails), on (fail instead), off")
    ap.add_argument("--bw-mb", type=int, default=0, help="copy size for the bandwidth test (default 1024 on GPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (fuses the ops between matmuls; the graph replays it)")
    ap.add_argument("--attention", choices=("lowbit", "sdpa"), default="lowbit",
                    help="one-token attention: lowbit's decode kernel (default, as StaticDecoder) or the model's SDPA")
    ap.add_argument("--cache-len", type=int, default=0,
                    help="static cache positions (default: prompt + gen); longer leaves most of the cache unused")
    ap.add_argument("--pdl", choices=("auto", "on", "off"), default="auto",
                    help="programmatic dependent launch in the compiled step (StaticDecoder's pdl; auto: Hopper+)")
    ap.add_argument("--fold-norms", choices=("on", "off"), default="on",
                    help="norms and residual adds inside the GEMVs (StaticDecoder's fold_norms, models.fused_norms)")
    ap.add_argument("--fuse-attention", choices=("on", "off"), default="on",
                    help="a folded layer's rotary embedding, cache write and attention as one kernel "
                         "(StaticDecoder's fuse_attention, models.decode_attention.step_attention)")
    ap.add_argument("--head", default="fp16",
                    help="LM head: fp16 (default), a lowbit format, or preset (a llama.cpp preset's output type)")
    ap.add_argument("--rht-layout", type=int, default=0, help="rotation layout of +rht transforms (lowbit.rotations."
                    "hadamard: 2 dense factor, 3 block-diagonal; 0: what lowbit draws)")
    ap.add_argument("--rht-only", default="", help="comma-separated name endings (self_attn.q_proj, ...): the only "
                    "linears +rht variants rotate, to time what each transform costs")
    ap.add_argument("--profile", action="store_true", help="per variant: GPU kernel time per step, by kernel")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode-<tag>.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.graph = ON_OFF_AUTO[args.graph]

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu (with a tiny --hidden/--layers) for a smoke test",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    variants = [v.strip() for v in args.formats.split(",") if v.strip()]
    for v in variants:
        if v != "fp16" and v not in PRESETS:
            get_format(rotation_sides(v)[0])  # fail early on a typo
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"device {dev_name}; torch {torch.__version__}; dtype {dtype}")

    bw = copy_bandwidth(device, (args.bw_mb or (1024 if device.type == "cuda" else 64)) << 20)
    log(f"device copy bandwidth (read + write) {bw / 1e9:.1f} GB/s")

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.layers} layers, hidden {args.hidden}, {n_params / 1e9:.2f}B params, built in "
        f"{time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g).to(device)

    tag = args.tag or default_tag(device)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"decode-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = {"device": dev_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(dtype), "copy_bw": bw, "command": " ".join(["python", *sys.argv]) if argv is None else argv,
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "tag")}, "params": n_params,
            # kernel switches in effect (LOWBIT_CUDA_PDL, TORCHINDUCTOR_ENABLE_PDL, ...): part of what was measured
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("LOWBIT_", "TORCHINDUCTOR_"))}}
    with contextlib.suppress(Exception):
        import triton

        meta["triton"] = triton.__version__
    rows: list[dict] = []
    for v in variants:
        rows.append(run_variant(model, v, args, prompt, bw))
        # rewritten after every variant, so a crash or a timeout in a later one keeps what was measured
        meta.update(seconds=time.perf_counter() - t_start, complete=len(rows) == len(variants))
        table = markdown(rows)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2, default=str))
    print(table, flush=True)
    log(f"wrote {out} ({time.perf_counter() - t_start:.0f}s total)")
    return 0 if all(math.isfinite(r["tok_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
