"""What to do to a model's weights, as one frozen value: the format or plan, the rounding method, rotations,
end-to-end tuning and their settings. Every API call takes a :class:`Recipe`; strings such as
``"gptq_act+rht+ft:q4_0"`` are parsed once, at the edge (CLI, benchmark arguments), by :meth:`Recipe.parse`.

The string grammar (also used in ``compare`` variant lists)::

    [method[+rht][+fused][+ft]:]format-or-mix[+aN][+kvN]

* method: ``rtn`` (default), ``gptq``, ``gptq_act`` (GPTQ with act-order) or ``imatrix`` (nearest rounding weighted
  by calibration activations, as llama.cpp's imatrix);
* ``+rht`` rotates each linear with randomized Hadamards undone online (lowbit runtime only); ``+fused`` folds
  norms and a residual-stream rotation into the float weights first (any exporter); ``+ft`` tunes the stored float
  scales and norms end to end against the float model after rounding (same storage);
* format: a name from ``lowbit formats`` or a mixed-precision spec ``LOW/HIGH@<n>L|<x>bpw|<x>MB``;
* ``+aN`` / ``+kvN`` (variants only): simulate N-bit activations / KV cache when evaluating.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from lowbit.algorithms.finetune import FinetuneConfig
from lowbit.algorithms.mixed import is_mix, parse_mix
from lowbit.algorithms.sequential import CalibConfig, GPTQConfig
from lowbit.errors import LowbitError
from lowbit.eval.simulate import SimConfig
from lowbit.formats import get_format

METHODS = ("rtn", "gptq", "gptq_act", "imatrix")
SUFFIXES = ("+rht", "+fused", "+ft")
BASELINE = "fp16"
_BASELINE_NAMES = (BASELINE, "bf16", "16bit")
_SIM = re.compile(r"\+(a|kv)(\d)$", re.IGNORECASE)


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model. Checked when built, so a bad recipe fails before any work.

    >>> Recipe("q4_0", method="gptq_act", calib=CalibConfig(nsamples=32, seqlen=512))
    Recipe('gptq_act:q4_0')
    >>> Recipe.parse("gptq+rht+ft:iq2_xxs").finetune
    FinetuneConfig(epochs=2.0, lr=0.003, batch_size=4, norms=True, seed=0, mode='auto', block_layers=2, tail_layers=4)
    """

    format: str | Mapping[str, str]  # a format name, a mix spec, or a plan {linear name: format name}
    method: str = "rtn"
    rotate: bool = False  # +rht
    fuse_rotation: bool = False  # +fused
    finetune: FinetuneConfig | None = None  # +ft when set
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rotation_seed: int = 0  # seed of the +rht and +fused rotations
    head: str | None = None  # a format for the LM head, rounded to nearest after the rest (None: 16-bit)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}, each optionally with "
                              f"any of {', '.join(SUFFIXES)}")
        if isinstance(self.format, Mapping):
            if not self.format:
                raise LowbitError("an empty plan quantizes nothing")
            object.__setattr__(self, "format", MappingProxyType(dict(self.format)))
            formats = set(self.format.values())
        elif is_mix(self.format):
            formats = set(parse_mix(self.format).formats)
        else:
            formats = {self.format}
        if self.head is not None:
            get_format(self.head)
        vector = [f for f in formats if get_format(f).vector_dim > 1]  # get_format: unknown names fail here
        if self.method == "gptq_act" and len(vector) == len(formats):
            raise LowbitError(f"act-order needs a scalar format; {sorted(formats)} are vector codebooks (block "
                              "LDLQ keeps natural order): use gptq")

    @classmethod
    def parse(cls, spec: str, **settings: Any) -> Recipe:
        """``"gptq_act+rht+ft:q4_0"`` -> Recipe; ``settings`` fill the rest (calib=, gptq=, finetune=, ...).

        A ``+ft`` suffix uses ``settings["finetune"]`` when given, else the default tuning.
        """
        method, _, fmt = spec.strip().rpartition(":")
        if not fmt:
            raise LowbitError(f"no format in {spec!r}; e.g. gptq_act:q4_0 (see `lowbit formats`)")
        base, found = _split_suffixes(method or "rtn", spec)
        if "+ft" in found:
            settings["finetune"] = settings.get("finetune") or FinetuneConfig()
        else:
            settings.pop("finetune", None)
        return cls(fmt.strip(), base, rotate="+rht" in found, fuse_rotation="+fused" in found, **settings)

    @property
    def method_spec(self) -> str:
        """The method with its suffixes, e.g. ``gptq_act+rht+ft``."""
        return (self.method + ("+rht" if self.rotate else "") + ("+fused" if self.fuse_rotation else "")
                + ("+ft" if self.finetune else ""))

    @property
    def format_label(self) -> str:
        if isinstance(self.format, Mapping):
            return f"plan({len(self.format)} linears: {', '.join(sorted(set(self.format.values())))})"
        return self.format

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing reads calibration text (and so needs the tokenizer)."""
        mix = isinstance(self.format, str) and is_mix(self.format)
        return self.method != "rtn" or self.finetune is not None or mix

    def with_format(self, fmt: str | Mapping[str, str]) -> Recipe:
        return replace(self, format=fmt)

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint records about how it was made."""
        out: dict[str, Any] = {"recipe": str(self), "method": self.method_spec,
                               "format": dict(self.format) if isinstance(self.format, Mapping) else self.format}
        if self.needs_calibration:
            out["calibration"] = _fields(self.calib)
            out["gptq"] = _fields(self.gptq)
        if self.rotate or self.fuse_rotation:
            out["rotation_seed"] = self.rotation_seed
        if self.finetune:
            out["finetune"] = _fields(self.finetune)
        if self.head:
            out["head"] = self.head
        return out

    def __str__(self) -> str:
        return f"{self.method_spec}:{self.format_label}"

    def __repr__(self) -> str:
        return f"Recipe({str(self)!r}" + (f", head={self.head!r})" if self.head else ")")


def _fields(obj: object) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def _split_suffixes(method: str, spec: str) -> tuple[str, set[str]]:
    base, found = method.strip(), set()
    while suffix := next((s for s in SUFFIXES if base.endswith(s)), None):
        base = base.removesuffix(suffix)
        found.add(suffix)
    if base not in METHODS:
        raise LowbitError(f"unknown method {method!r} in {spec!r}; known: {', '.join(METHODS)}, each optionally "
                          f"with any of {', '.join(SUFFIXES)}")
    return base, found


@dataclass(frozen=True)
class Variant:
    """One row of a side-by-side comparison: a recipe (None: the 16-bit baseline) and simulated act/KV bits."""

    label: str
    recipe: Recipe | None
    sim: SimConfig = field(default_factory=SimConfig)

    @property
    def is_baseline(self) -> bool:
        return self.recipe is None and not self.sim.active

    @classmethod
    def parse(cls, spec: str, **settings: Any) -> Variant:
        """``fp16``, ``[method:]format`` or either with ``+aN`` / ``+kvN``; ``settings`` as for Recipe.parse."""
        label = spec.strip()
        base, sim = split_sim(label)
        if base.lower() in _BASELINE_NAMES:
            return cls(label, None, sim)
        return cls(label, Recipe.parse(base if ":" in base else f"rtn:{base}", **settings), sim)


def split_sim(spec: str) -> tuple[str, SimConfig]:
    """``gptq+rht:nz2_ch+a4+kv4`` -> (``gptq+rht:nz2_ch``, simulated 4-bit activations and KV cache)."""
    bits: dict[str, int] = {}
    spec = spec.strip()
    while m := _SIM.search(spec):
        bits[m[1].lower()] = int(m[2])
        spec = spec[: m.start()]
    return spec, SimConfig(act_bits=bits.get("a"), kv_bits=bits.get("kv"))
