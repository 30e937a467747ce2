"""GPTQ / AWQ / compressed-tensors checkpoints -> GGUF (io/hf_import.py, `lowbit export-gguf CHECKPOINT`).

What is checked:
* checkpoints lowbit writes (`export-hf`): symmetric 4-/8-bit groups of 32 are copied (Q4_0 / Q8_0) and the GGUF
  dequantizes to exactly lowbit's weights; `_zp` groups of 32 are Q4_1 exactly where every -z*s is a float16;
  groups of 128 and act-order g_idx are re-quantized with --fallback, and refused, naming them, without it;
* one checkpoint written by the compressed-tensors package's own compressor, and AWQ checkpoints written with
  AutoAWQ's packing (quoted below; AutoAWQ itself does not install here), read back also through
  compressed-tensors' own AutoAWQ converter;
* stock llama.cpp loads every file, its logits within the agreement tests' tolerance of the GGUF's weights;
* a checkpoint whose quantization_config and tensors disagree is refused naming the tensor; nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sharpen_llama
from llama_cpp_runner import llama_cpp_logits, require_llama_cpp
from test_export_hf import loader_dequantize_gptq
from test_gguf_export import LLAMA_CPP_TOL

SENTENCE = "The quick brown fox jumps over the lazy dog. Low-bit quantization"


def llama(tok, hidden: int = 64, seed: int = 0):  # noqa: ANN001, ANN201 - conftest's tiny Llama at another width
    from transformers import LlamaConfig, LlamaForCausalLM


    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    if hidden == 64:
        return sharpen_llama(model)  # peaked logits: a wrong layout moves them a lot
    # conftest's factors (q/k x8, head x10) make a 256-wide model's attention so peaked that llama.cpp's 8-bit
    # activation rounding moves the logits by 0.8 (Q4_0) to 2.8 (Q8_0) for lowbit's own exports; x3 and x5 give
    # the 64-wide regime (measured: max |logit| 6.8, a Q4_K export 0.11, the Q/K permutation left out 3.9).
    return sharpen_llama(model, qk=3, head=5)


def quantized(tok, fmt: str, hidden: int = 64):  # noqa: ANN001, ANN201
    from lowbit.api import quantize
    from lowbit.recipe import Recipe

    model = llama(tok, hidden)
    quantize(model, Recipe(fmt), progress=False)
    return model


def linears(model) -> dict:  # noqa: ANN001
    from lowbit.models.quant_linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def gguf_model(tok, path: Path, hidden: int = 64):  # noqa: ANN001, ANN201
    """A float Llama holding the GGUF's tensors dequantized by gguf's reference code (Q/K rows put back)."""
    from lowbit.io.gguf_import import load_gguf_weights

    return load_gguf_weights(llama(tok, hidden, seed=1), path)


def assert_llama_cpp_agrees(tok, path: Path, model) -> None:  # noqa: ANN001
    """Stock llama.cpp on the file computes the logits of ``model`` (the GGUF's weights) within its activation
    rounding, the bound test_gguf_export.py's agreement tests use."""
    require_llama_cpp()
    ids = tok.encode(SENTENCE)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(llama_cpp_logits(path, ids) - want).max()
    print(f"{path.name}: max |logit diff| llama.cpp vs the GGUF's weights = {diff:.3f} "
          f"(max |logit| {np.abs(want).max():.2f})")
    assert np.abs(want).max() > 3  # sharp enough for the bound to mean something
    assert diff < LLAMA_CPP_TOL


def requantized(fmt: str, w: torch.Tensor) -> torch.Tensor:
    from lowbit.formats import get_format

    return get_format(fmt).dequantize(get_format(fmt).quantize(w))


def get_bits(fmt: str) -> int:
    from lowbit.formats import get_format

    return get_format(fmt).bits


def get_format_type(fmt: str) -> str:
    from lowbit.formats import get_format
    from lowbit.io.gguf_blocks import gguf_type

    return gguf_type(get_format(fmt)).name


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


def edit_config(path: Path, edit) -> None:  # noqa: ANN001
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(path: Path, edit) -> None:  # noqa: ANN001 - edit(dict of tensors) changes it in place
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def coarsen_scales(m) -> None:  # noqa: ANN001 - a QuantLinear of a _zp format
    """Round the stored scales to 4 significant bits: z*s (z < 16) is then a float16 number, so Q4_1 is exact."""
    s = m.scale.float()
    step = torch.exp2(torch.floor(torch.log2(s.abs().clamp_min(2.0**-14))) - 3)
    m.scale.copy_((torch.round(s / step) * step).half())


# --------------------------------------------------------------------------------------- exact copies
@pytest.mark.parametrize("to,fmt,qtype", [("gptq", "q4_0", "Q4_0"), ("compressed-tensors", "q4_0", "Q4_0"),
                                          ("gptq", "int8_g32_sym", "Q8_0"),
                                          ("compressed-tensors", "int8_g32_sym", "Q8_0")])
def test_symmetric_groups_of_32_are_copied_exactly(tmp_path, tiny_tokenizer, to, fmt, qtype):
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    model = quantized(tiny_tokenizer, fmt)
    export_hf(model, tiny_tokenizer, tmp_path / "ckpt", to)
    report = convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")  # no fallback needed
    assert report.imported_from == to and report.type_counts() == {qtype: 14, "F16": 2, "F32": 5}
    lines = report.summary().splitlines()
    assert sum(f"copied ({to} {get_bits(fmt)}-bit g32 sym -> {qtype})" in line for line in lines) == 14
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf")
    for name, m in linears(model).items():
        assert torch.equal(back.get_submodule(name).weight, m.dequantize()), name  # bit for bit
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)  # float16 values, as stored
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


def zp_model_with_exact_mlp(tok):  # noqa: ANN001, ANN201
    """An int4_g32_zp model whose MLP linears have scales coarse enough for Q4_1 to hold -z*s exactly; (model, the
    names of those linears)."""
    model = quantized(tok, "int4_g32_zp")
    exact = {n for n in linears(model) if ".mlp." in n}
    for name in exact:
        coarsen_scales(model.get_submodule(name))
    return model, exact


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_zero_point_groups_of_32_are_q4_1_where_exact(tmp_path, tiny_tokenizer, to):
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    model, exact = zp_model_with_exact_mlp(tiny_tokenizer)
    export_hf(model, tiny_tokenizer, tmp_path / "ckpt", to)
    with pytest.raises(LowbitError) as e:
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    msg = str(e.value)
    assert "8 of 14 quantized linears" in msg and "-z*s is not a float16 number" in msg and "--fallback" in msg
    assert all((n in msg) != (n in exact) for n in linears(model)), msg  # exactly the others are listed
    assert not leftovers(tmp_path, "m.gguf")

    report = convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="q8_0")
    assert report.type_counts() == {"Q4_1": 6, "Q8_0": 8, "F16": 2, "F32": 5}
    assert {t.qtype for t in report.tensors if t.source != "float" and not t.note} == {"Q4_1"}
    assert "re-quantized from" in report.summary() and f"{to} 4-bit g32 asym to Q8_0" in report.summary()
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf")
    for name, m in linears(model).items():
        want = m.dequantize() if name in exact else requantized("q8_0", m.dequantize())
        assert torch.equal(back.get_submodule(name).weight, want), name
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


def test_ggml_copy_rules():
    """The exact-copy rules on hand-made integer linears: each accepted copy dequantizes (gguf's reference code)
    to the checkpoint's weights; the refusals say why."""
    from lowbit.io.hf_import import ggml_copy
    from lowbit.io.hf_quant import IntLinear

    g = torch.Generator().manual_seed(0)
    codes4 = torch.randint(0, 16, (4, 64), generator=g)
    scale = (torch.rand(4, 2, generator=g) + 0.5).half()

    def qtype(il: IntLinear) -> str:
        qt, why = ggml_copy(il)
        return get_format_type(qt.format) if qt is not None else why

    sym = IntLinear(codes4, scale, torch.full((4, 2), 8), 4, 32)
    assert qtype(sym) == "Q4_0"
    in_range = IntLinear(codes4.clamp(3, 12), scale, torch.full((4, 2), 5), 4, 32)  # q - z in [-2, 7]
    assert qtype(in_range) == "Q4_0"
    z = torch.randint(1, 16, (4, 2), generator=g)
    z[0, 0] = 0  # an all-positive group (q - z in [0, 15]): only Q4_1 holds it
    assert qtype(IntLinear(codes4, scale, z, 4, 32)).startswith("-z*s is not a float16 number")
    pow2 = torch.tensor([[2.0**-6, 2.0**-5]] * 4).half()  # -z*s exact for every z
    assert qtype(IntLinear(codes4, pow2, z, 4, 32)) == "Q4_1"
    assert qtype(IntLinear(codes4, pow2, torch.full((4, 2), 16), 4, 32)) == "Q4_1"  # GPTQ v1's wrapped 2^b
    codes8 = torch.randint(0, 256, (4, 64), generator=g)
    assert qtype(IntLinear(codes8, scale, torch.full((4, 2), 128), 8, 32)) == "Q8_0"
    assert "int8" in qtype(IntLinear(codes8, scale, torch.full((4, 2), 3), 8, 32))
    codes5 = torch.randint(0, 32, (4, 64), generator=g)
    assert qtype(IntLinear(codes5, scale, torch.full((4, 2), 16), 5, 32)) == "Q5_0"
    assert qtype(IntLinear(codes5, pow2, z, 5, 32)) == "Q5_1"
    assert qtype(IntLinear(codes4 % 8, scale, torch.full((4, 2), 4), 3, 32)).startswith("3-bit codes")
    assert qtype(IntLinear(codes4, scale[:, :1], torch.full((4, 1), 8), 4, 64)).startswith("groups of 64")
    assert qtype(IntLinear(codes4, scale[:, :1], torch.full((4, 1), 8), 4, None)).startswith("one scale per row")
    g_idx = torch.randperm(64, generator=g) // 32
    assert qtype(IntLinear(codes4, scale, torch.full((4, 2), 8), 4, 32, g_idx)).startswith("act-order")
    f32 = scale.float() + 1e-4
    assert qtype(IntLinear(codes4, f32, torch.full((4, 2), 8), 4, 32)).startswith("float32 scales")
    assert qtype(IntLinear(codes4, scale.bfloat16(), torch.full((4, 2), 8), 4, 32)) == "Q4_0"  # bf16 fits fp16


# ------------------------------------------------------------------------------------------- re-quantized
def test_groups_of_128_need_a_fallback_and_are_requantized(tmp_path, tiny_tokenizer):
    """The common GPTQ scheme (4-bit, groups of 128) has no ggml type: without --fallback the error lists the
    linears and nothing is written; with q4_k each is re-quantized from its exact dequantized weight."""
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    model = quantized(tiny_tokenizer, "int4_g128_sym", hidden=256)  # rows of 256 and 512: whole k-quant blocks
    export_hf(model, tiny_tokenizer, tmp_path / "ckpt", "gptq")
    with pytest.raises(LowbitError, match=r"14 of 14 quantized linears .*model\.layers\.0\.mlp\.down_proj, .* and 4 "
                                          r"more \(gptq 4-bit g128 sym: groups of 128"):
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not leftovers(tmp_path, "m.gguf")

    report = convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="q4_k")
    assert report.type_counts() == {"Q4_K": 14, "F16": 2, "F32": 5}
    assert len(report.fallbacks) == 14 and all(t.source == "gptq 4-bit g128 sym" for t in report.fallbacks)
    assert report.summary().count("re-quantized from gptq 4-bit g128 sym to Q4_K (groups of 128") == 14
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf", hidden=256)
    for name, m in linears(model).items():
        assert torch.equal(back.get_submodule(name).weight, requantized("q4_k", m.dequantize())), name
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


def test_k_quant_fallback_takes_llama_cpps_narrow_row_type(tmp_path, tiny_tokenizer):
    """Rows of 64 and 128 weights are not whole Q4_K superblocks (256): Q5_0, as llama.cpp's quantizer does."""
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    model = quantized(tiny_tokenizer, "int4_g64_sym")
    export_hf(model, tiny_tokenizer, tmp_path / "ckpt", "compressed-tensors")
    report = convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="q4_k")
    assert report.type_counts() == {"Q5_0": 14, "F16": 2, "F32": 5}
    assert all(t.note.endswith("q4_k rows need multiples of 256 weights, so Q5_0 as llama.cpp does")
               for t in report.fallbacks)
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf")
    for name, m in linears(model).items():
        assert torch.equal(back.get_submodule(name).weight, requantized("int5_g32_sym", m.dequantize())), name


def test_act_order_g_idx_is_dequantized_and_requantized(tmp_path, tiny_tokenizer):
    """A GPTQ act-order checkpoint (desc_act, no static groups) stores each column's group in a permuted g_idx:
    g_idx[i] = perm⁻¹[i] // group_size. The weights are read with it (checked against the loaders' dequantizer
    quoted in test_export_hf.py) and re-quantized, since ggml blocks are consecutive columns."""
    from lowbit.io.hf_export import export_hf
    from lowbit.io.hf_quant import read_hf_quantized
    from lowbit.jobs import convert_gguf

    model = quantized(tiny_tokenizer, "q4_0")
    export_hf(model, tiny_tokenizer, tmp_path / "ckpt", "gptq")
    permuted = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]

    def permute(t: dict) -> None:
        for name in permuted:
            n = t[f"{name}.g_idx"].numel()
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
            t[f"{name}.g_idx"] = (torch.argsort(perm) // 32).to(torch.int32)
    rewrite_tensors(tmp_path / "ckpt", permute)
    edit_config(tmp_path / "ckpt", lambda qc: qc.update(desc_act=True, static_groups=False))

    from safetensors.torch import load_file

    raw = load_file(tmp_path / "ckpt" / "model.safetensors")
    want = {name: loader_dequantize_gptq({k: raw[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
                                         4) for name in linears(model)}
    read = read_hf_quantized(tmp_path / "ckpt")
    for name in linears(model):
        assert (read.linears[name].g_idx is not None) == (name in permuted)
        assert torch.equal(read.linears[name].dequantize(), want[name]), name
    assert not torch.equal(want[permuted[0]], model.get_submodule(permuted[0]).dequantize())  # the groups moved

    report = convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="q8_0")
    assert report.type_counts() == {"Q4_0": 12, "Q8_0": 2, "F16": 2, "F32": 5}
    assert {t.source for t in report.fallbacks} == {"gptq 4-bit g32 act-order sym"}
    assert all(t.note.startswith("act-order groups") for t in report.fallbacks)
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf")
    for name in linears(model):
        expect = requantized("q8_0", want[name]) if name in permuted else want[name]
        assert torch.equal(back.get_submodule(name).weight, expect), name
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


# --------------------------------------------------------------------- written by compressed-tensors itself
def compressed_tensors_checkpoint(tok, out: Path, group: int, hidden: int) -> None:  # noqa: ANN001
    """A tiny float16 Llama compressed by the compressed-tensors package alone: its scheme (W4A16-style, symmetric
    int4 groups), its own min-max scales (compute_dynamic_scales_and_zp), its ModelCompressor and config writer, as
    llm-compressor's save path does (ModelCompressor's docstring: from_pretrained_model, compress_model,
    save_pretrained, update_config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    model = llama(tok, hidden).half()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            scale, zero = compute_dynamic_scales_and_zp(module.weight, module.quantization_scheme.weights, module)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    tok.save_pretrained(out)


def dequantized_by_transformers(path: Path):  # noqa: ANN201
    """transformers + compressed-tensors' own decompression (in float16: one rounding of (q - z) * s)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize("group,hidden", [(32, 64), (128, 256)])
def test_checkpoint_written_by_compressed_tensors_itself(tmp_path, tiny_tokenizer, group, hidden):
    pytest.importorskip("compressed_tensors")
    from lowbit.io.hf_quant import read_hf_quantized
    from lowbit.jobs import convert_gguf
    from lowbit.models.walker import decoder_linears

    ckpt = tmp_path / "ct"
    compressed_tensors_checkpoint(tiny_tokenizer, ckpt, group, hidden)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (qc["format"], qc["config_groups"]["group_0"]["weights"]["group_size"]) == ("pack-quantized", group)
    report = convert_gguf(ckpt, tmp_path / "m.gguf", fallback=None if group == 32 else "q4_k")
    assert report.type_counts() == {"Q4_0" if group == 32 else "Q4_K": 14, "F16": 2, "F32": 5}
    assert len(report.fallbacks) == (0 if group == 32 else 14)

    theirs = dequantized_by_transformers(ckpt)
    ours = read_hf_quantized(ckpt).linears
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf", hidden)
    for name, module in decoder_linears(theirs).items():
        exact = ours[name].dequantize()  # (q - z) * s in float32
        assert torch.equal(exact.half(), module.weight), name  # their float16 decompression: the same, rounded once
        want = exact if group == 32 else requantized("q4_k", exact)
        assert torch.equal(back.get_submodule(name).weight, want), name
    assert torch.equal(back.model.embed_tokens.weight, theirs.model.embed_tokens.weight.float())
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


# -------------------------------------------------------------------------------------------------------- AWQ
def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing, transliterated from WQLinear_GEMM.from_linear (casper-hansen/AutoAWQ,
    awq/modules/linear/gemm.py; AutoAWQ does not install here), for 4 bits; ``intweight`` is [in, out] codes
    (``qweight``) or [in / group, out] zero points (``qzeros``, packed by the same loop):

        intweight = intweight.t().contiguous()
        intweight = intweight.to(dtype=torch.int32)
        qweight = torch.zeros(
            (intweight.shape[0], intweight.shape[1] // 32 * awq_linear.w_bit),
            dtype=torch.int32,
            device=intweight.device,
        )

        for col in range(intweight.shape[1] // pack_num):
            if awq_linear.w_bit == 4:
                order_map = [0, 2, 4, 6, 1, 3, 5, 7]
            else:
                raise NotImplementedError("Only 4-bit are supported for now.")
            for i in range(pack_num):
                qweight_col = intweight[:, col * pack_num + order_map[i]]
                qweight[:, col] |= qweight_col << (i * awq_linear.w_bit)

    with ``scales`` stored as [in / group, out] float16 and ``w = (q - z) * s`` (awq/utils/packing_utils.py,
    dequantize_gemm: ``iweight = (iweight - izeros) * scales`` after repeat_interleave(group_size, dim=0))."""
    w_bit = 4
    pack_num = 32 // w_bit
    intweight = intweight.to(dtype=torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        for i in range(pack_num):
            qweight_col = intweight[:, col * pack_num + order_map[i]]
            qweight[:, col] |= qweight_col << (i * w_bit)
    return qweight


# config.json's quantization_config as transformers' AwqConfig.to_dict writes it (version, not format), and as
# AutoAWQ's own quant_config (w_bit / q_group_size, "GEMM"), the keys vLLM's AWQConfig.from_config reads:
#     weight_bits = cls.get_from_keys(config, ["w_bit", "bits"])
#     group_size = cls.get_from_keys(config, ["q_group_size", "group_size"])
#     zero_point = cls.get_from_keys(config, ["zero_point"])
AWQ_CONFIGS = {"transformers": lambda g: {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None},
               "autoawq": lambda g: {"quant_method": "awq", "w_bit": 4, "q_group_size": g, "zero_point": True,
                                     "version": "GEMM"}}


def awq_checkpoint(tok, model, out: Path, style: str = "transformers") -> None:  # noqa: ANN001
    """``model`` (4-bit, integer zero points) as an AutoAWQ GEMM checkpoint: lowbit's GPTQ export for the float
    tensors, config and tokenizer, its packed tensors replaced by AutoAWQ's."""
    from lowbit.io.hf_export import export_hf
    from lowbit.io.hf_quant import from_lowbit

    export_hf(model, tok, out, "gptq")
    (out / "quantize_config.json").unlink()
    group = None

    def to_awq(t: dict) -> None:
        nonlocal group
        for name, m in linears(model).items():
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                del t[f"{name}.{k}"]
            il = from_lowbit(m.quantized())
            group = il.group_size
            t[f"{name}.qweight"] = autoawq_pack(il.codes.t().contiguous())  # [in, out / 8]
            t[f"{name}.qzeros"] = autoawq_pack(il.zero.t().contiguous())  # [G, out / 8]
            t[f"{name}.scales"] = il.scale.t().contiguous().half()  # [G, out]
    rewrite_tensors(out, to_awq)
    edit_config(out, lambda qc: (qc.clear(), qc.update(AWQ_CONFIGS[style](group))))


@pytest.mark.parametrize("style", sorted(AWQ_CONFIGS))
def test_awq_checkpoint_is_read_and_converted(tmp_path, tiny_tokenizer, style):
    from lowbit.io.hf_quant import ct_linear, from_lowbit, read_hf_quantized
    from lowbit.jobs import convert_gguf

    model, exact = zp_model_with_exact_mlp(tiny_tokenizer)
    awq_checkpoint(tiny_tokenizer, model, tmp_path / "awq", style)

    read = read_hf_quantized(tmp_path / "awq")
    assert read.method == "awq" and set(read.linears) == set(linears(model))
    for name, m in linears(model).items():
        want, got = from_lowbit(m.quantized()), read.linears[name]
        assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("codes", "zero", "scale")), name
        assert (got.bits, got.group_size, got.g_idx) == (4, 32, None)
    # compressed-tensors' own AutoAWQ converter unpacks the same file into its layout: the same integers
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters")
    from safetensors.torch import load_file

    theirs = converters.AutoAWQConverter(bits=4, group_size=32, zero_point=True).process(
        load_file(tmp_path / "awq" / "model.safetensors"))
    weights = {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}
    for name in linears(model):
        keys = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        ct = ct_linear({k: theirs[f"{name}.{k}"] for k in keys}, weights)
        assert all(torch.equal(getattr(ct, f), getattr(read.linears[name], f)) for f in ("codes", "zero", "scale"))

    report = convert_gguf(tmp_path / "awq", tmp_path / "m.gguf", fallback="q8_0")
    assert report.type_counts() == {"Q4_1": 6, "Q8_0": 8, "F16": 2, "F32": 5}
    assert report.summary().count("copied (awq 4-bit g32 asym -> Q4_1)") == 6
    back = gguf_model(tiny_tokenizer, tmp_path / "m.gguf")
    for name, m in linears(model).items():
        want = m.dequantize() if name in exact else requantized("q8_0", m.dequantize())
        assert torch.equal(back.get_submodule(name).weight, want), name
    assert_llama_cpp_agrees(tiny_tokenizer, tmp_path / "m.gguf", back)


# --------------------------------------------------------------------------------------------------- refusals
def _gptq_group_128(qc: dict) -> None:
    qc.update(group_size=128)


def _gptq_3_bit(qc: dict) -> None:
    qc.update(bits=3)


def _ct_group_128(qc: dict) -> None:
    qc["config_groups"]["group_0"]["weights"].update(group_size=128)


def _awq_group_128(qc: dict) -> None:
    qc.update(group_size=128)


@pytest.mark.parametrize("to,edit,match", [
    ("gptq", _gptq_group_128, r"tensor model\.layers\.0\.mlp\.down_proj\.scales is F16 \[4, 64\], but "
                              r"quantization_config \(bits 4, group_size 128\) with qweight \[16, 64\] needs"),
    ("gptq", _gptq_3_bit, r"tensor model\.layers\.0\.mlp\.down_proj\.qweight is I32 \[16, 64\], not int32 "
                          r"\[in \* 3 / 32, out\]"),
    ("compressed-tensors", _ct_group_128, r"tensor model\.layers\.0\.mlp\.down_proj\.weight_scale has 4 groups"),
    ("awq", _awq_group_128, r"tensor model\.layers\.0\.mlp\.down_proj\.scales is F16 \[4, 64\], but "
                            r"quantization_config \(AWQ GEMM 4-bit, group_size 128\) with qweight \[128, 8\]"),
])
def test_config_that_disagrees_with_tensors_is_refused(tmp_path, tiny_tokenizer, to, edit, match):
    """The quantization_config says one scheme, the tensors hold another: refused from the safetensors headers,
    naming the tensor, before any weight is read; no output file, finished or partial."""
    from lowbit.errors import BadFileError
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    if to == "awq":
        awq_checkpoint(tiny_tokenizer, quantized(tiny_tokenizer, "int4_g32_zp"), tmp_path / "ckpt")
    else:
        export_hf(quantized(tiny_tokenizer, "q4_0"), tiny_tokenizer, tmp_path / "ckpt", to)
    edit_config(tmp_path / "ckpt", edit)
    with pytest.raises(BadFileError, match=match):
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="q8_0")
    assert not leftovers(tmp_path, "m.gguf")


def test_recipes_and_unread_methods_are_refused(tmp_path, tiny_tokenizer):
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_gguf

    export_hf(quantized(tiny_tokenizer, "q4_0"), tiny_tokenizer, tmp_path / "ckpt", "gptq")
    for kwargs in ({"recipe": "q4_0"}, {"preset": "Q4_K_M"}, {"fuse_rotation_only": True}):
        with pytest.raises(LowbitError, match=r"already quantized \(gptq\): it is converted as stored"):
            convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", **kwargs)
    with pytest.raises(LowbitError, match="fallback 'int4_g128_sym' has no GGUF type"):
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", fallback="int4_g128_sym")
    edit_config(tmp_path / "ckpt", lambda qc: qc.update(quant_method="bitsandbytes"))
    with pytest.raises(LowbitError, match="a bitsandbytes checkpoint; lowbit converts gptq, awq, compressed-tensors"):
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    edit_config(tmp_path / "ckpt", lambda qc: qc.update(quant_method="awq", version="gemv", group_size=32))
    with pytest.raises(LowbitError, match="AWQ version 'gemv' is not read"):
        convert_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not leftovers(tmp_path, "m.gguf")


def test_cli_export_gguf_from_a_gptq_checkpoint(tmp_path, tiny_tokenizer, capsys):
    from lowbit.cli import main
    from lowbit.io.hf_export import export_hf

    export_hf(quantized(tiny_tokenizer, "int4_g128_sym", hidden=256), tiny_tokenizer, tmp_path / "ckpt", "gptq")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")
    assert main(["export-gguf", ckpt, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "need a fallback" in err and "model.layers.0.self_attn.q_proj" in err and "nothing was written" in err
    assert main(["export-gguf", ckpt, "--out", out, "--format", "q4_0"]) == 2
    assert "already quantized (gptq): drop --format" in capsys.readouterr().err
    assert not leftovers(tmp_path, "m.gguf")
    assert main(["export-gguf", ckpt, "--out", out, "--fallback", "q4_k"]) == 0
    printed = capsys.readouterr().out
    assert "14 x Q4_K" in printed and "blk.0.attn_q.weight: re-quantized from gptq 4-bit g128 sym to Q4_K" in printed
