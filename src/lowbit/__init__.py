"""lowbit: extreme low-bit (2/3/4-bit) post-training quantization of LLMs.

>>> import lowbit
>>> model, tok = lowbit.load()                              # the bundled SmolLM2-135M, an HF dir or a hub id
>>> lowbit.quantize(model, "gptq_act:q4_0", tok)            # a Recipe, or its string form
>>> lowbit.evaluate(model, tok, max_windows=4)

The names below are imported on first use, so ``import lowbit`` (and ``lowbit --version``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from lowbit.io.hf_register import install as _install_hf_quantizer

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lowbit.api", "quantize": "lowbit.api", "save": "lowbit.api", "evaluate": "lowbit.api",
    "export_gguf": "lowbit.api", "export_hf": "lowbit.api", "generate": "lowbit.api", "QuantizeResult": "lowbit.api",
    "convert": "lowbit.jobs", "convert_gguf": "lowbit.jobs", "convert_hf": "lowbit.jobs",
    "convert_streamed": "lowbit.streaming", "write_synthetic": "lowbit.io.synthetic",
    "compare": "lowbit.comparison",
    "Recipe": "lowbit.recipe", "Variant": "lowbit.recipe",
    "CalibConfig": "lowbit.algorithms.sequential", "GPTQConfig": "lowbit.algorithms.sequential",
    "FinetuneConfig": "lowbit.algorithms.finetune",
    "SamplingParams": "lowbit.serve.generate",
    "LowbitError": "lowbit.errors",
    "resolve": "lowbit.io.loader", "is_quantized_dir": "lowbit.io.checkpoint",
    "LowbitConfig": "lowbit.io.hf_quantizer",
    "get_format": "lowbit.formats",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
_install_hf_quantizer()  # AutoModelForCausalLM.from_pretrained loads lowbit checkpoints; imports no transformers here


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
