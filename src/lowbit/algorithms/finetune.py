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
Each tuned tensor ``p`` becomes ``p0 * exp(t)`` with ``t`` trained from 0 (Adam), so one learning rate fits
scales of every magnitude and no sign ever flips. This is the scale-only end of QuIP#'s and EfficientQAT's
end-to-end fine-tuning: fewer parameters (one per 32 weights at 4 bits, one per 256 at IQ2_XXS), nothing that
a GGUF file could not hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import set_module


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end tuning of stored float scales and norms after rounding (the ``+ft`` of a recipe)."""

    epochs: float = 2.0  # passes over the calibration windows
    lr: float = 3e-3  # Adam step on the log-multipliers: ~0.3% of a scale per step (best of 1e-3/3e-3 measured)
    batch_size: int = 4  # windows per optimizer step
    norms: bool = True  # also tune normalization weights
    seed: int = 0

    def __post_init__(self) -> None:  # checked when built (the CLI builds it before minutes of GPTQ), not after
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1:
            raise LowbitError(f"finetune needs epochs > 0, lr > 0 and batch_size >= 1, got {self}")


@dataclass
class FinetuneReport:
    steps: int
    tuned_tensors: int
    tuned_values: int
    kl_first: float  # mean KL (nats/token) of the first step's batch, before any update
    kl_last: float  # mean KL of the last step's batch
    seconds: float


class ScaleTunedLinear(nn.Module):
    """A QuantLinear whose weight is ``decode(codes, params * exp(t))``: the same codes at trainable scales."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q
        codes, params = q.fmt.unpack(q.quantized())
        self.register_buffer("codes", codes)
        self.base = {k: v.float() for k, v in params.items()}
        self.log = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(self.base[k])) for k in q.fmt.float_params})

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v * self.log[k].exp() if k in self.log else v for k, v in self.base.items()}

    def weight(self) -> torch.Tensor:
        fmt = self.q.fmt
        return fmt.decode(self.codes, fmt.expand(self.params(), self.q.in_features))

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
            qt = q.fmt.pack(self.codes, self.params(), (q.out_features, q.in_features))
        bias = None if q.bias is None else q.bias.data
        return QuantLinear.from_quantized(qt, bias, q.rotation)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - signature from nn.Module
        super()._apply(fn, recurse)
        self.base = {k: fn(v) for k, v in self.base.items()}
        return self


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

    ``samples``: [n, seqlen] token ids (the calibration windows). Both models run on ``device``; ``model``
    returns to where it was. On any error the model is left exactly as it was before the call.
    """
    cfg = cfg or FinetuneConfig()
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise LowbitError(f"finetune needs [n, seqlen] token windows, got shape {tuple(samples.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home = next(model.parameters()).device
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.fmt.float_params}
    if not quant:
        raise LowbitError("finetune: the model has no quantized linears with float parameters to tune")
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
        steps, kl_first, kl_last = _train(model, teacher, samples, tuned, cfg, device, progress)
    except BaseException:
        for n, w in wrapped.items():
            set_module(model, n, w.q)
        for m in norms.values():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        model.to(home)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    for n, w in wrapped.items():
        set_module(model, n, w.merged())
    for m in norms.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        with torch.no_grad():  # stored as float16 by checkpoints and GGUF export: compute with what is stored
            m.weight.copy_(m.weight.half().to(m.weight.dtype))
    model.to(home)
    return FinetuneReport(steps, len(tuned), sum(p.numel() for p in tuned), kl_first, kl_last,
                          time.perf_counter() - t0)


def _train(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, tuned: list[nn.Parameter],
           cfg: FinetuneConfig, device: torch.device, progress: bool) -> tuple[int, float, float]:
    """Adam over shuffled batches of windows; returns (steps, KL of the first batch, KL of the last batch)."""
    n = samples.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(1, round(cfg.epochs * n / bs))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range((steps * bs + n - 1) // n)])
    opt = torch.optim.Adam(tuned, lr=cfg.lr)
    first = last = float("nan")
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress)
    for step in bar:
        ids = samples[order[step * bs : (step + 1) * bs]].to(device)
        with torch.no_grad():
            target = teacher(ids).logits
        loss = kl_per_token(target, model(ids).logits)
        if not torch.isfinite(loss):
            raise LowbitError(f"finetune: non-finite loss at step {step}; lower the learning rate ({cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        bar.set_postfix(kl=f"{last:.4f}")
    return steps, first, last
