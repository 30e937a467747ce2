"""GPTQ and compressed-tensors export (io/hf_quant.py, io/hf_export.py, `lowbit export-hf`).

What is checked:
* transformers' ``from_pretrained`` loads each compressed-tensors export (the compressed-tensors package from PyPI,
  the `test` extra) and its logits and weights are lowbit's; GPTQ exports load through GPTQModel's CPU path when
  it is installed (not in CI, see docs/serving.md) and are otherwise checked by an independent dequantizer written
  from the loaders' source, quoted below;
* the tensor names, shapes and dtypes vLLM's loaders create (quoted below) are the ones written;
* writer -> reader gives back identical codes, scales and zero points, and the same lowbit tensors;
* refusals name the linear, the format and why, and leave nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from conftest import make_model, sharpen_llama

SENTENCE = "The quick brown fox jumps over the lazy dog. Low-bit quantization"


def quantized(tok, fmt, arch: str = "llama", seed: int = 0):  # noqa: ANN001, ANN201 - a tokenizer; returns a model
    """A tiny random model (sharpened, so a wrong layout moves the logits a lot) quantized by RTN into ``fmt``
    (a format name or a plan)."""
    from lowbit.api import quantize
    from lowbit.recipe import Recipe

    model = sharpen_llama(make_model(arch, vocab=len(tok), seed=seed))
    quantize(model, Recipe(fmt), progress=False)
    return model


def logits(model, tok) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(torch.tensor([tok.encode(SENTENCE)])).logits[0].float()


def load_hf(path: Path, dequantize: bool = False, gptq_bits: int | None = None):  # noqa: ANN201
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, GPTQConfig

    kw = {}
    if dequantize:
        # Asymmetric pack-quantized files load only with dequantize=True in transformers 5.24 + compressed-tensors
        # 0.20: the compressed module layout is built with an unpacked zero point (vllm-project/llm-compressor#1618).
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    if gptq_bits:
        # GPTQModel's plain torch kernel (the default CPU one, TorchAten, computes in bfloat16: lowbit's own model
        # moves SmolLM2's logits by 2.2 in bfloat16, by 0.24 in float16)
        kw["quantization_config"] = GPTQConfig(bits=gptq_bits, backend="torch")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")  # we only set loading
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def linears(model) -> dict:  # noqa: ANN001
    from lowbit.models.quant_linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# ------------------------------------------------------------------------------------------ the zero-point format
@pytest.mark.parametrize("name", ["int4_g32_zp", "int3_g64_zp_mse", "int2_ch_zp", "int8_g32_zp"])
def test_zero_point_format_fits_exact_grid(name):
    from lowbit.formats import get_format

    fmt = get_format(name)
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[0] = w[0].abs() + 0.1  # no negative weight: GPTQ's fit would give z = 0, which v1 files cannot hold
    w[1] = 0.0
    qt = fmt.quantize(w)
    codes, params = fmt.unpack(qt)
    assert qt.bits_per_weight == fmt.bits_per_weight((16, 128))  # zero points counted, b bits each
    assert params["zero"].min() >= 1 and params["zero"].max() <= (1 << fmt.bits) - 1
    back = fmt.dequantize(qt)
    assert torch.equal(back[1], torch.zeros(128))
    step = fmt.expand(params, 128)["scale"].float()
    assert ((back - w).abs() <= step * (0.5 if "mse" not in name else 4) + 1e-6).all()
    assert torch.equal(fmt.dequantize(fmt.quantize(back)), back)  # grid points are fixed points


# ------------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [64, 96, 70])
def test_pack_int32_is_compressed_tensors_packing(bits, n):
    ct = pytest.importorskip("compressed_tensors.compressors")
    from lowbit.io.hf_quant import pack_int32, unpack_int32

    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, n))
    ours = pack_int32(codes, bits)
    # compressed-tensors packs signed values, adding 2^(b-1) first (pack_to_int32: "value + offset")
    theirs = ct.pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)
    if 32 % bits == 0 or math.ceil(n * bits / 32) == theirs.shape[1]:  # dense packing (compressed-tensors >= 0.20)
        assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, n), codes)


def _autogptq_pack_3bit(intweight: torch.Tensor) -> torch.Tensor:
    """GPTQModel's pack_original for 3 bits (nn_modules/qlinear/__init__.py), verbatim but for numpy -> torch:

        for j in range(i, i + 10):
            qweight[row] |= int_weight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= int_weight[i] << 30
        row += 1
        qweight[row] |= (int_weight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= int_weight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= int_weight[i] << 31
        row += 1
        qweight[row] |= (int_weight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= int_weight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    """
    q = torch.zeros(intweight.shape[0] // 32 * 3, intweight.shape[1], dtype=torch.int64)
    i = row = 0
    while row < q.shape[0]:
        for j in range(i, i + 10):
            q[row] |= intweight[j] << (3 * (j - i))
        i += 10
        q[row] |= intweight[i] << 30
        row += 1
        q[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            q[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        q[row] |= intweight[i] << 31
        row += 1
        q[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            q[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return (q & 0xFFFFFFFF).to(torch.int64)


def test_pack_int32_is_autogptq_3bit_layout():
    from lowbit.io.hf_quant import pack_int32

    torch.manual_seed(3)
    intweight = torch.randint(0, 8, (64, 6))  # [in, out], packed along in as GPTQ's qweight
    ours = pack_int32(intweight.t().contiguous(), 3).t().to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(ours, _autogptq_pack_3bit(intweight))


# ------------------------------------------------------------------------- GPTQ: an independent dequantizer
# vLLM's GPTQ reference path (quantization/gptq.py, torch fallback) and GPTQModel's
# BaseQuantLinear.dequantize_weight unpack with these shifts:
#     self.wf = torch.tensor(list(range(0, 32, self.quant_config.weight_bits)), dtype=torch.int32).unsqueeze(0)
#     elif self.quant_config.weight_bits == 3:
#         self.wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
#                                 [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
#                                 [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
# then
#     zeros = zeros + 1
#     weights = (weights["scales"][weights["g_idx"].long()] * (weight - zeros[weights["g_idx"].long()]))
WF3 = [[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
       [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
       [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]]


def _unpack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, cols] packed along rows -> codes [rows * 32 / bits, cols], as the loaders above do it."""
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        w = (q.unsqueeze(1).expand(-1, 32 // bits, -1) >> wf.view(1, -1, 1)) & ((1 << bits) - 1)
        return w.reshape(-1, q.shape[1])
    w = q.reshape(q.shape[0] // 3, 3, 1, q.shape[1]).expand(-1, -1, 12, -1)
    w = (w >> torch.tensor(WF3, dtype=torch.int32).reshape(1, 3, 12).unsqueeze(-1)) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 0x7
    return torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1).reshape(-1, q.shape[1])


def loader_dequantize_gptq(t: dict, bits: int) -> torch.Tensor:
    weight = _unpack_rows(t["qweight"], bits)  # [in, out]
    zeros = _unpack_rows(t["qzeros"].t().contiguous(), bits).t() + 1  # v1: the file holds z - 1
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (weight - zeros[g]).float()).t()  # [out, in]


@pytest.mark.parametrize("fmt", ["q4_0", "int4_g32_zp", "int3_g32_sym", "int3_g64_zp", "int2_ch_zp",
                                 "int2_g32_sym", "int8_g32_sym", "int8_ch_zp"])
def test_gptq_export_dequantizes_to_lowbit_weights(tmp_path, tiny_tokenizer, fmt):
    from safetensors.torch import load_file

    from lowbit.io.hf_export import export_hf

    model = quantized(tiny_tokenizer, fmt, arch="qwen2" if "zp" in fmt else "llama")
    export_hf(model, tiny_tokenizer, tmp_path / "out", "gptq")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name, m in linears(model).items():
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(loader_dequantize_gptq(t, config["bits"]), m.dequantize()), name  # exact, no rounding
        if m.bias is not None:
            assert torch.equal(tensors[f"{name}.bias"], m.bias.half())
    assert config["sym"] == fmt.endswith(("_sym", "q4_0"))


# --------------------------------------------------------------------------- layouts pinned to vLLM's loaders
def test_gptq_layout_is_what_vllm_creates(tmp_path, tiny_tokenizer):
    """vllm/model_executor/layers/quantization/gptq.py, GPTQLinearMethod.create_weights:

        self.pack_factor = Fraction(32, self.weight_bits)
        scale_and_zero_size = input_size // group_size
        qweight = PackedvLLMParameter(data=torch.empty(input_size_per_partition // self.quant_config.pack_factor,
                                      output_size_per_partition, dtype=torch.int32), ...
        g_idx = RowvLLMParameter(data=torch.tensor([i // self.quant_config.group_size
                                                    for i in range(input_size_per_partition)], dtype=torch.int32)
        qzeros_args = {"data": torch.empty(scale_and_zero_size,
                                           output_size_per_partition // self.quant_config.pack_factor,
                                           dtype=torch.int32)
        weight_scale_args = {"data": torch.empty(scale_and_zero_size, output_size_per_partition,
                                                 dtype=params_dtype)
        layer.register_parameter("qweight", qweight) ... ("g_idx", g_idx) ... ("qzeros", qzeros) ... ("scales", scales)

    and GPTQConfig.from_config reads "bits", "group_size", "desc_act" (and optionally "lm_head")."""
    from safetensors.torch import load_file

    from lowbit.io.hf_export import export_hf

    for fmt in ("q4_0", "int3_g32_sym"):
        model = quantized(tiny_tokenizer, fmt)
        out = tmp_path / fmt
        export_hf(model, tiny_tokenizer, out, "gptq")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc == json.loads((out / "quantize_config.json").read_text())
        assert {"bits", "group_size", "desc_act", "lm_head"} <= set(qc) and qc["quant_method"] == "gptq"
        assert qc["checkpoint_format"] == "gptq" and qc["lm_head"] is False
        pack, group = Fraction(32, qc["bits"]), qc["group_size"]
        tensors = load_file(out / "model.safetensors")
        for name, m in linears(model).items():
            k, n = m.in_features, m.out_features
            want = {"qweight": ((int(k // pack), n), torch.int32), "g_idx": ((k,), torch.int32),
                    "qzeros": ((k // group, int(n // pack)), torch.int32), "scales": ((k // group, n), torch.float16)}
            for key, (shape, dtype) in want.items():
                t = tensors[f"{name}.{key}"]
                assert (tuple(t.shape), t.dtype) == (shape, dtype), f"{name}.{key}"
            g_idx = torch.tensor([i // group for i in range(k)], dtype=torch.int32)
            assert torch.equal(tensors[f"{name}.g_idx"], g_idx)
            assert f"{name}.weight" not in tensors


def test_compressed_tensors_layout_is_what_vllm_creates(tmp_path, tiny_tokenizer):
    """vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py,
    CompressedTensorsWNA16.create_weights:

        scales_and_zp_size = input_size // group_size
        packed_input_dim = math.ceil(input_size_per_partition * self.num_bits / 32)
        weight = PackedvLLMParameter(..., data=torch.empty(output_size_per_partition, packed_input_dim,
                                                           dtype=torch.int32))
        "data": torch.empty(output_size_per_partition, scales_and_zp_size, dtype=params_dtype)   # weight_scale
        packed_output_dim = math.ceil(output_size_per_partition * self.num_bits / 32)
        "data": torch.zeros(packed_output_dim, scales_and_zp_size, dtype=torch.int32)            # weight_zero_point
        weight_shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", weight) ... ("weight_scale", ...) ... ("weight_shape", ...)
        if not self.symmetric:
            layer.register_parameter("weight_zero_point", qzeros)

    with WNA16_ZP_SUPPORTED_TYPES_MAP = {4: scalar_types.uint4, 8: scalar_types.uint8} for asymmetric schemes."""
    from safetensors.torch import load_file

    from lowbit.io.hf_export import export_hf

    for fmt, sym in (("q4_0", True), ("int4_g32_zp", False), ("int8_ch_sym", True)):
        model = quantized(tiny_tokenizer, fmt)
        out = tmp_path / fmt
        export_hf(model, tiny_tokenizer, out, "compressed-tensors")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
        (group,) = qc["config_groups"].values()
        w = group["weights"]
        assert group["targets"] == ["Linear"] and w["type"] == "int" and w["symmetric"] is sym
        tensors = load_file(out / "model.safetensors")
        for name, m in linears(model).items():
            k, n, b = m.in_features, m.out_features, w["num_bits"]
            g = k // (w["group_size"] or k)  # channel: one group
            want = {"weight_packed": ((n, math.ceil(k * b / 32)), torch.int32),
                    "weight_scale": ((n, g), torch.float16), "weight_shape": ((2,), torch.int64)}
            if not sym:
                want["weight_zero_point"] = ((math.ceil(n * b / 32), g), torch.int32)
            assert {key for key in tensors if key.startswith(f"{name}.")} == {f"{name}.{key}" for key in want}
            for key, (shape, dtype) in want.items():
                t = tensors[f"{name}.{key}"]
                assert (tuple(t.shape), t.dtype) == (shape, dtype), f"{name}.{key}"
            assert tensors[f"{name}.weight_shape"].tolist() == [n, k]


def test_compressed_tensors_tensors_are_what_its_compressor_writes(tmp_path, tiny_tokenizer):
    """The package's own writer, given lowbit's dequantized weight, scale and zero point, produces the same bytes:
    nothing is re-rounded (w / s is an exact integer for every weight on the grid)."""
    ct = pytest.importorskip("compressed_tensors.compressors")
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from lowbit.io.hf_export import export_hf
    from lowbit.io.hf_quant import from_lowbit

    for fmt in ("q4_0", "int4_g32_zp", "int8_ch_sym", "int2_g32_zp"):
        model = quantized(tiny_tokenizer, fmt)
        out = tmp_path / fmt
        export_hf(model, tiny_tokenizer, out, "compressed-tensors")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert QuantizationConfig.model_validate(qc).format == "pack-quantized"  # the package's own schema
        (group,) = qc["config_groups"].values()
        scheme = QuantizationScheme.model_validate(group)
        from safetensors.torch import load_file

        ours = load_file(out / "model.safetensors")
        for name, m in list(linears(model).items())[:3]:
            il = from_lowbit(m.quantized())
            state = {"weight": m.dequantize(), "weight_scale": il.scale.float()}
            if not group["weights"]["symmetric"]:
                state["weight_zero_point"] = (il.zero - (1 << (il.bits - 1))).to(torch.int8)  # their signed zp
            theirs = ct.PackedQuantizationCompressor.compress(state, scheme)
            for key in ("weight_packed", "weight_zero_point", "weight_shape"):
                if key in theirs:
                    assert torch.equal(ours[f"{name}.{key}"], theirs[key].to(ours[f"{name}.{key}"].dtype)), key


# ---------------------------------------------------------------------------------- transformers loads them
@pytest.mark.parametrize("arch,fmt", [("llama", "q4_0"), ("qwen2", "q4_0"), ("qwen2", "int8_ch_sym"),
                                      ("llama", "int2_g32_sym"), ("llama", "int4_g32_zp"), ("qwen2", "int4_ch_zp")])
def test_compressed_tensors_export_loads_in_transformers(tmp_path, tiny_tokenizer, arch, fmt):
    pytest.importorskip("compressed_tensors")
    from lowbit.io.hf_export import export_hf

    model = quantized(tiny_tokenizer, fmt, arch)
    export_hf(model, tiny_tokenizer, tmp_path / "out", "compressed-tensors")
    hf = load_hf(tmp_path / "out", dequantize="zp" in fmt)
    got, want = logits(hf, tiny_tokenizer), logits(model, tiny_tokenizer)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())  # fp16 tolerance
    for name, m in linears(model).items():  # the weights themselves: lowbit's, at most float16-rounded
        torch.testing.assert_close(hf.get_submodule(name).weight.float(), m.dequantize(), rtol=2**-10, atol=0)


def test_gptq_export_loads_with_gptqmodel(tmp_path, tiny_tokenizer):
    """GPTQModel's CPU kernels (transformers' GPTQ path). Not installed in CI: `pip install gptqmodel==7.6.0
    optimum` (an sdist that pins numpy 2.2.6; 7.7 needs torch >= 2.14.1), see docs/export-hf.md."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from lowbit.formats import get_format
    from lowbit.io.hf_export import export_hf

    for arch, fmt in (("llama", "q4_0"), ("qwen2", "int4_g32_zp"), ("llama", "int3_g32_sym"), ("llama", "int2_ch_zp")):
        model = quantized(tiny_tokenizer, fmt, arch)
        out = tmp_path / fmt
        export_hf(model, tiny_tokenizer, out, "gptq")
        hf = load_hf(out, gptq_bits=get_format(fmt).bits)
        got, want = logits(hf, tiny_tokenizer), logits(model, tiny_tokenizer)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())  # fp16 tolerance
        for name, m in linears(model).items():
            torch.testing.assert_close(hf.get_submodule(name).dequantize_weight().t().float(), m.dequantize(),
                                       rtol=2**-10, atol=0)  # lowbit's weights, at most float16-rounded


# ------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("to,fmt", [("gptq", "q4_0"), ("gptq", "int3_g32_zp"), ("gptq", "int2_ch_sym"),
                                    ("gptq", "int8_g64_zp"), ("compressed-tensors", "q4_0"),
                                    ("compressed-tensors", "int4_g32_zp"), ("compressed-tensors", "int2_ch_zp"),
                                    ("compressed-tensors", "int8_g32_sym")])
def test_writer_then_reader_gives_back_codes_and_scales(tmp_path, tiny_tokenizer, to, fmt):
    from lowbit.io.hf_export import export_hf
    from lowbit.io.hf_quant import from_lowbit, read_hf_quantized

    model = quantized(tiny_tokenizer, fmt, "qwen2")
    export_hf(model, tiny_tokenizer, tmp_path / "out", to)
    back = read_hf_quantized(tmp_path / "out")
    assert back.method == to and set(back.linears) == set(linears(model))
    for name, m in linears(model).items():
        want, got = from_lowbit(m.quantized()), back.linears[name]
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
        assert (got.bits, got.group_size, got.g_idx) == (want.bits, want.group_size, None)
        qt = got.to_quantized()  # the very lowbit tensor (a q4_0 linear comes back as int4_g32_sym)
        assert all(torch.equal(qt.data[k], v) for k, v in m.quantized().data.items())
        if m.bias is not None:
            assert torch.equal(back.tensors[f"{name}.bias"], m.bias.half())
    assert torch.equal(back.tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.half())


# -------------------------------------------------------------------------------------- plans and act-order
def test_mixed_plan_is_compressed_tensors_groups_and_refused_by_gptq(tmp_path, tiny_tokenizer):
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.models.walker import decoder_linears

    names = list(decoder_linears(make_model("llama", vocab=len(tiny_tokenizer))))
    # both symmetric: transformers 5.24's dequantize=True path applies one config group to every dense layer, and
    # its compressed path cannot hold asymmetric zero points (see load_hf), so a mix with _zp loads in vLLM only
    plan = {n: ("int2_g32_sym" if "mlp" in n else "q4_0") for n in names}
    plan.pop(names[0])  # stays float16
    model = quantized(tiny_tokenizer, plan)
    with pytest.raises(LowbitError) as e:
        export_hf(model, tiny_tokenizer, tmp_path / "g", "gptq")
    assert names[0] in str(e.value) and "mixed plan" in str(e.value) and not leftovers(tmp_path, "g")
    export_hf(model, tiny_tokenizer, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {(g["weights"]["num_bits"], g["weights"]["symmetric"]): g["targets"] for g in qc["config_groups"].values()}
    assert sorted(groups[(2, True)]) == sorted(n for n in plan if "mlp" in n)
    assert names[0] in qc["ignore"] and names[0] not in groups[(4, True)]
    pytest.importorskip("compressed_tensors")
    hf = load_hf(tmp_path / "ct")
    want = logits(model, tiny_tokenizer)
    torch.testing.assert_close(logits(hf, tiny_tokenizer), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_act_order_is_recorded_from_the_checkpoint(tmp_path, tiny_model_dir, text_file):
    from lowbit.algorithms.sequential import CalibConfig
    from lowbit.jobs import convert, convert_hf
    from lowbit.recipe import Recipe

    recipe = Recipe("q4_0", method="gptq_act", calib=CalibConfig(nsamples=2, seqlen=32, text_path=text_file))
    convert(tiny_model_dir, recipe, tmp_path / "ckpt", device="cpu", progress=False)
    convert_hf(tmp_path / "ckpt", tmp_path / "g", to="gptq")
    convert_hf(tmp_path / "ckpt", tmp_path / "ct", to="compressed-tensors")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["static_groups"] is True  # lowbit's act-order keeps static groups
    ct = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = ct["config_groups"].values()
    assert group["weights"]["actorder"] == "weight"  # compressed-tensors' name for static-group act-order
    # a float model + recipe in one go, as `lowbit export-hf MODEL --format`
    report = convert_hf(tiny_model_dir, tmp_path / "rtn", "rtn:int4_g32_zp", to="gptq", device="cpu", progress=False)
    assert report.schemes == {"4-bit g32 asym": 14} and not report.act_order


# --------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("fmt,why", [("e8p_ch", "vector codebook"), ("nz2_ch", "level set"),
                                     ("q4_1", "float16 minimum"), ("iq4_nl", "level set")])
def test_inexpressible_formats_are_refused_before_writing(tmp_path, tiny_tokenizer, fmt, why):
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf

    model = quantized(tiny_tokenizer, fmt)
    for to in ("gptq", "compressed-tensors"):
        with pytest.raises(LowbitError) as e:
            export_hf(model, tiny_tokenizer, tmp_path / "out", to)
        msg = str(e.value)
        assert "model.layers.0.self_attn.q_proj (and 13 more)" in msg and f"({fmt})" in msg and why in msg, msg
        assert not leftovers(tmp_path, "out")


def test_rotation_bits_and_ragged_groups_are_refused(tmp_path, tiny_tokenizer, tiny_model_dir):
    from lowbit.api import quantize
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.jobs import convert_hf
    from lowbit.recipe import Recipe

    model = sharpen_llama(make_model("llama", vocab=len(tiny_tokenizer)))
    quantize(model, Recipe("q4_0", rotate=True), progress=False)
    with pytest.raises(LowbitError, match=r"q_proj \(and 13 more\) \(q4_0\): it carries a \+rht rotation"):
        export_hf(model, tiny_tokenizer, tmp_path / "out", "gptq")
    cases = [("rtn:int3_g32_sym", "compressed-tensors", "not 3-bit"), ("rtn:int5_g32_sym", "gptq", "not 5-bit"),
             ("rtn:int4_g48_sym", "gptq", "not whole groups of 48"), ("rtn+rht:q4_0", "gptq", "+rht"),
             ("rtn:iq2_xxs", "compressed-tensors", "vector codebook")]
    for recipe, to, why in cases:  # checked before the quantization starts
        with pytest.raises(LowbitError, match=why.replace("+", r"\+")):
            convert_hf(tiny_model_dir, tmp_path / "out", recipe, to=to, device="cpu", progress=False)
    assert not leftovers(tmp_path, "out")


def test_gpt2_conv1d_is_refused(tmp_path, tiny_tokenizer):
    from lowbit.api import quantize
    from lowbit.errors import LowbitError
    from lowbit.io.hf_export import export_hf
    from lowbit.recipe import Recipe

    model = make_model("gpt2", vocab=len(tiny_tokenizer))
    quantize(model, Recipe("q4_0"), progress=False)
    with pytest.raises(LowbitError, match="Conv1D"):
        export_hf(model, tiny_tokenizer, tmp_path / "out", "compressed-tensors")
    assert not leftovers(tmp_path, "out")


def _rewrite_config(path: Path, edit) -> None:  # noqa: ANN001
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_reader_refuses_config_that_disagrees_with_tensors(tmp_path, tiny_tokenizer):
    from lowbit.errors import BadFileError
    from lowbit.io.hf_export import export_hf
    from lowbit.io.hf_quant import read_hf_quantized

    model = quantized(tiny_tokenizer, "q4_0")
    export_hf(model, tiny_tokenizer, tmp_path / "g", "gptq")
    _rewrite_config(tmp_path / "g", lambda qc: qc.update(group_size=16))
    # tensors are checked in file (name) order: the first linear is layer 0's down_proj
    with pytest.raises(BadFileError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.scales is F16 \[4, 64\]"):
        read_hf_quantized(tmp_path / "g")
    _rewrite_config(tmp_path / "g", lambda qc: qc.update(group_size=32, bits=8))
    with pytest.raises(BadFileError, match=r"down_proj\.(scales|qzeros)"):
        read_hf_quantized(tmp_path / "g")

    export_hf(quantized(tiny_tokenizer, "int4_g32_zp"), tiny_tokenizer, tmp_path / "zp", "gptq")
    _rewrite_config(tmp_path / "zp", lambda qc: qc.update(sym=True))  # vLLM's Marlin would ignore the zero points
    with pytest.raises(BadFileError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.qzeros holds zero points"):
        read_hf_quantized(tmp_path / "zp")

    export_hf(model, tiny_tokenizer, tmp_path / "ct", "compressed-tensors")
    _rewrite_config(tmp_path / "ct", lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=16))
    with pytest.raises(BadFileError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight_scale"):
        read_hf_quantized(tmp_path / "ct")
    _rewrite_config(tmp_path / "ct", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        group_size=32, symmetric=False))
    with pytest.raises(BadFileError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight_zero_point is missing"):
        read_hf_quantized(tmp_path / "ct")


def test_lowbit_checkpoint_that_disagrees_with_itself_is_refused(tmp_path, tiny_model_dir):
    from lowbit.errors import BadFileError
    from lowbit.jobs import convert, convert_hf

    convert(tiny_model_dir, "q4_0", tmp_path / "ckpt", device="cpu", progress=False)
    info = json.loads((tmp_path / "ckpt" / "lowbit.json").read_text())
    info["formats"]["model.layers.1.mlp.down_proj"] = "int4_g64_sym"  # the tensors are q4_0's
    (tmp_path / "ckpt" / "lowbit.json").write_text(json.dumps(info))
    with pytest.raises(BadFileError, match=r"model\.layers\.1\.mlp\.down_proj\.scale"):
        convert_hf(tmp_path / "ckpt", tmp_path / "out", to="gptq")
    assert not leftovers(tmp_path, "out")


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", ["export_hf", "convert_hf"])
def test_api_functions_are_exported_with_an_example(name):
    import lowbit

    assert name in lowbit.__all__ and ">>>" in (getattr(lowbit, name).__doc__ or "")


def test_cli_export_hf(tmp_path, tiny_model_dir, capsys):
    from lowbit.cli import main

    assert main(["quantize", str(tiny_model_dir), "--format", "q4_0", "--out", str(tmp_path / "ckpt"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["export-hf", str(tmp_path / "ckpt"), "--to", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert "gptq checkpoint" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= \
        {p.name for p in (tmp_path / "g").iterdir()}
    assert main(["export-hf", str(tmp_path / "ckpt"), "--to", "gptq", "--out", str(tmp_path / "g")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-hf", str(tiny_model_dir), "--to", "compressed-tensors", "--format", "q4_1",
                 "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "q4_1 cannot be exported to compressed-tensors" in err and "int4_g32_zp" in err
    assert not leftovers(tmp_path, "bad")


# ------------------------------------------------------------------------------------------- bundled model
@pytest.mark.slow
def test_bundled_model_compressed_tensors_export_matches(tmp_path):
    """SmolLM2-135M (tied embeddings, 576-wide rows) as q4_0 (groups of 32 divide every row): about 30 s on 2
    cores. The logits of transformers' model are lowbit's to float16 tolerance."""
    pytest.importorskip("compressed_tensors")
    import lowbit

    report = lowbit.convert_hf(None, tmp_path / "smol", "rtn:q4_0", to="compressed-tensors", device="cpu",
                               progress=False)
    assert report.schemes == {"4-bit g32 sym": 210}
    model, tok = lowbit.load(None, device="cpu")
    lowbit.quantize(model, "q4_0", progress=False)  # RTN is deterministic: the exported weights
    hf = load_hf(tmp_path / "smol")
    got, want = logits(hf, tok), logits(model, tok)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    del hf

    from safetensors.torch import load_file

    lowbit.export_hf(model, tok, tmp_path / "gptq", to="gptq")
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embeddings, as save_pretrained writes it
    for name, m in list(linears(model).items())[:7]:
        t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(loader_dequantize_gptq(t, 4), m.dequantize()), name
    if importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"):
        got = logits(load_hf(tmp_path / "gptq", gptq_bits=4), tok)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


@pytest.mark.slow
def test_bundled_model_group_128_is_refused_before_quantizing(tmp_path):
    import lowbit

    with pytest.raises(lowbit.LowbitError, match="576 input columns are not whole groups of 128"):
        lowbit.convert_hf(None, tmp_path / "smol", "gptq:int4_g128_sym", to="gptq", device="cpu")
    assert not leftovers(tmp_path, "smol")
