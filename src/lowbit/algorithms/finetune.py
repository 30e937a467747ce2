"""End-to-end tuning of a quantized model's float parameters, codes held fixed (``+ft`` methods).

GPTQ/LDLQ minimize each linear's output error on calibration inputs, one layer at a time. That objective is not
perplexity: on the bundled SmolLM2, lowbit's GGUF files have 30-70% less of it than llama.cpp's on every linear
and still a higher perplexity (benchmarks/results/gguf-tensor-loss-h100.md). This stage optimizes what matters
instead: the KL divergence from the float model's next-token distribution to the quantized model's, over the
calibration windows, through the whole network.

What is tuned is only what the storage already holds as floats, so the result is stored exactly as before (same
bytes per tensor, and a GGUF that stock llama.cpp runs):
  * every quantized linear's float group parameters (``Format.float_params``: Q4_0/IQ4_NL scales, Q4_1 scales and
    mins, IQ2_XXS super-block scales ``d``, Q2_K ``d``/``dmin``), the integer codes and 4-bit sub-scales fixed;
  * the normalization weights (RMSNorm / LayerNorm, stored as floats by lowbit checkpoints and GGUF).
Each tuned tensor ``p`` becomes ``p0 * exp(t)`` with ``t`` trained from 0 (Adam; ``Format.tuned``: an asymmetric grid
scales its group about zero and shifts its min by grid steps), so one learning rate fits
scales of every magnitude and no scale changes sign; formats finer than 4 bits take smaller steps (:func:`step_scale`),
and a tuning that ends with a higher loss on its first batch than it started with is not kept (the model, block or
tail stage keeps its untuned values; the report says so); in the whole-model mode it then runs once more at a smaller
rate (:func:`retry_lr`). This is the scale-only end of QuIP#'s and EfficientQAT's
end-to-end fine-tuning: fewer parameters (one per 32 weights at 4 bits, one per 256 at IQ2_XXS), nothing that
a GGUF file could not hold.

Two ways to train, the same parameters and the same storage (``FinetuneConfig.mode``):
  * ``model``: KL through the whole network. The float teacher and the student are on the device at once and
    backward keeps every layer's activations and full-vocabulary logits: the quality reference, for small models.
  * ``blocks``: ``block_layers`` decoder layers at a time (:func:`finetune_blocks`), each trained so its output
    matches the float model's hidden states, with the quantized model's own outputs of the already-tuned blocks as
    its inputs (error-compensating, as GPTQ's sequential mode feeds quantized inputs forward), then the tail stage:
    the last ``tail_layers`` decoder layers and the final norm tuned again together, by KL through the head
    (:func:`tune_tail`). The calibration activations live on the host; the device holds one block (float
    teacher block while its outputs are computed, then the student block) and one batch's activations:
    ``peak ~ max(W_float_block, W_student_block + 10 B x Q_block + B x A_layer)``: ``10 B`` a quantized weight
    is its decoded float32 value and scaled intermediate that backward keeps plus its unpacked code, ``A_layer``
    one batch's saved activations in one layer. The tail stage holds its layers (the same 10 B a quantized
    weight), both heads, and one window's logits and activations through those layers.
    No copy of the whole model moves; on the host, three sets of hidden states (n x seqlen x hidden float32: the
    quantized and float models' and the tail stage's inputs).
    Measured on the bundled model (CPU, small budget: benchmarks/finetune_blocks.py), the quantized model's own
    hidden states as inputs beat the float ones (KL 0.147 vs 0.184 for rtn:q4_0), per-token relative error beat
    plain MSE (0.147 vs 0.155) and the final-norm stage helped (0.147 vs 0.154). At 2 bits (IQ2_XXS types, 4
    epochs) the layer-wise objective plateaus above whole-model tuning (ppl 34.16 vs 32.58); the tail stage's KL
    on the logits took it to 33.66 with 4 layers, 33.58 with 8 (docs/scale.md).
  * ``auto`` (default): ``model`` when its estimated peak (:func:`model_mode_bytes`) fits in 80% of the device's
    free memory, else ``blocks``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from lowbit.calibration.capture import capture_layer_inputs
from lowbit.errors import LowbitError
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import DECODER_LAYERS, decoder_layers, module_device, set_module

MODES = ("auto", "model", "blocks")
SCHEDULES = ("constant", "cosine")  # the learning rate over the steps (FinetuneConfig.schedule)
CHAINS = ("compensate", "quant", "float")  # what block k reads and matches (finetune_blocks)
LOSSES = ("token", "mse")
AUTO_FRACTION = 0.8  # auto picks the whole-model mode when its estimated peak fits in this much free memory
# A whole-model tuning that was not kept runs once more at RETRY_LR, or at RETRY_FRACTION of its rate if that is
# smaller: on the CPU's 64 x 128 windows the K-quant presets refused both 3e-3 and 1e-3, and the retry at 1e-4 (a
# tenth of 1e-3) came out 0.1 perplexity worse at Q3_K_M than the one at 3e-4 (docs/gguf.md)
RETRY_LR, RETRY_FRACTION = 3e-4, 0.3
FULL_STEP_BITS = 4  # formats of at most this many code bits take FinetuneConfig.lr as it is (step_scale)


def step_scale(bits: int) -> float:
    """Adam's step for the multipliers of a ``bits``-bit format, relative to ``FinetuneConfig.lr``: halved for
    each bit above 4. Adam moves every parameter by about lr a step whatever its gradient, while a b-bit grid's
    step is ~2^(1 - b) of its range: 0.3% a step is a small part of a 4-bit step and a third of an 8-bit one, so
    at 4-bit's rate the tuning of Q8_0, Q6_K and 5-bit scales added more error than their rounding had left
    (docs/gguf.md, "K-quant presets with the GPU recipe")."""
    return 2.0 ** -max(0, bits - FULL_STEP_BITS)


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end tuning of stored float scales and norms after rounding (the ``+ft`` of a recipe)."""

    epochs: float = 2.0  # passes over the calibration windows
    lr: float = 3e-3  # Adam step on the log-multipliers: ~0.3% of a scale a step at <= 4 bits (step_scale)
    batch_size: int = 4  # windows per optimizer step
    norms: bool = True  # also tune normalization weights
    seed: int = 0
    mode: str = "auto"  # "model" (KL through the whole network), "blocks" (bounded memory) or "auto" (by memory)
    block_layers: int = 2  # decoder layers per block in the blocks mode
    tail_layers: int = 4  # blocks mode: the last decoder layers tuned again, with the final norm, by KL (tune_tail)
    schedule: str = "constant"  # "cosine": lr falls from its value to 0 over the steps (half a cosine)

    def __post_init__(self) -> None:  # checked when built (the CLI builds it before minutes of GPTQ), not after
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise LowbitError(f"finetune needs epochs > 0, lr > 0 and batch_size >= 1, got {self}")
        if self.mode not in MODES:
            raise LowbitError(f"finetune mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"finetune schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.block_layers, bool) or not isinstance(self.block_layers, int) or self.block_layers < 1:
            raise LowbitError(f"finetune block_layers must be an integer >= 1, got {self.block_layers!r}")
        if isinstance(self.tail_layers, bool) or not isinstance(self.tail_layers, int) or self.tail_layers < 0:
            raise LowbitError(f"finetune tail_layers must be an integer >= 0, got {self.tail_layers!r}")


@dataclass
class FinetuneReport:
    steps: int
    tuned_tensors: int
    tuned_values: int
    kl_first: float  # mean KL (nats/token) of the first step's batch, before any update (blocks: final-norm stage)
    kl_last: float  # mean KL of the last step's batch
    seconds: float
    mode: str = "model"  # the mode that ran ("auto" resolved)
    kl_end: float = math.nan  # model mode: mean KL of the first step's batch after the tuning
    kept: bool = True  # False: the tuning raised kl_end above kl_first, so the untuned values were kept
    lr: float = math.nan  # model mode: the learning rate of the tuning reported
    retried: bool = False  # model mode: the first tuning was not kept and this one ran at retry_lr(its rate)
    reverted_blocks: int = 0  # blocks mode: blocks whose tuning raised their first batch's loss (kept untuned)
    block_losses: list[list[float]] = field(default_factory=list)  # blocks mode: [first, last] loss per block
    peak_device_gb: float | None = None  # CUDA only: torch's peak allocated memory during the tuning


class ScaleTunedLinear(nn.Module):
    """A QuantLinear whose weight is ``decode(codes, params * exp(t))``: the same codes at trainable scales."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q
        codes, params = q.fmt.unpack(q.quantized())
        self.register_buffer("codes", _small_ints(codes))  # int64 from unpack: 8 bytes a weight held for nothing
        self.base = {k: v.float() for k, v in params.items()}
        self.log = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(self.base[k])) for k in q.fmt.float_params})
        for t in self.log.values():
            t.step_scale = step_scale(q.fmt.bits)  # read by _adam

    def params(self) -> dict[str, torch.Tensor]:
        return self.q.fmt.tuned(self.base, dict(self.log.items()))

    def weight(self) -> torch.Tensor:
        fmt = self.q.fmt
        return fmt.decode(self.codes.long(), fmt.expand(self.params(), self.q.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q._v is not None:
            x = q._v.apply(x)  # the torch transform: differentiable, unlike the Triton one
        if q.input_quant is not None:
            x = q.input_quant(x)
        y = F.linear(x, self.weight().to(x.dtype))
        if q._u is not None:
            y = q._u.inverse(y)
        return y if q.bias is None else y + q.bias.to(y.dtype)

    def merged(self) -> QuantLinear:
        """The QuantLinear storing the tuned parameters (rounded to their stored precision by ``pack``)."""
        q = self.q
        with torch.no_grad():
            qt = q.fmt.pack(self.codes.long(), self.params(), (q.out_features, q.in_features))
        bias = None if q.bias is None else q.bias.data
        return QuantLinear.from_quantized(qt, bias, q.rotation)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - signature from nn.Module
        super()._apply(fn, recurse)
        self.base = {k: fn(v) for k, v in self.base.items()}
        return self


def _small_ints(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() and codes.dtype == torch.int64:
        lo, hi = int(codes.min()), int(codes.max())
        for dtype in (torch.uint8, torch.int16, torch.int32):
            info = torch.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return codes.to(dtype)
    return codes


class _Scaled(nn.Module):
    """Parametrization ``w0 * exp(t)`` for a normalization weight."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.t = nn.Parameter(torch.zeros_like(like, dtype=torch.float32))

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 * self.t.exp().to(w0.dtype)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """RMSNorm / LayerNorm modules (any class whose name ends in Norm) with a weight."""
    return {n: m for n, m in model.named_modules()
            if type(m).__name__.lower().endswith("norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) in nats."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def finetune(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, cfg: FinetuneConfig | None = None,
             device: str | torch.device | None = None, progress: bool = True) -> FinetuneReport:
    """Tune ``model``'s float quantization parameters and norms in place to match ``teacher`` (the float model).

    ``samples``: [n, seqlen] token ids (the calibration windows). ``cfg.mode`` picks whole-model or block-wise
    training (module docstring); in the whole-model mode both models run on ``device``, in the blocks mode one
    block at a time does. ``model`` returns to where it was, ``teacher`` is left anywhere (it is a throwaway copy).
    On any error the model is left exactly as it was before the call.
    """
    cfg = cfg or FinetuneConfig()
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise LowbitError(f"finetune needs [n, seqlen] token windows, got shape {tuple(samples.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not tunable_linears(model):
        raise LowbitError("finetune: the model has no quantized linears with float parameters to tune")
    mode = resolve_mode(model, teacher, tuple(samples.shape), cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "blocks":
        report = finetune_blocks(model, teacher, samples, cfg, device, progress)
    else:
        report = _finetune_model(model, teacher, samples, cfg, device, progress)
        if not report.kept:  # too large a step for how close the model already is: once more with a smaller one
            retry = _finetune_model(model, teacher, samples, replace(cfg, lr=retry_lr(cfg.lr)), device, progress)
            report = replace(retry, seconds=report.seconds + retry.seconds, lr=retry.lr, retried=True)
    if device.type == "cuda":
        report.peak_device_gb = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    warn_if_reverted(report)
    return report


def retry_lr(lr: float) -> float:
    """The rate a refused whole-model tuning at ``lr`` runs again at: RETRY_LR, or RETRY_FRACTION of ``lr`` if
    smaller (3e-3 and 1e-3 both retry at 3e-4)."""
    return min(RETRY_LR, RETRY_FRACTION * lr)


def warn_if_reverted(report: FinetuneReport) -> None:
    """Tell the user when the guard kept untuned values (the whole model, or some blocks / streamed layers)."""
    if not report.kept or report.reverted_blocks:
        what = ("the model (also at a smaller learning rate)" if not report.kept
                else f"{report.reverted_blocks} block(s)")
        warnings.warn(f"finetune raised the loss it minimizes, so {what} kept the untuned scales (a smaller --ft-lr "
                      "may help)", stacklevel=3)


def tunable_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantized linears with stored float parameters (what ``+ft`` can tune)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.fmt.float_params}


def host_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on the host (the teacher: nothing is duplicated
    on the GPU where the model sits; the tuning moves what it needs)."""
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "cpu" and id(t) not in memo:
            c = t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------------------ mode selection


def model_mode_bytes(model: nn.Module, teacher: nn.Module, shape: tuple[int, int], cfg: FinetuneConfig) -> int:
    """Estimated peak bytes of the whole-model mode: both models, the decoded float32 weights and their scaled
    intermediates that backward keeps (8 B a quantized weight, plus 2 B of unpacked codes), and one batch's
    activations: per token and layer ~10 hidden-wide and 4 MLP-wide float32 values, and ~6 vocabulary-wide ones for
    the two models' logits, their log-softmaxes and the gradient."""
    n, seqlen = shape
    tokens = min(cfg.batch_size, n) * seqlen
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden
    layers = len(decoder_layers(model))
    quant = sum(m.in_features * m.out_features for m in tunable_linears(model).values())
    acts = 4 * tokens * (layers * (10 * hidden + 4 * inter) + 6 * c.vocab_size)
    return _tensor_bytes(model) + _tensor_bytes(teacher) + 10 * quant + acts


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the host's available memory for the CPU; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def resolve_mode(model: nn.Module, teacher: nn.Module, shape: tuple[int, int], cfg: FinetuneConfig,
                 device: torch.device) -> str:
    """``cfg.mode``, with ``auto`` resolved: ``model`` when :func:`model_mode_bytes`, less what already sits on
    ``device``, fits in ``AUTO_FRACTION`` of its free memory (or the free memory is unknown), else ``blocks``."""
    if cfg.mode != "auto":
        return cfg.mode
    free = device_free_bytes(device)
    if free is None:
        return "model"
    need = model_mode_bytes(model, teacher, shape, cfg)
    need -= _tensor_bytes(model, device) + _tensor_bytes(teacher, device)
    return "model" if need <= AUTO_FRACTION * free else "blocks"


def _tensor_bytes(module: nn.Module, on: torch.device | None = None) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen and (on is None or _same_device(t.device, on)):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


# ------------------------------------------------------------------------------------------------ whole model


def _finetune_model(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, cfg: FinetuneConfig,
                    device: torch.device, progress: bool) -> FinetuneReport:
    home = next(model.parameters()).device
    quant = tunable_linears(model)
    t0 = time.perf_counter()
    flags = {p: p.requires_grad for p in model.parameters()}
    wrapped = {n: ScaleTunedLinear(m) for n, m in quant.items()}
    norms = norm_modules(model) if cfg.norms else {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n, w in wrapped.items():
            set_module(model, n, w)
        for m in norms.values():
            parametrize.register_parametrization(m, "weight", _Scaled(m.weight))
        model.to(device).eval()
        teacher.to(device).eval()
        tuned = [p for w in wrapped.values() for p in w.log.values()]
        tuned += [m.parametrizations.weight[0].t for m in norms.values()]
        steps, kl_first, kl_last, kl_end = _train(model, teacher, samples, tuned, cfg, device, progress)
    except BaseException:
        _unwrap(model, wrapped, norms.values(), keep=False)
        model.to(home)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    kept = kl_end <= kl_first  # tuning that made its own objective worse (too large a step) is not kept
    _unwrap(model, wrapped, norms.values(), keep=kept)
    model.to(home)
    return FinetuneReport(steps, len(tuned), sum(p.numel() for p in tuned), kl_first, kl_last,
                          time.perf_counter() - t0, mode="model", kl_end=kl_end, kept=kept, lr=cfg.lr)


def _unwrap(root: nn.Module, wrapped: dict[str, ScaleTunedLinear], norms, keep: bool) -> None:  # noqa: ANN001
    """Put QuantLinears back in place of their wrappers and drop the norms' parametrizations: with the tuned
    values (``keep``; norms rounded to float16, as stored) or the originals."""
    for n, w in wrapped.items():
        set_module(root, n, w.merged() if keep else w.q)
    for m in norms:
        if not parametrize.is_parametrized(m, "weight"):
            continue
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=keep)
        if keep:
            with torch.no_grad():  # stored as float16 by checkpoints and GGUF export: compute with what is stored
                m.weight.copy_(m.weight.half().to(m.weight.dtype))


def _train(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, tuned: list[nn.Parameter],
           cfg: FinetuneConfig, device: torch.device, progress: bool) -> tuple[int, float, float, float]:
    """Adam over shuffled batches of windows; returns (steps, KL of the first batch, KL of the last batch, KL of
    the first batch after the last step)."""
    n = samples.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(1, round(cfg.epochs * n / bs))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range((steps * bs + n - 1) // n)])
    opt = _adam(tuned, cfg.lr)
    sched = _scheduler(opt, cfg.schedule, steps)
    first = last = float("nan")
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress)
    for step in bar:
        ids = samples[order[step * bs : (step + 1) * bs]].to(device)
        with torch.no_grad():
            target = teacher(ids).logits
        last = _adam_step(opt, kl_per_token(target, model(ids).logits), step, cfg.lr)
        sched.step()
        first = last if step == 0 else first
        bar.set_postfix(kl=f"{last:.4f}")
    ids = samples[order[:bs]].to(device)
    with torch.no_grad():
        end = float(kl_per_token(teacher(ids).logits, model(ids).logits))
    return steps, first, last, end


# ------------------------------------------------------------------------------------------------ blocks


def finetune_blocks(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, cfg: FinetuneConfig,
                    device: torch.device, progress: bool = True, *, chain: str = "compensate", loss: str = "token",
                    final_norm: bool = True, tail: int | None = None) -> FinetuneReport:
    """Tune ``model`` in place block by block (``cfg.block_layers`` decoder layers), each against ``teacher``'s
    hidden states; only the current block is on ``device``, the activations stay on the host.

    ``chain``, what block k reads and what it must output:
      * ``compensate``: the quantized model's own hidden states (after the blocks already tuned) in, the float
        model's hidden states out, so each block also corrects the error it receives;
      * ``quant``: the same inputs, the float block's output on those inputs (GPTQ's sequential objective);
      * ``float``: the float model's hidden states in and out (blocks trained independently).
    ``loss``: ``token`` = mean over tokens of ||y - t||^2 / ||t||^2 (each token counts alike, as it does after the
    next RMSNorm); ``mse`` = sum ||y - t||^2 / sum ||t||^2 (tokens with huge hidden states dominate).
    ``final_norm``: then tune the final norm (when ``cfg.norms``) with KL on logits, window by window, and with it
    the last ``tail`` decoder layers (default ``cfg.tail_layers``, rounded up to whole blocks; :func:`tune_tail`),
    fed the quantized model's hidden states entering them (one more host copy of the hidden states).
    """
    tail = cfg.tail_layers if tail is None else tail
    if chain not in CHAINS or loss not in LOSSES:
        raise LowbitError(f"finetune_blocks: chain in {CHAINS} and loss in {LOSSES}, got {chain!r}, {loss!r}")
    t0 = time.perf_counter()
    layers, t_layers = decoder_layers(model), decoder_layers(teacher)
    if len(layers) != len(t_layers):
        raise LowbitError(f"finetune: the teacher has {len(t_layers)} decoder layers, the model {len(layers)}")
    prefix = DECODER_LAYERS[model.config.model_type]
    host = torch.device("cpu")
    if tail < 0:
        raise LowbitError(f"finetune_blocks: tail must be >= 0, got {tail}")
    track_xs = chain != "float" or final_norm  # the quantized model's own hidden states
    track_xt = chain != "quant" or final_norm  # the float model's
    flags = {p: p.requires_grad for p in model.parameters()}
    done: list[tuple[str, QuantLinear]] = []  # (name, the QuantLinear before tuning): undone on failure
    saved: list[tuple[nn.Module, torch.Tensor]] = []  # (norm, its weight before tuning)
    losses: list[list[float]] = []
    steps = n_tensors = n_values = 0
    kl_first = kl_last = math.nan
    reverted = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        xs, kwargs = capture_layer_inputs(model, samples, device, store_device=host)
        xt = capture_layer_inputs(teacher, samples, device, store_device=host)[0] if track_xt else None
        bar = tqdm(range(0, len(layers), cfg.block_layers), desc="finetune blocks", unit="block",
                   disable=not progress)
        starts = range(0, len(layers), cfg.block_layers)
        tail_start = max(s for s in starts if s <= max(0, len(layers) - tail)) if tail and final_norm else None
        xs_tail = None  # the quantized model's hidden states entering the tail stage's layers
        for k, start in enumerate(bar):
            if start == tail_start and xs is not None:
                xs_tail = xs.clone()
            idx = range(start, min(start + cfg.block_layers, len(layers)))
            with _on(device, *(t_layers[i] for i in idx)):  # the float block: the targets, then it leaves
                float_block = [t_layers[i] for i in idx]
                if chain == "quant":
                    target = _run(float_block, xs, kwargs, device)
                if track_xt:
                    nxt = _run(float_block, xt, kwargs, device, out=None if chain == "float" else xt)
                    target = nxt if chain != "quant" else target
            block = [layers[i] for i in idx]
            home = module_device(block[0])
            with _on(device, *block):
                quant = {f"{prefix}.{i}.{n}": m for i in idx for n, m in layers[i].named_modules()
                         if isinstance(m, QuantLinear) and m.fmt.float_params}
                norms = [m for i in idx for m in norm_modules(layers[i]).values()] if cfg.norms else []
                saved += [(m, m.weight.detach().to(host, copy=True)) for m in norms]
                first, last, n_steps, tuned, kept = _tune_block(model, quant, norms, block,
                                                                xt if chain == "float" else xs, target, kwargs, cfg,
                                                                device, loss, cfg.seed + k)
                reverted += not kept
                done += [(n, q.to(home)) for n, q in quant.items()]
                if track_xs:
                    _run(block, xs, kwargs, device, out=xs)  # through the tuned block: the next block's inputs
            if chain == "float":
                xt = nxt
            del target
            losses.append([first, last])
            steps, n_tensors, n_values = steps + n_steps, n_tensors + len(tuned), n_values + _numel(tuned)
            bar.set_postfix(loss=f"{last:.4g}")
        if final_norm and cfg.norms:
            norm = find_final_norm(model)
            if norm is not None:
                saved.append((norm, norm.weight.detach().to(host, copy=True)))
                last_layers = list(layers[tail_start:]) if xs_tail is not None else []
                kl_first, kl_last, n_steps, _, _, kept = tune_tail(
                    last_layers, norm, find_final_norm(teacher), model.get_output_embeddings(),
                    teacher.get_output_embeddings(), xs if xs_tail is None else xs_tail, xt, kwargs, cfg, device)
                # the tail's layers were counted when first tuned: only the final norm is new
                steps, n_tensors, n_values = steps + n_steps, n_tensors + 1, n_values + norm.weight.numel()
                reverted += not kept
    except BaseException:
        for n, q in done:
            set_module(model, n, q)
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return FinetuneReport(steps, n_tensors, n_values, kl_first, kl_last, time.perf_counter() - t0, mode="blocks",
                          reverted_blocks=reverted, block_losses=losses)


def tune_layer(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, cfg: FinetuneConfig,
               device: torch.device, seed: int, loss: str = "token") -> tuple[float, float, int, int, int, bool]:
    """Tune one quantized decoder layer in place (its stored float scales, and its norms when ``cfg.norms``) so
    that it maps ``inputs`` to ``targets`` (block mode with one layer, as streaming runs it). Returns (first loss,
    last loss, steps, tuned tensors, tuned values, whether the tuning was kept: not when it raised the first
    batch's loss); on an error the layer is left as it was."""
    quant = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear) and m.fmt.float_params}
    norms = list(norm_modules(layer).values()) if cfg.norms else []
    flags = {p: p.requires_grad for p in layer.parameters()}
    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        first, last, steps, tuned, kept = _tune_block(layer, quant, norms, [layer], inputs, targets, kwargs, cfg,
                                                      device, loss, seed)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return first, last, steps, len(tuned), _numel(tuned), kept


def _tune_block(root: nn.Module, quant: dict[str, QuantLinear], norms: list[nn.Module], block: list[nn.Module],
                inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, cfg: FinetuneConfig, device: torch.device,
                loss: str, seed: int) -> tuple[float, float, int, list[nn.Parameter], bool]:
    """Wrap ``quant`` (names under ``root``) and ``norms`` for tuning, train ``block`` to map ``inputs`` to
    ``targets``, and put the tuned modules in place, or the originals when the tuning raised the first batch's
    loss or failed. Returns (first loss, last loss, steps, the tuned parameters, whether the tuning was kept)."""
    wrapped = {n: ScaleTunedLinear(m) for n, m in quant.items()}
    tuned = _wrap(root, wrapped, norms)
    try:
        first, last, steps, end = _train_block(block, inputs, targets, kwargs, tuned, cfg, device, loss, seed)
    except BaseException:
        _unwrap(root, wrapped, norms, keep=False)
        raise
    kept = end <= first
    _unwrap(root, wrapped, norms, keep=kept)
    return first, last, steps, tuned, kept


def block_loss(y: torch.Tensor, t: torch.Tensor, kind: str = "token") -> torch.Tensor:
    """The blocks mode's distance from output ``y`` to target ``t`` ([..., hidden]); see :func:`finetune_blocks`."""
    err = (y.float() - t.float()).pow(2).sum(-1)
    ref = t.float().pow(2).sum(-1)
    if kind == "token":
        return (err / ref.clamp_min(1e-12)).mean()
    return err.sum() / ref.sum().clamp_min(1e-12)


def _wrap(root: nn.Module, wrapped: dict[str, ScaleTunedLinear], norms: list[nn.Module]) -> list[nn.Parameter]:
    for n, w in wrapped.items():
        set_module(root, n, w)
    for m in norms:
        parametrize.register_parametrization(m, "weight", _Scaled(m.weight))
    return [p for w in wrapped.values() for p in w.log.values()] + [m.parametrizations.weight[0].t for m in norms]


def _numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _train_block(block: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict,
                 tuned: list[nn.Parameter], cfg: FinetuneConfig, device: torch.device, loss: str,
                 seed: int) -> tuple[float, float, int, float]:
    """Adam over shuffled batches of windows through one block; returns (first loss, last loss, steps, the first
    batch's loss after the last step)."""
    n = inputs.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(1, round(cfg.epochs * n / bs))
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range((steps * bs + n - 1) // n)])
    opt = _adam(tuned, cfg.lr)
    sched = _scheduler(opt, cfg.schedule, steps)
    dtype = _dtype(block)
    first = last = math.nan

    def batch_loss(step: int) -> torch.Tensor:
        batch = order[step * bs : (step + 1) * bs]
        h = inputs[batch].to(device, dtype)
        for layer in block:
            h = _hidden(layer(h, **kwargs))
        return block_loss(h, targets[batch].to(device), loss)

    for step in range(steps):
        last = _adam_step(opt, batch_loss(step), step, cfg.lr)
        sched.step()
        first = last if step == 0 else first
    with torch.no_grad():
        end = float(batch_loss(0))
    return first, last, steps, end


@torch.no_grad()
def _run(block: list[nn.Module], x: torch.Tensor, kwargs: dict, device: torch.device,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` applied to each window of ``x`` (host), into ``out`` (may be ``x``) or a new host tensor."""
    out = torch.empty_like(x) if out is None else out
    dtype = _dtype(block)
    once = [m for layer in block for m in layer.modules() if isinstance(m, QuantLinear) and not m.weight_cached]
    try:
        for m in once:  # dequantize once for the pass, not once a window
            m.cache_weight(True)
        for j in range(x.shape[0]):
            h = x[j : j + 1].to(device, dtype)
            for layer in block:
                h = _hidden(layer(h, **kwargs))
            out[j] = h[0].to(out.device, out.dtype)
    finally:
        for m in once:
            m.cache_weight(False)
    return out


def _hidden(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _dtype(block: list[nn.Module]) -> torch.dtype:
    return next((p.dtype for layer in block for p in layer.parameters() if p.is_floating_point()), torch.float32)


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The one norm outside the decoder layers, applied right before the head (None when there is not exactly
    one, or when something else sits between it and the head: OPT's project_out)."""
    prefix = DECODER_LAYERS[model.config.model_type] + "."
    outside = [m for n, m in norm_modules(model).items() if not n.startswith(prefix)]
    proj = getattr(model.config, "word_embed_proj_dim", None)
    if len(outside) != 1 or (proj is not None and proj != model.config.hidden_size):
        return None
    return outside[0]


def tune_tail(layers: list[nn.Module], norm: nn.Module, t_norm: nn.Module, head: nn.Module, t_head: nn.Module,
              xs: torch.Tensor, xt: torch.Tensor, kwargs: dict, cfg: FinetuneConfig,
              device: torch.device) -> tuple[float, float, int, int, int, bool]:
    """Tune the last decoder ``layers`` (their stored float scales and norms) and the final ``norm`` together, in
    place, by KL through the head: ``head(norm(layers(xs)))`` against the teacher's ``t_head(t_norm(xt))``, ``xs``
    being the quantized model's hidden states entering ``layers[0]`` and ``xt`` the float model's last ones.

    The layer-wise objective cannot tell errors that move the logits from errors that do not; this stage sees the
    logits, in the memory of ``len(layers)`` layers, the head and one window's logits (windows one at a time,
    gradients accumulated over the batch). With no layer it tunes the final norm alone. The final norm is tuned
    only when ``cfg.norms``. Returns (first loss, last loss, steps, tuned tensors, tuned values, whether the
    tuning was kept: not when it raised the first batch's loss); on an error everything is left as it was."""
    if not layers and not cfg.norms:  # nothing to tune
        return math.nan, math.nan, 0, 0, 0, True
    n = xs.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(1, round(cfg.epochs * n / bs))
    g = torch.Generator().manual_seed(cfg.seed + 10_000)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range((steps * bs + n - 1) // n)])
    dtype = norm.weight.dtype
    first = last = math.nan
    with _on(device, norm, head, t_norm, t_head, *layers), _frozen(*layers, norm, head):
        wrapped = [{n: ScaleTunedLinear(m) for n, m in layer.named_modules()
                    if isinstance(m, QuantLinear) and m.fmt.float_params} for layer in layers]
        norms = [[m for m in norm_modules(layer).values()] if cfg.norms else [] for layer in layers]
        norms.append([norm] if cfg.norms else [])
        roots = [*layers, norm]
        tuned = [p for root, w, ns in zip(roots, [*wrapped, {}], norms, strict=True) for p in _wrap(root, w, ns)]

        def batch_kl(step: int, backward: bool) -> float:  # windows one at a time, gradients accumulated
            total = 0.0
            for j in order[step * bs : (step + 1) * bs].tolist():
                with torch.no_grad():
                    target = t_head(t_norm(xt[j : j + 1].to(device, dtype)))
                with torch.set_grad_enabled(backward):
                    h = xs[j : j + 1].to(device, dtype)
                    for layer in layers:
                        h = _hidden(layer(h, **kwargs))
                    value = kl_per_token(target, head(norm(h))) / bs
                if backward:
                    value.backward()
                total += float(value.detach())
            return total

        try:
            opt = _adam(tuned, cfg.lr)
            sched = _scheduler(opt, cfg.schedule, steps)
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                last = batch_kl(step, backward=True)
                if not math.isfinite(last):
                    raise LowbitError(f"finetune: non-finite loss at step {step}; lower the learning rate "
                                      f"({cfg.lr:g})")
                opt.step()
                sched.step()
                first = last if step == 0 else first
            kept = batch_kl(0, backward=False) <= first
        except BaseException:
            for root, w, ns in zip(roots, [*wrapped, {}], norms, strict=True):
                _unwrap(root, w, ns, keep=False)
            raise
        for root, w, ns in zip(roots, [*wrapped, {}], norms, strict=True):
            _unwrap(root, w, ns, keep=kept)
    return first, last, steps, len(tuned), _numel(tuned), kept


class _frozen:  # noqa: N801 - used as a statement: with _frozen(*modules)
    """No gradient for ``modules``' own parameters inside the ``with`` body (the tuning adds its own), then each
    parameter's flag as it was."""

    def __init__(self, *modules: nn.Module):
        self.flags = {p: p.requires_grad for m in modules for p in m.parameters()}

    def __enter__(self) -> None:
        for p in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags.items():
            p.requires_grad_(flag)


class _on:  # noqa: N801 - used as a statement: with _on(device, *modules)
    """Move ``modules`` to ``device`` for the ``with`` body, then each back to where it was."""

    def __init__(self, device: torch.device, *modules: nn.Module):
        self.device, self.homes = device, [(m, module_device(m)) for m in modules]

    def __enter__(self) -> None:
        for m, _ in self.homes:
            m.to(self.device)

    def __exit__(self, *exc: object) -> None:
        for m, home in self.homes:
            m.to(home)


def _adam(tuned: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over ``tuned``: each linear's multipliers at its format's step (:func:`step_scale`), the norms' at
    the finest of those (a norm scales the inputs of the linears after it, which moves their outputs as their own
    scales do)."""
    scales = [getattr(p, "step_scale", None) for p in tuned]
    finest = min((s for s in scales if s is not None), default=1.0)
    groups: dict[float, list[nn.Parameter]] = {}
    for p, s in zip(tuned, scales, strict=True):
        groups.setdefault(finest if s is None else s, []).append(p)
    return torch.optim.Adam([{"params": ps, "lr": lr * s} for s, ps in groups.items()], lr=lr)


def _scheduler(opt: torch.optim.Optimizer, schedule: str, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's rate over the ``steps`` (stepped once after each optimizer step): ``constant``, or ``cosine``
    from the group's rate at the first step down to 0 after the last (measured worse than constant on the bundled
    model at 96 steps, whose tuning was still descending: docs/gguf.md)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)


def _adam_step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, lr: float) -> float:
    """One optimizer step on ``loss`` (refused when it is not finite); the loss as a float."""
    if not torch.isfinite(loss):
        raise LowbitError(f"finetune: non-finite loss at step {step}; lower the learning rate ({lr:g})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
