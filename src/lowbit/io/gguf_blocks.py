"""lowbit packed tensors -> ggml block bytes, one conversion per GGUF quantization type.

lowbit's formats already use ggml's arithmetic (``formats/uniform.py``: ``w = (q - 2^(b-1)) * d`` for the
symmetric family, ``w = q * d + m`` for scale + min; ``formats/iq2xxs.py``: ``block_iq2_xxs`` bytes), so a
conversion only re-lays the same codes and float16 parameters out as ggml blocks; nothing is re-rounded and the
GGUF dequantizes to exactly lowbit's weights. Layouts (ggml-common.h, QK = 32 weights per block):

* ``Q4_0``: fp16 d, 16 bytes; byte j = element j (low nibble) | element j+16 (high nibble); ``w = (q-8) d``
* ``Q4_1``: fp16 d, fp16 m, 16 bytes as Q4_0; ``w = q d + m``
* ``Q5_0``: fp16 d, uint32 qh (bit j = bit 4 of element j), 16 bytes of low nibbles as Q4_0; ``w = (q-16) d``
* ``Q5_1``: fp16 d, fp16 m, qh, 16 bytes; ``w = q d + m``
* ``Q8_0``: fp16 d, 32 int8; ``w = q d`` (lowbit stores ``q + 128``)
* ``IQ4_NL``: fp16 d, 16 bytes as Q4_0; ``w = kvalues_iq4nl[q] d`` (lowbit's ``iq4_nl`` level set)
* ``IQ2_XXS``: 66-byte superblocks of 256 weights, stored verbatim by lowbit for rows that are multiples of 256.
* ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``: ggml's ``block_q*_K`` superblocks of 256 weights
  (``formats/kquants.py``), stored verbatim by lowbit.

Every block lies inside one row, so rows of the returned [rows, row_bytes] array can be permuted freely.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from lowbit.formats import (
    Format,
    IQ2XXSFormat,
    KQuantFormat,
    LevelSetFormat,
    QuantizedTensor,
    UniformFormat,
    get_format,
)

QK = 32  # weights per block of the legacy ggml types
QK_K = 256  # weights per IQ2_XXS / k-quant superblock
_VERBATIM = (QT.IQ2_XXS, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)  # stored as ggml's own block bytes ("qs")

# (bits, symmetric) of a group-32 uniform format -> the ggml type with the same levels and parameters
_UNIFORM_TYPES = {(4, True): QT.Q4_0, (4, False): QT.Q4_1, (5, True): QT.Q5_0, (5, False): QT.Q5_1,
                  (8, True): QT.Q8_0}


def gguf_type(fmt: Format) -> QT | None:
    """The ggml type storing ``fmt`` bit for bit, or None when GGUF has no such type."""
    if isinstance(fmt, IQ2XXSFormat):
        return QT.IQ2_XXS
    if isinstance(fmt, KQuantFormat):
        return QT[fmt.name.upper()]  # q4_k is Q4_K
    if isinstance(fmt, LevelSetFormat):
        return QT.IQ4_NL if fmt.name == "iq4_nl" else None
    if isinstance(fmt, UniformFormat) and fmt.group_size == QK:
        return _UNIFORM_TYPES.get((fmt.bits, fmt.symmetric))
    return None


def unsupported_reason(fmt: Format, shape: tuple[int, int]) -> str | None:
    """Why a tensor of ``fmt`` and ``shape`` cannot be written as ggml blocks (None when it can)."""
    qtype = gguf_type(fmt)
    if qtype is None:
        return (f"format {fmt.name} has no GGUF type (exportable: q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, iq2_xxs, "
                "q2_k, q3_k, q4_k, q5_k, q6_k)")
    block = QK_K if qtype in _VERBATIM else QK
    if shape[1] % block:
        # lowbit would store a shorter last group/superblock, which ggml blocks cannot express
        return f"{qtype.name} needs rows that are multiples of {block} weights, got {shape[1]}"
    return None


def to_ggml_blocks(qt: QuantizedTensor) -> tuple[QT, np.ndarray]:
    """(ggml type, uint8 [rows, row_bytes]) for a packed lowbit tensor; raises ValueError when impossible."""
    fmt = get_format(qt.format)
    reason = unsupported_reason(fmt, qt.shape)
    if reason:
        raise ValueError(reason)
    qtype = gguf_type(fmt)
    assert qtype is not None
    if qtype in _VERBATIM:
        return qtype, qt.data["qs"].cpu().numpy().copy()
    codes, params = fmt.unpack(qt.to("cpu"))
    rows, cols = qt.shape
    codes = codes.to(torch.int64).reshape(rows, cols // QK, QK)
    blocks = _CONVERTERS[qtype](codes, {k: v.to(torch.float16) for k, v in params.items()})
    return qtype, blocks.reshape(rows, -1).numpy()


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 [rows, nb] -> its little-endian bytes [rows, nb, 2] (ggml files are little-endian)."""
    rows, nb = t.shape
    return t.contiguous().view(torch.int16).to(torch.int64).reshape(rows, nb, 1).bitwise_and(0xFFFF) \
        .bitwise_right_shift(torch.tensor([0, 8])).bitwise_and(0xFF)


def _nibbles(c: torch.Tensor) -> torch.Tensor:
    """[rows, nb, 32] codes -> 16 bytes per block: element j in the low nibble, element j+16 in the high one."""
    return (c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)


def _qh(c: torch.Tensor) -> torch.Tensor:
    """[rows, nb, 32] 5-bit codes -> the 4 bytes of the uint32 whose bit j is bit 4 of element j."""
    bits = (c >> 4) & 1
    word = (bits << torch.arange(QK)).sum(dim=-1, keepdim=True)
    return (word >> torch.tensor([0, 8, 16, 24])) & 0xFF


def _q4_0(c: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return _as_u8(torch.cat([_f16_bytes(p["scale"]), _nibbles(c)], dim=-1))


def _q4_1(c: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return _as_u8(torch.cat([_f16_bytes(p["scale"]), _f16_bytes(p["min"]), _nibbles(c)], dim=-1))


def _q5_0(c: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return _as_u8(torch.cat([_f16_bytes(p["scale"]), _qh(c), _nibbles(c)], dim=-1))


def _q5_1(c: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return _as_u8(torch.cat([_f16_bytes(p["scale"]), _f16_bytes(p["min"]), _qh(c), _nibbles(c)], dim=-1))


def _q8_0(c: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # lowbit's int8 codes are q + 128 (offset binary); ggml stores q as two's complement int8: same byte after
    # flipping the top bit.
    return _as_u8(torch.cat([_f16_bytes(p["scale"]), (c - 128) & 0xFF], dim=-1))


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


_CONVERTERS: dict[QT, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    QT.Q4_0: _q4_0, QT.IQ4_NL: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0}
