"""Honest size accounting: bytes actually stored, split into decoder linears / embeddings+head / the rest."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears, linear_weight

STORED_BYTES_PER_FLOAT = 2  # unquantized tensors are stored in 16-bit


@dataclass
class SizeReport:
    linear_params: int
    linear_bytes: int
    embed_head_params: int
    embed_head_bytes: int
    other_params: int
    other_bytes: int

    @property
    def linear_bpw(self) -> float:
        return 8.0 * self.linear_bytes / self.linear_params

    @property
    def total_bytes(self) -> int:
        return self.linear_bytes + self.embed_head_bytes + self.other_bytes

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6


def model_size(model: nn.Module) -> SizeReport:
    linears = decoder_linears(model)
    lin_params = lin_bytes = 0
    counted = set()
    for m in linears.values():
        if isinstance(m, QuantLinear):
            params, nbytes = _packed_size(m, counted)
            lin_params, lin_bytes = lin_params + params, lin_bytes + nbytes
        else:
            w = linear_weight(m)
            lin_params += w.numel()
            lin_bytes += w.numel() * STORED_BYTES_PER_FLOAT
            counted.add(id(m.weight))
            if getattr(m, "bias", None) is not None:
                lin_bytes += m.bias.numel() * STORED_BYTES_PER_FLOAT
                counted.add(id(m.bias))
    eh_params = eh_bytes = 0
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(emb, QuantLinear):  # a quantized LM head (Recipe.head): its packed bytes
            params, nbytes = _packed_size(emb, counted)
            eh_params, eh_bytes = eh_params + params, eh_bytes + nbytes
        elif emb is not None and id(emb.weight) not in counted:  # tied head counted once
            eh_params += emb.weight.numel()
            eh_bytes += emb.weight.numel() * STORED_BYTES_PER_FLOAT
            counted.add(id(emb.weight))
    other, seen = 0, set()
    for t in model.state_dict(keep_vars=True).values():  # params + persistent buffers, tied ones once
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if id(t) in counted or key in seen or not t.is_floating_point():
            continue
        seen.add(key)
        other += t.numel()
    return SizeReport(lin_params, lin_bytes, eh_params, eh_bytes,
                      other, other * STORED_BYTES_PER_FLOAT)


def _packed_size(m: QuantLinear, counted: set[int]) -> tuple[int, int]:
    """(weights, stored bytes) of a QuantLinear: packed tensors and a float bias; marks them counted."""
    qt = m.quantized()
    counted.update(id(t) for t in qt.data.values())
    nbytes = qt.nbytes
    if m.bias is not None:
        nbytes += m.bias.numel() * STORED_BYTES_PER_FLOAT
        counted.add(id(m.bias))
    return qt.numel, nbytes
