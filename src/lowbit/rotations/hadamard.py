"""Randomized Hadamard transforms of any size used by real models.

``n = 2^k * m``: the power-of-two part uses the fast Walsh-Hadamard transform (O(n log n)); the remaining factor
``m`` uses a Hadamard matrix when we can build one of that order (Paley I for prime m-1, then Sylvester doubling:
12, 20, 24, 40, 44, ...), else a seeded random orthogonal matrix (QuIP-style Kronecker factor). With random
signs in front, the transform is

    R = (F_m kron H_{2^k}) diag(s),     orthonormal, stored as (n, seed, layout) only.

``layout`` fixes how n splits into m * 2^k. A dense factor costs m^2 entries and m multiply-adds per element at
run time. Layout 1 took the smallest m with a Hadamard matrix however large: for 11008 = 43 * 2^8 that is a
Paley matrix of order 5504 (30M entries, 60 MB read per call in float16, which made a rotated 7B decode step
slower than fp16). Layout 2 caps m at :data:`MAX_DENSE` and otherwise takes the odd part with a random orthogonal
factor (11008 -> 43 x 256); the sizes of the usual models below that cap split as before. Layout 3 (:data:`LAYOUT`,
what new rotations use) drops the dense factor where the power of two in n is at least :data:`MIN_BLOCK`: m
is then the odd part and F_m the identity, so R is block-diagonal, m FWHT blocks of 2^k with random signs (11008 ->
43 blocks of 256, 14336 -> 7 of 2048, 1536 -> 3 of 512), which costs a decode step no matmul; smaller blocks mixed
too little on the bundled model (576 -> 9 blocks of 64 rounded worse than 72 x 8), so such sizes split as in
layout 2 (docs/formats.md, "The dense factor of a transform"). Checkpoints record the layout their rotations were
made with.

``apply(x)`` computes ``x @ R.T`` along the last dimension and ``inverse(y)`` computes ``y @ R``; so for a
linear layer ``y = x W^T``, using ``W' = W R^T`` and ``x' = x R^T`` gives ``x' W'^T = x W^T`` exactly.
"""

from __future__ import annotations

import math
from functools import cache

import torch


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 as float32 for the transforms (see :func:`fwht`), other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dimension (a power of two). fp16/bf16 inputs are
    transformed in float32: the unnormalized butterflies grow by up to 2^stages, so fp16 would round at every stage
    and can overflow on activations of a few thousand (SmolLM2 has such channels)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    shape = x.shape
    y = _wide(x.reshape(-1, n))
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(n)).to(x.dtype)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


@cache
def hadamard_matrix(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m (entries +-1, H H^T = m I) by Sylvester/Paley I, or None if not built."""
    if m == 1:  # explicit device and dtype: the cache outlives any caller's defaults (transformers builds on meta)
        return torch.ones(1, 1, dtype=torch.float32, device="cpu")
    if m % 2 == 0 and (m & (m - 1)) == 0:
        h = hadamard_matrix(m // 2)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    q = m - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 3:  # Paley construction I
        residues = {(i * i) % q for i in range(1, q)}
        chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
        Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float32, device="cpu")
        S = torch.zeros(m, m, dtype=torch.float32, device="cpu")
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return S + torch.eye(m, dtype=torch.float32, device="cpu")
    if m % 2 == 0:  # m = 2 * m', Sylvester doubling of a smaller Paley matrix
        h = hadamard_matrix(m // 2)
        if h is not None:
            return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return None


LAYOUT = 3  # the layout of new rotations
LAYOUTS = (1, 2, 3)
BLOCK_DIAGONAL = 3  # the layout without a dense factor where the FWHT blocks are large enough
MAX_DENSE = 256  # layout 2: the largest order of the dense factor
MIN_BLOCK = 256  # layout 3: the smallest FWHT block that goes without a dense factor


def _blockwise(n: int, layout: int) -> bool:
    """Whether size n in this layout is block-diagonal (m blocks of the largest power of two dividing n)."""
    return layout == BLOCK_DIAGONAL and (n & -n) >= MIN_BLOCK


def _split(n: int, layout: int = 1) -> tuple[int, int]:
    """n = m * 2^k with the smallest m whose factor we can build as a Hadamard matrix (layouts 2 and 3: of order at
    most MAX_DENSE), else the odd part; the odd part where layout 3 goes without the factor (:func:`_blockwise`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown rotation layout {layout!r}; known: {LAYOUTS}")
    k = (n & -n).bit_length() - 1
    odd = n >> k
    if _blockwise(n, layout):
        return odd, n // odd
    for j in range(k + 1):  # move powers of two into m until a Hadamard matrix of order m exists
        m = odd << j
        if layout >= 2 and m > MAX_DENSE:
            break
        if hadamard_matrix(m) is not None:
            return m, n // m
    return odd, n // odd


class RandomizedHadamard:
    """The orthonormal transform R = (F_m kron H_p) diag(signs) for a length n, determined by (n, seed, layout)."""

    def __init__(self, n: int, seed: int = 0, layout: int = 1):
        if n < 1:
            raise ValueError(f"rotation size must be positive, got {n}")
        self.n, self.seed, self.layout = n, seed, layout
        self.m, self.p = _split(n, layout)
        g = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (n,), generator=g, device="cpu").float() * 2 - 1  # CPU, float32 always
        blockwise = _blockwise(n, layout)
        self.dense = not blockwise and self.m > 1  # whether F_m is more than the identity
        if blockwise:
            self.factor = torch.eye(self.m)
            self.kind = f"{self.m} blocks of fwht {self.p}" if self.m > 1 else f"fwht {self.p}"
        elif (h := hadamard_matrix(self.m)) is not None:
            self.factor = h / math.sqrt(self.m)
            self.kind = f"hadamard {self.m} x fwht {self.p}"
        else:  # QuIP: a random orthogonal Kronecker factor where no Hadamard matrix of order m is known
            q, r = torch.linalg.qr(torch.randn(self.m, self.m, generator=g, dtype=torch.float64, device="cpu"))
            self.factor = (q * torch.sign(torch.diagonal(r))).float()
            self.kind = f"random orthogonal {self.m} x fwht {self.p}"

    def _kron(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        # index i = a * p + b  (a < m, b < p): apply factor on a, Hadamard on b; fp16/bf16 in float32 throughout
        # (see fwht), rounded once at the end, as the Triton kernel does
        y = fwht(_wide(x.reshape(*x.shape[:-1], self.m, self.p)))
        if self.dense:
            y = torch.einsum("ij,...jb->...ib", factor.to(y), y)
        return y.reshape(x.shape).to(x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R^T along the last dimension."""
        self._check(x)
        return self._kron(x * self.signs.to(x), self.factor)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y @ R (the inverse, R being orthogonal)."""
        self._check(y)
        return self._kron(y, self.factor.t()) * self.signs.to(y)

    def matrix(self) -> torch.Tensor:
        """R as a dense [n, n] matrix (tests and small sizes only)."""
        return self.apply(torch.eye(self.n)).t()

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"last dimension {x.shape[-1]} != rotation size {self.n}")
