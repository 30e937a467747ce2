"""QuIP#'s E8P ("E8P12") 2-bit lattice codebook: 65536 points of E8 + 1/4, one 16-bit code per 8 weights.

Construction, reproduced from Cornell-RelaxML/quip-sharp ``lib/codebook/latticee8_padded12.py``
(``get_norm12``, ``get_packed_abs_grid``, ``get_full_grid``; QuIP#, Tseng et al. 2024, section 4):

* 256 absolute patterns ``v`` (entries 1/2, 3/2, 5/2): the 227 distinct ``|x|`` of the points x of
  D8-hat = {x in (Z + 1/2)^8 : sum(x) even} with ||x||^2 <= 10, in lexicographic order (what QuIP#'s
  ``torch.unique`` yields), followed by QuIP#'s 29 hand-picked patterns of norm^2 12 (five 3/2, three 1/2).
* QuIP# stores each pattern with its last coordinate negated when ``sum(v)`` is odd (``a``), so that any
  even number of sign flips keeps ``a`` in D8-hat.
* Code ``c`` (16 bits): ``c >> 8`` picks the pattern, ``c & 255`` is a sign byte ``sb``. With ``par`` = parity
  of ``sb``, the signs are ``sb ^ par`` (always an even count) and the shift is ``-1/4`` if ``par`` else
  ``+1/4``; coordinate ``i`` is negated where bit ``(0, 4, 1, 5, 2, 6, 3, 7)[i]`` of the signs is set
  (QuIP#'s nibble shuffle). The codeword is ``signs * a + shift``. Since (1/2, ..., 1/2) is in E8 and
  D8-hat is a coset of D8 in E8, every codeword lies in E8 + 1/4, and the 2^16 codewords are distinct.

Codes here are exactly QuIP#'s indices into its ``_E8P_GRID``; storage keeps their bits in another order.

Format ``e8p_ch``: one float16 scale per output row (QuIP# uses one per matrix after its random Hadamard
transform; per row is strictly more flexible); ``e8p_g{N}``: one per N columns. Storage: ``codes`` int16
[rows, cols / 8], the codes' 16 bits in the order the CUDA GEMV reads them (:func:`to_stored`; int16 rather than
uint16 because older torch/safetensors releases we support lack uint16), and ``scale`` float16 [rows, groups].
Bits per weight: 2 + 16 / group columns. Checkpoints written before that order (checkpoint version 1) held the
codes themselves and are converted on load.

Encoding is the exact nearest codeword (importance-weighted squared error): for each shift, an exact search
over the 256 patterns with the sign-parity rule (:mod:`lowbit.formats.signed_codebook`), then the better
shift. The fit picks each row's (group's) float16 scale by the error it actually gives: the best of
rms / 1.03 x {0.9, 1, 1.1} (1.03: QuIP#'s optimal scale for Gaussian data), then one Lloyd step (the
least-squares scale of the best codes, re-encoded), which matches a 31-point search on Gaussian and t(4) rows.
"""

from __future__ import annotations

from functools import cache

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, Params, QuantizedTensor, keep_better
from lowbit.formats.signed_codebook import SignedCodebook

# QuIP#'s get_norm12(), as digits of 2 * value (so "31113333" is (3/2, 1/2, 1/2, 1/2, 3/2, 3/2, 3/2, 3/2)).
_NORM12 = ("31113333", "13113333", "11313333", "11133333", "33313311", "33313131", "33311331", "33313113",
           "33311313", "33311133", "33133311", "33133131", "33131331", "33133113", "33131313", "33131133",
           "31333311", "31333131", "31331331", "31333113", "31331313", "13331133", "13333311", "13333131",
           "13331331", "13333113", "13331313", "11331333", "33113331")
_SIGN_BIT = (0, 4, 1, 5, 2, 6, 3, 7)  # sign bit of coordinate i (inverse of QuIP#'s [0, 2, 4, 6, 1, 3, 5, 7])
_SHIFT = 0.25
_OPT_SCALE = 1.03  # QuIP#'s E8P12_codebook.opt_scale: unit-variance Gaussian data is best coded as x * 1.03


@cache
def abs_patterns() -> torch.Tensor:
    """The 256 absolute patterns [256, 8] in QuIP#'s order (227 of D8-hat's ball of norm^2 10, then 29)."""
    halves = torch.tensor([0.5, 1.5, 2.5])  # 7/2 is already out of the ball (12.25 > 10)
    cand = torch.cartesian_prod(*[halves] * 8)  # lexicographic, as torch.unique(dim=0) sorts
    ball = cand[cand.square().sum(1) <= 10]
    norm12 = torch.tensor([[int(ch) for ch in row] for row in _NORM12], dtype=torch.float32) / 2
    return torch.cat([ball, norm12])


@cache
def _parity() -> torch.Tensor:
    """1 where sum(v) is odd: QuIP# negates that pattern's last coordinate (an odd number of minus signs)."""
    return (abs_patterns().sum(1).round().to(torch.int64) % 2).to(torch.bool)


@cache
def codebook() -> torch.Tensor:
    """All 65536 codewords [65536, 8] (float32, exact multiples of 1/4), indexed by code."""
    a = abs_patterns().clone()
    a[_parity(), 7] *= -1
    c = torch.arange(1 << 16)
    sb = c & 255
    par = _popcount8(sb) & 1
    signs = sb ^ par
    neg = (signs[:, None] >> torch.tensor(_SIGN_BIT)) & 1
    vals = a[c >> 8] * (1 - 2 * neg).float()
    return vals + torch.where(par.bool(), -_SHIFT, _SHIFT)[:, None]


@cache
def _codebook_on(device: torch.device) -> torch.Tensor:
    return codebook().to(device)


@cache
def _parity_on(device: torch.device) -> torch.Tensor:
    return _parity().to(device)


@cache
def _signed_codebook() -> SignedCodebook:
    return SignedCodebook(abs_patterns(), _parity())


def _popcount8(x: torch.Tensor) -> torch.Tensor:
    return sum((x >> i) & 1 for i in range(8))


def nearest(y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest E8P codeword of each row of ``y`` [N, 8] under weights ``w`` [N, 8]: (codes, error) [N]."""
    n = y.shape[0]
    # both shifts in one search: rows [0, n) are y - 1/4 (sign byte of even parity), [n, 2n) are y + 1/4
    idx, neg, err = _signed_codebook().nearest(torch.cat([y - _SHIFT, y + _SHIFT]), torch.cat([w, w]))
    neg[:, 7] ^= _parity_on(y.device)[idx]  # signs relative to QuIP#'s stored pattern a, not to |a|
    signs = (neg.to(torch.int64) << torch.tensor(_SIGN_BIT, device=y.device)).sum(1)
    codes = (idx << 8) | signs
    codes[n:] ^= 1  # an odd sign byte selects the -1/4 shift (QuIP# then flips sign bit 0 back)
    take = err[n:] < err[:n]
    return torch.where(take, codes[n:], codes[:n]), torch.minimum(err[:n], err[n:])


# ----- storage order ----------------------------------------------------------------------------------------
CHUNK_CODES = 8  # codes per 16-byte chunk of the stored order (64 weights, what a lane of the CUDA GEMV reads)


def to_stored(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, n] (QuIP#'s indices) -> their stored int16 [rows, n]. Each chunk of 8 codes is four 32-bit
    words: the pattern bytes of codes 0-3 (byte r: code r) and 4-7, then the two groups' sign words. Code r's sign
    word slot holds, at bits 4 j + r, the prefix XORs c_j = f_0 ^ ... ^ f_j (j < 7) of its coordinates' negation
    flags f (an even number: f_7 = c_6) and, at bit 28 + r, its shift bit (the sign byte's parity, 1: -1/4). The
    CUDA GEMV turns a sign word into its flip mask with one XOR and one multiply and reads one table word per code
    (docs/kernel-measurements.md, "E8P with one table read per code"). Codes past the last whole chunk stay as
    they are."""
    c = codes.to(torch.int64) & 0xFFFF
    rows, n = c.shape
    whole = n - n % CHUNK_CODES
    r = torch.arange(4, device=c.device)
    head = c[:, :whole].reshape(rows, whole // CHUNK_CODES, 2, 4)  # [row, chunk, group, code r]
    sign_words = (_slot_bits(c.device)[head & 255] << r).sum(-1)  # disjoint bits: an OR
    pattern_words = ((head >> 8) << (8 * r)).sum(-1)
    words = torch.cat([pattern_words, sign_words], -1).reshape(rows, whole // 2)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    tail = c[:, whole:]
    return torch.cat([words.view(torch.int16), torch.where(tail >= 1 << 15, tail - (1 << 16), tail).to(torch.int16)],
                     1).contiguous()


@cache
def _slot_bits(device: torch.device) -> torch.Tensor:
    """int64 [256]: a sign byte's slot of a sign word at r = 0 (bit 4 j: c_j for j < 7, the shift bit for j = 7)."""
    sb = torch.arange(256)
    par = _popcount8(sb) & 1
    flags = ((sb ^ par)[:, None] >> torch.tensor(_SIGN_BIT)) & 1  # [sign byte, coordinate]
    bits = torch.cat([torch.cumsum(flags[:, :7], -1) & 1, par[:, None]], -1)  # c_0 .. c_6, shift bit
    return (bits << 4 * torch.arange(8)).sum(-1).to(device)


def from_stored(stored: torch.Tensor) -> torch.Tensor:
    """The codes (int64 [rows, n], QuIP#'s indices) of stored int16 [rows, n] (:func:`to_stored`)."""
    rows, n = stored.shape
    whole = n - n % CHUNK_CODES
    tail = stored[:, whole:].to(torch.int64) & 0xFFFF
    if not whole:
        return tail
    r = torch.arange(4, device=stored.device)
    words = stored[:, :whole].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(rows, whole // CHUNK_CODES, 4)
    pattern = (words[..., :2, None] >> (8 * r)) & 255  # [row, chunk, group, code r]
    slot = (words[..., 2:, None] >> r) & 0x11111111  # bit 4 j: bit j of the slot; gathered into 8 bits
    slot = (slot | slot >> 3) & 0x03030303
    slot = (slot | slot >> 6) & 0x000F000F
    slot = (slot | slot >> 12) & 0xFF
    codes = _code_of_index(stored.device)[(pattern << 8) | slot].reshape(rows, whole)
    return torch.cat([codes, tail], 1)


@cache
def _code_of_index(device: torch.device) -> torch.Tensor:
    return codes_of_slots(torch.arange(1 << 16, device=device))


def codes_of_slots(index: torch.Tensor) -> torch.Tensor:
    """The code (QuIP#'s index) of ``pattern << 8 | slot``, where bit j of ``slot`` is bit 4 j + r of a code's sign
    word (:func:`to_stored`: c_0 .. c_6, then the shift bit)."""
    bits = (index[..., None] >> torch.arange(8, device=index.device)) & 1
    prefix = bits[..., :7]
    flags = torch.cat([prefix[..., :1], prefix[..., 1:] ^ prefix[..., :-1], prefix[..., 6:]], -1)
    # the signs, with bit 0 flipped back where the shift is -1/4
    sb = (flags << torch.tensor(_SIGN_BIT, device=index.device)).sum(-1) ^ bits[..., 7]
    return (index & 0xFF00) | sb


class E8PFormat(Format):
    vector_dim = 8
    float_params = ("scale",)
    bits = 2  # a 16-bit code per 8 weights

    def __init__(self, group_size: int | None, name: str = ""):
        if group_size is not None and (group_size < 8 or group_size % 8):
            raise ValueError(f"e8p groups must be a positive multiple of 8 columns, got {group_size}")
        self.group_size = group_size
        self.name = name or ("e8p_ch" if group_size is None else f"e8p_g{group_size}")

    # ----- rounding ---------------------------------------------------------------------------
    def _encode_err(self, w: torch.Tensor, s: torch.Tensor,
                    importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [rows, k / 8] and per-row weighted squared error [rows, 1] of ``w`` at per-column scale ``s``."""
        rows, k = w.shape
        if k % 8:
            raise LowbitError(f"{self.name} encodes 8 columns at a time, got {k}")
        w = w.float()
        s = s.float().to(w.device).expand_as(w)
        imp = torch.ones_like(w) if importance is None else importance.float().to(w.device).expand_as(w)
        # sum imp (x - s c)^2 = sum imp s^2 (x / s - c)^2: a nearest search in units of the scale
        y = torch.where(s > 0, w / s.clamp_min(1e-30), torch.zeros_like(w))
        wt = imp.clamp_min(0.0) * s.square()
        codes, err = nearest(y.reshape(-1, 8), wt.reshape(-1, 8))
        return codes.reshape(rows, k // 8), err.reshape(rows, k // 8).sum(1, keepdim=True)

    def encode(self, w: torch.Tensor, params: Params, importance: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode_err(w, params["scale"], importance)[0]

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        rows, n = codes.shape
        vals = _codebook_on(codes.device)[codes].reshape(rows, n * 8)
        return vals * params["scale"].float()

    # ----- parameters -------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
        w = w.float()
        imp = torch.ones_like(w) if importance is None else importance.float().to(w.device).expand_as(w)
        base = w.square().mean(1, keepdim=True).sqrt() / _OPT_SCALE
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # scale, codes, error per row
        for step in range(len(_COARSE) + _LLOYD_STEPS):
            if step < len(_COARSE):
                s = base * _COARSE[step]
            else:  # Lloyd step: the least-squares scale of the best codes so far (re-encoding can only help)
                c = _codebook_on(w.device)[best[1]].reshape(w.shape)
                num, den = (imp * w * c).sum(1, keepdim=True), (imp * c * c).sum(1, keepdim=True)
                s = torch.where((num > 0) & (den > 0), num / den.clamp_min(1e-30), best[0])
            s = _fp16(s)
            best = keep_better(best, (s, *self._encode_err(w, s, importance)))
        return {"scale": best[0]}

    # ----- storage ----------------------------------------------------------------------------
    def storage_spec(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, cols = shape
        if cols % 8:
            raise LowbitError(f"{self.name} needs rows whose length is a multiple of 8, got {cols}")
        return {"codes": ((rows, cols // 8), torch.int16), "scale": ((rows, self.n_groups(cols)), torch.float16)}

    def pack(self, codes: torch.Tensor, params: Params, shape: tuple[int, int]) -> QuantizedTensor:
        spec = self.storage_spec(shape)
        codes = codes.to(torch.int64)
        if tuple(codes.shape) != spec["codes"][0] or codes.min() < 0 or codes.max() >= 1 << 16:
            raise LowbitError(f"{self.name}: codes {tuple(codes.shape)} do not fit weight shape {tuple(shape)}")
        return QuantizedTensor(self.name, tuple(shape), {"codes": to_stored(codes),
                                                         "scale": params["scale"].to(torch.float16).contiguous()})

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, Params]:
        return from_stored(qt.data["codes"]), {"scale": qt.data["scale"]}


_COARSE = (1.0, 0.9, 1.1)  # times rms / 1.03; with one Lloyd step as good as a 31-point grid (measured)
_LLOYD_STEPS = 1


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 65504.0).to(torch.float16).float()
