"""llama.cpp's quantization presets (``llama-quantize ... Q4_K_M``) as lowbit GGUF type plans.

A port of llama.cpp's per-tensor type choice (src/llama-quant.cpp: ``llama_ftype_get_default_type``,
``llama_tensor_get_type`` -> ``llama_tensor_get_type_impl`` then ``tensor_type_fallback``), for dense
Llama/Qwen2-layout models, no imatrix, no overrides, and only the branches the presets in :data:`PRESETS` take:
attn_v and ffn_down get more bits by layer position (``use_more_bits``), attn_output by preset, the output matrix
(and token_embd when it is tied to it) Q6_K or Q8_0, and a row that its type's blocks do not divide falls back to
a 32-weight type (or stays 16-bit). The result is the same kind of plan as ``plan_like`` (a GGUF from llama.cpp's
quantizer), so ``--preset Q4_K_M`` and ``--like model-Q4_K_M.gguf`` agree without the file.
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.gguf_types import LOWBIT_FORMAT, SEARCHED, GGUFTypePlan, gguf_arch

# preset (llama_ftype) -> its default ggml type (llama_ftype_get_default_type)
PRESETS = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K",
           "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ2_XXS": "IQ2_XXS"}
# tensor_type_fallback: the type written when ncols is not a multiple of the type's block
FALLBACK = {"IQ2_XXS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BLOCK = {"Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32}  # every other type here: 256
# HF linear (inside a decoder layer) -> llama.cpp tensor category
CATEGORY = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def preset_plan(model_or_config: nn.Module | object, preset: str, searched: bool = False) -> GGUFTypePlan:
    """The plan llama.cpp's quantizer follows for ``preset`` (e.g. ``Q4_K_M``) on this model's shapes.

    ``searched``: the searched-fit variant of uniform types (same GGUF bytes), as in ``plan_like``."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    default = _default_type(preset)
    gguf_arch(config)  # an architecture GGUF export supports, else one UnsupportedModelError line
    plan = {}
    for name, (category, layer, ncols) in _linears(config).items():
        qtype = _fallback(_linear_type(config, preset, default, category, layer), ncols)
        if qtype is not None:
            fmt = LOWBIT_FORMAT[qtype]
            plan[name] = SEARCHED.get(fmt, fmt) if searched else fmt
    hidden = config.hidden_size
    output = _fallback(_output_type(preset, default, hidden), hidden)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed = output if tied else _fallback(_embed_type(preset, default), hidden)
    return GGUFTypePlan(plan, _lowbit(embed), preset, output_type=_lowbit(output))


def check_preset(preset: str) -> None:
    """One LowbitError line naming the known presets, unless ``preset`` is one."""
    _default_type(preset)


def _default_type(preset: str) -> str:
    if preset not in PRESETS:
        raise LowbitError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def _lowbit(qtype: str | None) -> str:
    return "f16" if qtype is None else LOWBIT_FORMAT[qtype]


def _linears(config: object) -> dict[str, tuple[str, int, int]]:
    """HF module name -> (llama.cpp category, layer, ncols = in_features) for every decoder linear."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    ncols = {"self_attn.o_proj": heads * head_dim, "mlp.down_proj": config.intermediate_size}
    return {f"model.layers.{i}.{sub}": (cat, i, ncols.get(sub, config.hidden_size))
            for i in range(config.num_hidden_layers) for sub, cat in CATEGORY.items()}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama_tensor_get_type_impl's use_more_bits: the first and last eighth and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _n_gqa(config: object) -> int:
    heads = config.num_attention_heads
    return heads // (getattr(config, "num_key_value_heads", None) or heads)


def _linear_type(config: object, preset: str, default: str, category: str, layer: int) -> str:
    if preset == "IQ2_XXS":
        return _iq2_type(config, default, category, layer)
    if category == "attn_v":
        return _attn_v_type(config, preset, default, layer)
    if category == "ffn_down":
        return _ffn_down_type(preset, default, layer, config.num_hidden_layers)
    if category == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(preset, default)
    return default


def _iq2_type(config: object, default: str, category: str, layer: int) -> str:
    if category == "attn_v":
        return "Q4_K" if _n_gqa(config) >= 4 else "Q2_K"
    if category == "ffn_down" and layer < config.num_hidden_layers // 8:
        return "Q2_K"
    return default


def _attn_v_type(config: object, preset: str, default: str, layer: int) -> str:
    n_layers = config.num_hidden_layers
    qtype = default
    if preset == "Q2_K":
        qtype = "Q4_K" if _n_gqa(config) >= 4 else "Q3_K"
    elif preset == "Q3_K_M":
        qtype = "Q5_K" if layer < 2 else "Q4_K"
    elif preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        qtype = "Q6_K"
    if n_layers == 80 and _n_gqa(config) > 1 and qtype in ("Q3_K", "Q4_K"):  # LLM_TYPE_70B
        qtype = "Q5_K"
    return qtype


def _ffn_down_type(preset: str, default: str, layer: int, n_layers: int) -> str:
    if preset == "Q2_K":
        return "Q3_K"
    if preset == "Q3_K_M":
        return "Q5_K" if layer < n_layers // 16 else "Q4_K"  # not Falcon: always at least Q4_K
    if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
        return "Q6_K"
    return default


def _output_type(preset: str, default: str, ncols: int) -> str:
    """output.weight (and token_embd when tied): Q8_0 if the default type's blocks do not divide its rows."""
    if ncols % BLOCK.get(default, 256):
        return "Q8_0"
    if preset == "IQ2_XXS":
        return "Q5_K"
    return "Q6_K"


def _embed_type(preset: str, default: str) -> str:
    return "Q2_K" if preset == "IQ2_XXS" else default


def _fallback(qtype: str, ncols: int) -> str | None:
    """tensor_type_fallback: ``qtype``, or its 32-weight fallback, or None (16-bit) for rows neither divides."""
    if ncols % BLOCK.get(qtype, 256) == 0:
        return qtype
    other = FALLBACK.get(qtype)
    return other if other is not None and ncols % BLOCK[other] == 0 else None
