"""The two integer-grid checkpoint layouts of the Hugging Face ecosystem, in one place: GPTQ and compressed-tensors.

Both hold a linear ``[out, in]`` as b-bit codes ``q``, a float16 scale ``s`` and an integer zero point ``z`` per
group of input columns: ``w = (q - z) * s``. lowbit's symmetric uniform formats are that grid with
``z = 2^(b-1)``, its ``_zp`` formats that grid with stored ``z``; :class:`IntLinear` is the common form, and the
functions below write it in, and read it from, each layout (writer then reader gives the same codes back).

GPTQ, ``checkpoint_format: "gptq"`` (v1: what transformers + GPTQModel and vLLM's ``gptq``/``gptq_marlin`` read),
for a linear ``P`` with ``G`` groups::

    P.qweight  int32 [in * b / 32, out]   codes packed along ``in``
    P.qzeros   int32 [G, out * b / 32]    z - 1, packed along ``out`` (v1 stores z - 1; "gptq_v2" stores z)
    P.scales   fp16  [G, out]
    P.g_idx    int32 [in]                 group of each input column: i // group_size (static groups)

compressed-tensors ``pack-quantized`` (what the compressed-tensors package and vLLM's ``CompressedTensorsWNA16``
read)::

    P.weight_packed      int32 [out, ceil(in * b / 32)]   codes packed along ``in`` (stored as q_signed + 2^(b-1))
    P.weight_scale       fp16  [out, G]
    P.weight_zero_point  int32 [ceil(out * b / 32), G]    asymmetric only: z, packed along ``out``
    P.weight_shape       int64 [2]                        (out, in)

Packing (both layouts): each packed row is one little-endian bit stream, code ``j`` at bits ``[j*b, (j+1)*b)``,
so 32 codes fill ``b`` words and a 3-bit code may straddle two words (AutoGPTQ's 3-bit layout is exactly this).

AutoAWQ ``GEMM`` (``quant_method: "awq"``, ``version: "gemm"``; read only, 4-bit, what vLLM's ``awq`` and
transformers' AWQ path load)::

    P.qweight  int32 [in, out / 8]      codes packed along ``out``, 8 per word in the order [0, 2, 4, 6, 1, 3, 5, 7]
    P.qzeros   int32 [G, out / 8]       z itself (no - 1), packed as qweight
    P.scales   fp16  [G, out]

(word ``j``'s nibble ``i``, bits ``[4i, 4i+4)``, holds output column ``8j + [0, 2, 4, 6, 1, 3, 5, 7][i]``: AutoAWQ's
``WQLinear_GEMM.from_linear``; there are no act-order groups.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import BadFileError, LowbitError
from lowbit.formats import (
    E8PFormat,
    Format,
    IQ2XXSFormat,
    KQuantFormat,
    LevelSetFormat,
    QuantizedTensor,
    UniformFormat,
    ZeroPointFormat,
    get_format,
)
from lowbit.formats.bitpack import pack_bits, packed_row_bytes, unpack_bits
from lowbit.io.validate import TensorInfo, read_json, read_weight_headers

TARGETS = ("gptq", "compressed-tensors")
READ_METHODS = ("gptq", "awq", "compressed-tensors")  # quant_method values read_hf_quantized reads
GPTQ_BITS = (2, 3, 4, 8)  # vLLM's GPTQConfig: "only 2/3/4/8-bit weight quantization is supported"
# 32 % b == 0: compressed-tensors before its dense packing put 32 // b codes in a word (3 bits: 10 + 2 spare
# bits), after it 32 codes in b words; only these widths are the same file in both.
CT_BITS = (2, 4, 8)


# ----------------------------------------------------------------------------------------------------- packing
def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, n] in [0, 2^bits) -> int32 [rows, ceil(n * bits / 32)], each row one little-endian bit stream."""
    rows, n = values.shape
    words = -(-n * bits // 32)
    raw = pack_bits(values, bits)  # the same stream in bytes (formats/bitpack.py)
    raw = torch.nn.functional.pad(raw, (0, 4 * words - raw.shape[1])).view(rows, words, 4).to(torch.int64)
    w = raw[..., 0] | raw[..., 1] << 8 | raw[..., 2] << 16 | raw[..., 3] << 24
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)  # two's complement, as int32 holds it


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [rows, words] -> int64 codes [rows, n]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    raw = torch.stack([(w >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).reshape(w.shape[0], -1)
    return unpack_bits(raw[:, : packed_row_bytes(n, bits)].to(torch.uint8), bits, n).to(torch.int64)


# ----------------------------------------------------------------------------------------------- the common form
@dataclass
class IntLinear:
    """A linear ``w[o, i] = (codes[o, i] - zero[o, g]) * scale[o, g]`` with ``g = g_idx[i]``."""

    codes: torch.Tensor  # int64 [out, in] in [0, 2^bits)
    scale: torch.Tensor  # [out, G], float16 from lowbit; as the file stores it when read
    zero: torch.Tensor  # int64 [out, G] in [0, 2^bits] (a GPTQ v1 file can say 2^bits: its stored z - 1 wraps)
    bits: int
    group_size: int | None  # None: one group per row
    g_idx: torch.Tensor | None = None  # int64 [in]; None: static groups, column i in group i // group_size

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return bool((self.zero == 1 << (self.bits - 1)).all())

    def groups(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return static_g_idx(self.shape[1], self.group_size)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: exact (a b-bit integer times a float16 is exact in float32)."""
        g = self.groups()
        return (self.codes - self.zero[:, g]).float() * self.scale.float()[:, g]

    def to_quantized(self) -> QuantizedTensor:
        """The same numbers as a lowbit tensor: ``int{b}_{gN|ch}_sym`` when every zero is 2^(b-1), else ``_zp``."""
        if self.g_idx is not None:
            raise LowbitError("a linear with act-order groups (non-static g_idx) has no lowbit format")
        if int(self.zero.max()) >= 1 << self.bits:
            raise LowbitError(f"a zero point of {1 << self.bits} (a GPTQ v1 file's wrapped z - 1) has no lowbit format")
        if not torch.equal(self.scale.to(torch.float16).to(self.scale.dtype), self.scale):
            raise LowbitError(f"{self.scale.dtype} scales that float16 cannot hold exactly have no lowbit format")
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        fmt = get_format(f"int{self.bits}_{g}_{'sym' if self.symmetric else 'zp'}")
        params = {"scale": self.scale.float()} if self.symmetric else {"scale": self.scale.float(),
                                                                        "zero": self.zero.float()}
        return fmt.pack(self.codes, params, self.shape)


def static_g_idx(cols: int, group_size: int | None) -> torch.Tensor:
    return torch.zeros(cols, dtype=torch.int64) if group_size is None else torch.arange(cols) // group_size


def inexpressible(fmt: Format) -> str | None:
    """Why a lowbit format has no integer-zero-point layout (None when it has one)."""
    if isinstance(fmt, ZeroPointFormat) or (type(fmt) is UniformFormat and fmt.symmetric):
        return None
    if type(fmt) is UniformFormat:
        g = "ch" if fmt.group_size is None else f"g{fmt.group_size}"
        return (f"it stores a float16 minimum per group (w = q*d + m), and GPTQ / compressed-tensors store an integer "
                f"zero point (w = (q - z)*s), which holds m only when m/d is an integer; quantize into "
                f"int{fmt.bits}_{g}_zp (or _sym) instead")
    if isinstance(fmt, E8PFormat | IQ2XXSFormat):
        return "it is a vector codebook (one code per 8 weights), not a per-weight integer grid"
    if isinstance(fmt, KQuantFormat):
        return "it is a llama.cpp k-quant (super-blocks with quantized sub-scales); export it with export-gguf"
    if isinstance(fmt, LevelSetFormat):
        return "it is a level set (fixed, not equally spaced levels times a scale), not an integer grid"
    return "it has no integer-grid layout"


def layout_problem(to: str, bits: int, group_size: int | None, shape: tuple[int, int]) -> str | None:
    """Why a b-bit linear of ``shape`` cannot be written in layout ``to`` (None when it can)."""
    out_f, in_f = shape
    allowed = GPTQ_BITS if to == "gptq" else CT_BITS
    if bits not in allowed:
        extra = " (3 bits: use --to gptq)" if to == "compressed-tensors" and bits == 3 else ""
        return f"{to} holds {'/'.join(map(str, allowed))}-bit codes, not {bits}-bit{extra}"
    if group_size is not None and in_f % group_size:
        # lowbit stores a shorter last group; vLLM sizes scales as in // group_size and refuses the rest
        return (f"{in_f} input columns are not whole groups of {group_size} (lowbit's ragged last group has no "
                "place in these layouts): use a group size that divides every linear's input width")
    if to == "gptq" and (in_f * bits % 32 or out_f * bits % 32):
        return f"GPTQ packs 32 codes into {bits} int32 words along both dimensions; {out_f}x{in_f} does not fill them"
    return None


def from_lowbit(qt: QuantizedTensor) -> IntLinear:
    """The integer form of a lowbit uniform (symmetric) or zero-point tensor; LowbitError for other formats."""
    fmt = get_format(qt.format)
    reason = inexpressible(fmt)
    if reason:
        raise LowbitError(f"format {qt.format}: {reason}")
    codes, params = fmt.unpack(qt)
    zero = params["zero"].round().to(torch.int64) if "zero" in params else \
        torch.full_like(params["scale"], 1 << (fmt.bits - 1), dtype=torch.int64)
    return IntLinear(codes, params["scale"].to(torch.float16), zero, fmt.bits, fmt.group_size)


# ------------------------------------------------------------------------------------------------------ GPTQ
def gptq_tensors(il: IntLinear) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one linear (names relative to the module)."""
    if (il.zero < 1).any():
        raise LowbitError("a zero point of 0 cannot be stored in GPTQ v1 (it stores z - 1 in b bits)")
    return {"qweight": pack_int32(il.codes, il.bits).t().contiguous(),
            "qzeros": pack_int32((il.zero - 1).t().contiguous(), il.bits),
            "scales": il.scale.t().contiguous().to(torch.float16),
            "g_idx": il.groups().to(torch.int32)}


def gptq_linear(t: Mapping[str, torch.Tensor], bits: int, group_size: int | None, v2: bool = False) -> IntLinear:
    """Inverse of :func:`gptq_tensors` (``v2``: ``qzeros`` holds z itself, GPTQModel's internal "gptq_v2")."""
    in_f = t["qweight"].shape[0] * 32 // bits
    out_f = t["scales"].shape[1]
    codes = unpack_int32(t["qweight"].t().contiguous(), bits, in_f)
    zero = unpack_int32(t["qzeros"], bits, out_f).t() + (0 if v2 else 1)
    # v1 stored z - 1 in b bits: z = 2^b wraps to 0 on write and comes back as 1 + (2^b - 1) = 2^b here
    g_idx = t["g_idx"].to(torch.int64) if "g_idx" in t else None
    if g_idx is not None and torch.equal(g_idx, static_g_idx(in_f, group_size)):
        g_idx = None
    return IntLinear(codes, t["scales"].t().contiguous(), zero.contiguous(), bits, group_size, g_idx)


def gptq_config(bits: int, group_size: int | None, sym: bool, act_order: bool, version: str) -> dict[str, Any]:
    """config.json's ``quantization_config`` (also written as quantize_config.json, vLLM's older source)."""
    # desc_act records that lowbit's GPTQ ran in activation order; its groups are static (fitted in the original
    # column order, static_groups), so g_idx is i // group_size either way and the layout does not change.
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
            "group_size": -1 if group_size is None else group_size, "desc_act": act_order,
            "static_groups": act_order, "act_group_aware": False, "sym": sym, "lm_head": False,
            "true_sequential": True, "pack_dtype": "int32", "meta": {"quantizer": [f"lowbit:{version}"]}}


# ------------------------------------------------------------------------------------------------------- AWQ
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i of a word holds column 8j + AWQ_ORDER[i]


def awq_unpack(words: torch.Tensor, cols: int) -> torch.Tensor:
    """AutoAWQ GEMM's int32 [rows, cols / 8] (4-bit, interleaved) -> codes [rows, cols]."""
    nibbles = unpack_int32(words, 4, cols)  # nibble i of word j at index 8j + i
    columns = (8 * torch.arange(cols // 8).view(-1, 1) + torch.tensor(AWQ_ORDER)).reshape(-1)
    out = torch.empty_like(nibbles)
    out[:, columns] = nibbles  # index 8j + i is column 8j + AWQ_ORDER[i]
    return out


def awq_linear(t: Mapping[str, torch.Tensor], group_size: int | None, zero_point: bool = True) -> IntLinear:
    """The integer form of one AutoAWQ GEMM linear (``qweight``, ``qzeros``, ``scales``); without a zero point
    (``zero_point: false``) the codes are symmetric around 8, as compressed-tensors' AutoAWQ converter reads them."""
    out_f = t["scales"].shape[1]
    codes = awq_unpack(t["qweight"], out_f).t().contiguous()
    scale = t["scales"].t().contiguous()
    zero = awq_unpack(t["qzeros"], out_f).t().contiguous() if zero_point else \
        torch.full(scale.shape, 8, dtype=torch.int64)
    return IntLinear(codes, scale, zero, 4, group_size)


# ------------------------------------------------------------------------------------------ compressed-tensors
def ct_tensors(il: IntLinear, symmetric: bool) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale``, ``weight_shape`` (+ ``weight_zero_point`` when asymmetric)."""
    out = {"weight_packed": pack_int32(il.codes, il.bits),
           "weight_scale": il.scale.contiguous().to(torch.float16),
           "weight_shape": torch.tensor(il.shape, dtype=torch.int64)}
    if not symmetric:
        out["weight_zero_point"] = pack_int32(il.zero.t().contiguous(), il.bits).t().contiguous()
    elif not il.symmetric:
        raise LowbitError("a symmetric compressed-tensors scheme cannot hold zero points other than 2^(b-1)")
    return out


def ct_linear(t: Mapping[str, torch.Tensor], weights: Mapping[str, Any]) -> IntLinear:
    """Inverse of :func:`ct_tensors`, given the scheme's ``weights`` arguments."""
    bits, group_size = int(weights["num_bits"]), weights.get("group_size")
    group_size = None if weights.get("strategy") == "channel" or group_size in (None, -1) else int(group_size)
    out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
    codes = unpack_int32(t["weight_packed"], bits, in_f)
    scale = t["weight_scale"]
    if weights.get("symmetric", True):
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        zero = unpack_int32(t["weight_zero_point"].t().contiguous(), bits, out_f).t().contiguous()
    g_idx = t["weight_g_idx"].to(torch.int64) if "weight_g_idx" in t else None
    return IntLinear(codes, scale, zero, bits, group_size, g_idx)


def ct_weights_args(bits: int, group_size: int | None, symmetric: bool, act_order: bool) -> dict[str, Any]:
    # actorder "weight": GPTQ ran in activation order with static groups, so no weight_g_idx is stored
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size,
            "dynamic": False, "actorder": "weight" if act_order else None, "observer": "minmax"}


def ct_config(groups: list[tuple[dict[str, Any], list[str]]], ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config``: one config group per (weights arguments, targets)."""
    config_groups = {f"group_{i}": {"targets": targets, "weights": weights, "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"}
                     for i, (weights, targets) in enumerate(groups)}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


# ---------------------------------------------------------------------------------------- reading a directory
@dataclass
class HFQuantized:
    """A GPTQ, AWQ or compressed-tensors checkpoint read back: its quantized linears and every other tensor."""

    path: Path
    method: str  # "gptq", "awq" or "compressed-tensors"
    config: dict[str, Any]  # config.json
    linears: Mapping[str, IntLinear]  # module name -> integer form
    tensors: dict[str, torch.Tensor]  # everything else, by state-dict key (biases of quantized linears included)


def checkpoint_method(path: str | Path) -> str | None:
    """The ``quant_method`` of another tool's quantized checkpoint directory (config.json's
    ``quantization_config``, or a GPTQ ``quantize_config.json``); None for a float model or a lowbit checkpoint.
    Methods lowbit reads are :data:`READ_METHODS`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    qc = read_json(path / "config.json").get("quantization_config")
    if qc is None:
        return "gptq" if (path / "quantize_config.json").is_file() else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return None if method in (None, "lowbit") else str(method)


class _LazyLinears(Mapping[str, IntLinear]):
    """Each linear decoded from the loaded (packed) tensors when asked for and not kept: an IntLinear holds int64
    codes, 8 bytes a weight, so a whole model's would take ~16x its checkpoint."""

    def __init__(self, plan: dict[str, Any], data: dict[str, torch.Tensor]):
        self._plan, self._data = plan, data

    def __getitem__(self, name: str) -> IntLinear:
        return self._plan[name](self._data)

    def __iter__(self):  # noqa: ANN204
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def read_hf_quantized(path: str | Path, lazy: bool = False) -> HFQuantized:
    """Read a GPTQ (v1 or v2), AutoAWQ GEMM or compressed-tensors ``pack-quantized`` checkpoint directory.
    ``lazy``: ``linears`` decodes each linear when it is looked up (checks on the values, such as GPTQ's ``sym``
    against its zero points, run then), so a converter holds one decoded linear at a time.

    Every quantized linear's tensors are checked against ``quantization_config`` from the safetensors headers
    before any weight is read: a disagreement is a BadFileError naming the tensor."""
    path = Path(path)
    config = read_json(path / "config.json")
    qc = config.get("quantization_config") or _quantize_config_json(path)
    if not isinstance(qc, dict):
        raise BadFileError(f"{path / 'config.json'}: quantization_config must be an object, got {type(qc).__name__}")
    headers = read_weight_headers(path)
    method = qc.get("quant_method")
    if method == "gptq":
        plan = _gptq_plan(qc, headers, path)
    elif method == "awq":
        plan = _awq_plan(qc, headers, path)
    elif method == "compressed-tensors":
        plan = _ct_plan(qc, headers, path)
    else:
        raise LowbitError(f"{path}: quant_method {method!r} is not read by lowbit ({', '.join(READ_METHODS)})")
    data = _load(headers)
    linears = _LazyLinears(plan, data) if lazy else {name: read(data) for name, read in plan.items()}
    used = {k for k in data if k.rpartition(".")[0] in plan and not k.endswith(".bias")}
    return HFQuantized(path, method, config, linears, {k: v for k, v in data.items() if k not in used})


def _quantize_config_json(path: Path) -> dict[str, Any]:
    f = path / "quantize_config.json"
    if not f.is_file():
        raise LowbitError(f"{path}: config.json has no quantization_config and there is no quantize_config.json")
    return {"quant_method": "gptq", **read_json(f)}


def _load(headers: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted({t.file for t in headers.values()}):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _need(path: Path, headers: dict[str, TensorInfo], key: str, shape: tuple[int, ...], dtypes: tuple[str, ...],
          why: str) -> None:
    t = headers.get(key)
    if t is None:
        raise BadFileError(f"{path}: tensor {key} is missing ({why})")
    if t.shape != shape or t.dtype not in dtypes:
        raise BadFileError(f"{path}: tensor {key} is {t.dtype} {list(t.shape)}, but {why} needs "
                           f"{'/'.join(dtypes)} {list(shape)}")


_FLOATS = ("F16", "BF16", "F32")


def _gptq_plan(qc: dict[str, Any], headers: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    if bits not in GPTQ_BITS or not isinstance(group, int) or group == 0 or group < -1:
        raise BadFileError(f"{path}: quantization_config has bits {bits!r}, group_size {group!r}: not a GPTQ scheme "
                           f"(bits {GPTQ_BITS}, group_size -1 or > 0)")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2") or qc.get("dynamic"):
        raise LowbitError(f"{path}: GPTQ checkpoint_format {fmt!r}{' with dynamic overrides' * bool(qc.get('dynamic'))}"
                          " is not read by lowbit (gptq, gptq_v2)")
    gs = None if group == -1 else group
    names = [k.removesuffix(".qweight") for k in headers if k.endswith(".qweight")]
    for name in names:
        _check_gptq(path, headers, name, bits, gs)
    return {name: _gptq_reader(name, bits, gs, fmt == "gptq_v2", bool(qc.get("sym", True)), path) for name in names}


def _gptq_reader(name: str, bits: int, group: int | None, v2: bool, sym: bool, path: Path):  # noqa: ANN202
    def read(data: dict[str, torch.Tensor]) -> IntLinear:
        keys = ("qweight", "qzeros", "scales", "g_idx")
        il = gptq_linear({k: data[f"{name}.{k}"] for k in keys if f"{name}.{k}" in data}, bits, group, v2=v2)
        if sym and not il.symmetric:  # vLLM's Marlin ignores qzeros when sym, its exllama kernel reads them
            raise BadFileError(f"{path}: tensor {name}.qzeros holds zero points other than {1 << (bits - 1)}, but "
                               "quantization_config says sym: true")
        return il
    return read


def _check_gptq(path: Path, headers: dict[str, TensorInfo], name: str, bits: int, group: int | None) -> None:
    rows, out_f = headers[f"{name}.qweight"].shape
    why = f"quantization_config (bits {bits}, group_size {group or -1})"
    if headers[f"{name}.qweight"].dtype != "I32" or rows * 32 % bits:
        raise BadFileError(f"{path}: tensor {name}.qweight is {headers[f'{name}.qweight'].dtype} {[rows, out_f]}, "
                           f"not int32 [in * {bits} / 32, out] as {why} needs")
    in_f = rows * 32 // bits
    n_groups = 1 if group is None else -(-in_f // group)
    _need(path, headers, f"{name}.scales", (n_groups, out_f), _FLOATS, f"{why} with qweight {[rows, out_f]}")
    _need(path, headers, f"{name}.qzeros", (n_groups, -(-out_f * bits // 32)), ("I32",),
          f"{why} with qweight {[rows, out_f]}")
    if f"{name}.g_idx" in headers:
        _need(path, headers, f"{name}.g_idx", (in_f,), ("I32", "I64"), f"qweight {[rows, out_f]}")


def _awq_plan(qc: dict[str, Any], headers: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    # the keys vLLM's AWQConfig.from_config accepts: ["w_bit", "bits"], ["q_group_size", "group_size"]
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise LowbitError(f"{path}: AWQ version {version!r} is not read by lowbit (gemm, AutoAWQ's default layout)")
    if bits != 4 or not isinstance(group, int) or isinstance(group, bool) or group == 0 or group < -1:
        raise BadFileError(f"{path}: quantization_config has bits {bits!r}, group_size {group!r}: not an AWQ GEMM "
                           "scheme (bits 4, group_size -1 or > 0)")
    gs, zero_point = (None if group == -1 else group), bool(qc.get("zero_point", True))
    names = [k.removesuffix(".qweight") for k in headers if k.endswith(".qweight")]
    for name in names:
        _check_awq(path, headers, name, gs, zero_point)

    def reader(name: str):  # noqa: ANN202 - a closure over the module name
        keys = ("qweight", "qzeros", "scales")
        return lambda data: awq_linear({k: data[f"{name}.{k}"] for k in keys if f"{name}.{k}" in data}, gs,
                                       zero_point)
    return {name: reader(name) for name in names}


def _check_awq(path: Path, headers: dict[str, TensorInfo], name: str, group: int | None, zero_point: bool) -> None:
    qweight = headers[f"{name}.qweight"]
    why = f"quantization_config (AWQ GEMM 4-bit, group_size {group or -1})"
    if qweight.dtype != "I32" or len(qweight.shape) != 2:
        raise BadFileError(f"{path}: tensor {name}.qweight is {qweight.dtype} {list(qweight.shape)}, not int32 "
                           f"[in, out / 8] as {why} needs")
    in_f, words = qweight.shape
    if group is not None and in_f % group:  # AutoAWQ's WQLinear_GEMM: assert in_features % group_size == 0
        raise BadFileError(f"{path}: tensor {name}.qweight has {in_f} input rows, not whole groups of {group} as "
                           f"{why} needs")
    n_groups = 1 if group is None else in_f // group
    _need(path, headers, f"{name}.scales", (n_groups, words * 8), _FLOATS, f"{why} with qweight {[in_f, words]}")
    if zero_point:
        _need(path, headers, f"{name}.qzeros", (n_groups, words), ("I32",), f"{why} with qweight {[in_f, words]}")


def _ct_plan(qc: dict[str, Any], headers: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise BadFileError(f"{path}: quantization_config has no config_groups")
    names = [k.removesuffix(".weight_packed") for k in headers if k.endswith(".weight_packed")]
    plan = {}
    for name in names:
        weights = _ct_scheme(qc, groups, name, path)
        _check_ct(path, headers, name, weights)
        plan[name] = _ct_reader(name, weights, path)
    return plan


def _ct_reader(name: str, weights: dict[str, Any], path: Path):  # noqa: ANN202 - a closure over the scheme
    keys = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    def read(data: dict[str, torch.Tensor]) -> IntLinear:
        t = {k: data[f"{name}.{k}"] for k in keys if f"{name}.{k}" in data}
        out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
        bits, group = int(weights["num_bits"]), weights.get("group_size")
        n_groups = -(-in_f // group) if isinstance(group, int) and group > 0 else 1
        if (out_f, -(-in_f * bits // 32), n_groups) != (*t["weight_packed"].shape, t["weight_scale"].shape[1]):
            raise BadFileError(f"{path}: tensor {name}.weight_shape says {[out_f, in_f]}, but weight_packed "
                               f"{list(t['weight_packed'].shape)} and weight_scale {list(t['weight_scale'].shape)} "
                               f"hold another shape ({bits}-bit codes, groups of {group})")
        return ct_linear(t, weights)
    return read


def _ct_scheme(qc: dict[str, Any], groups: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    if _matches(name, qc.get("ignore") or []):
        raise BadFileError(f"{path}: tensor {name}.weight_packed is stored, but quantization_config ignores {name}")
    for gname, group in groups.items():
        if isinstance(group, dict) and _matches(name, group.get("targets") or []):
            fmt = group.get("format") or qc.get("format")
            weights = group.get("weights") or {}
            if fmt != "pack-quantized" or weights.get("type", "int") != "int" or \
                    weights.get("strategy", "group") not in ("group", "channel"):
                raise LowbitError(f"{path}: config group {gname} ({fmt}, {weights.get('type')} "
                                  f"{weights.get('strategy')}) is not read by lowbit (pack-quantized, int, group or "
                                  "channel)")
            return weights
    raise BadFileError(f"{path}: tensor {name}.weight_packed matches no config group's targets")


def _matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' rule: ``re:`` regexes, exact module names, or class names (every packed module is a
    Linear, the one class such checkpoints target)."""
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t == "Linear":
            return True
    return False


def _check_ct(path: Path, headers: dict[str, TensorInfo], name: str, weights: dict[str, Any]) -> None:
    bits, group = weights.get("num_bits"), weights.get("group_size")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise BadFileError(f"{path}: config group for {name} has num_bits {bits!r}")
    _need(path, headers, f"{name}.weight_shape", (2,), ("I64", "I32"), "pack-quantized")
    out_f = headers[f"{name}.weight_packed"].shape[0]
    scale = headers.get(f"{name}.weight_scale")
    grouped = isinstance(group, int) and group > 0 and weights.get("strategy", "group") == "group"
    n_groups = scale.shape[-1] if grouped and scale is not None and len(scale.shape) == 2 else 1  # channel: 1
    if grouped:
        in_words = headers[f"{name}.weight_packed"].shape[1]
        lo, hi = (in_words - 1) * 32 // bits + 1, in_words * 32 // bits  # the widths that pack to in_words
        if not -(-lo // group) <= n_groups <= -(-hi // group):
            raise BadFileError(f"{path}: tensor {name}.weight_scale has {n_groups} groups, but "
                               f"weight_packed {list(headers[f'{name}.weight_packed'].shape)} with {bits}-bit codes in "
                               f"groups of {group} needs {-(-lo // group)}..{-(-hi // group)}")
    why = f"weights {bits}-bit {'sym' if weights.get('symmetric', True) else 'asym'}, group_size {group}"
    _need(path, headers, f"{name}.weight_scale", (out_f, n_groups), _FLOATS, why)
    if not weights.get("symmetric", True):
        _need(path, headers, f"{name}.weight_zero_point", (-(-out_f * bits // 32), n_groups), ("I32",), why)
