"""Orthogonal Hadamard matrices for rotations, for any width n, and their fast application.

A width n is factored as n = p * m with p a power of two and m a small "base" order, and
rotated by H_p (x) B_m: H_p the normalized Sylvester matrix (applied by the fast
Walsh-Hadamard transform, O(n log n)), B_m a dense normalized Hadamard matrix built by one of
Paley's constructions, as QuaRot's small tables of Hadamard matrices do:

- Paley I: order q + 1 for a prime q = 3 (mod 4) (12 = 11 + 1, 20, 24, 44, 48, 60, 68, ...);
- Paley II: order 2 (q + 1) for a prime q = 1 (mod 4) (28 = 2 * 14 with q = 13, 36, 76, ...).

`hadamard_factorization(n)` picks the smallest base m * 2^i (i >= 2, at most
`MAX_BASE_ORDER`) with a construction, where m is the odd part of n: 192 = 16 * 12 (Paley I),
768 = 64 * 12, 14336 = 512 * 28 (Paley II), 13824 = 128 * 108. Where none applies -- the odd
part's multiples have no Paley order (172 = 4 * 43 of stories260K, 11008 = 256 * 43 of
Llama-2-7B; QuaRot ships a hand-made H_172 there), n = 2 mod 4 (no Hadamard matrix exists) or n
is odd -- B is a random orthogonal matrix of the odd order m (QR of a Gaussian): H_p (x) B is
still orthogonal, which is all losslessness needs, but spreads outliers less evenly than a
true Hadamard matrix. `str(hadamard_factorization(n))` says which construction n got.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

MAX_BASE_ORDER = 256  # largest dense base factor; its product costs `order` MACs per element
FWHT_BLOCK = 64  # the fast transform's lowest levels, applied as one dense product


@dataclass(frozen=True)
class HadamardFactorization:
    """n = power * order: Sylvester H_power (x) a base factor of size `order`.

    construction: "sylvester" (order 1, n a power of two), "paley-1" / "paley-2" (with prime
    `q`), or "random-orthogonal" (no Hadamard construction for this n).
    """

    n: int
    power: int
    order: int
    construction: str
    q: int | None = None

    def __str__(self) -> str:
        if self.order == 1:
            return f"{self.n} = sylvester({self.power})"
        base = f"{self.construction}({self.order}" + (f", q={self.q})" if self.q else ")")
        return f"{self.n} = sylvester({self.power}) x {base}"

    @property
    def is_hadamard(self) -> bool:
        """Whether the product is a true (normalized) Hadamard matrix, entries +-1/sqrt(n)."""
        return self.construction != "random-orthogonal"


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(order: int) -> tuple[str, int] | None:
    """(construction, q) of a Paley Hadamard matrix of this order, if one exists."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "paley-1", order - 1
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "paley-2", order // 2 - 1
    return None


def hadamard_factorization(n: int) -> HadamardFactorization:
    """How a width-n rotation is built (see the module docstring)."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive width, not {n}")
    power_of_two = n & -n
    odd = n // power_of_two
    if odd == 1:
        return HadamardFactorization(n, n, 1, "sylvester")
    order = 4 * odd
    while order <= min(n, MAX_BASE_ORDER):
        if paley := _paley(order):
            return HadamardFactorization(n, n // order, order, *paley)
        order *= 2
    return HadamardFactorization(n, power_of_two, odd, "random-orthogonal")


def sylvester(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two sizes, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character of the integers mod prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q].double()


def paley(construction: str, q: int) -> torch.Tensor:
    """The Paley I (order q + 1) or II (order 2 (q + 1)) Hadamard matrix / sqrt(order)."""
    jacobsthal, ones = _jacobsthal(q), torch.ones(q, dtype=torch.float64)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[1:, 1:], core[0, 1:] = jacobsthal, ones
    if construction == "paley-1":  # skew conference matrix S; H = I + S
        core[1:, 0] = -ones
        h = torch.eye(q + 1, dtype=torch.float64) + core
    else:  # symmetric conference matrix C; H = C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]
        core[1:, 0] = ones
        h = torch.kron(core, torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64))
        h += torch.kron(
            torch.eye(q + 1, dtype=torch.float64),
            torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64),
        )
    return h / h.shape[0] ** 0.5


def random_orthogonal(m: int) -> torch.Tensor:
    """A random m x m orthogonal matrix (Haar, torch's global RNG), float64; [[1]] for m = 1."""
    q, r = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def base_factor(factorization: HadamardFactorization) -> torch.Tensor:
    """The dense base factor B (float64); random orthogonal ones use torch's global RNG."""
    if factorization.construction == "sylvester":
        return torch.ones(1, 1, dtype=torch.float64)
    if factorization.construction == "random-orthogonal":
        return random_orthogonal(factorization.order)
    assert factorization.q is not None
    return paley(factorization.construction, factorization.q)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ sylvester(n) along the last dimension (n a power of two) in O(n log n).

    The fast Walsh-Hadamard transform, pure torch (runs on any device): H_n = H_{n/b} (x) H_b,
    the H_b of the lowest log2(b) levels as one dense product (b = min(n, FWHT_BLOCK): on CPU
    a small matmul beats that many elementwise passes), then the butterfly (a + b, a - b) for
    each level above. bench/hadamard_bench.py times it against the dense n x n product.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power-of-two width, not {n}")
    block = min(n, FWHT_BLOCK)
    y = x.reshape(*x.shape[:-1], n // block, block) @ _sylvester_on(block, x.device, x.dtype)
    half = block
    while half < n:
        pairs = y.reshape(*x.shape[:-1], n // (2 * half), 2, half)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        y, half = torch.stack((low + high, low - high), dim=-2), half * 2
    return y.reshape(x.shape) / (n // block) ** 0.5


@functools.lru_cache(maxsize=32)
def _sylvester_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return sylvester(n).to(device=device, dtype=dtype)


def kronecker_apply(x: torch.Tensor, power: int, base: torch.Tensor) -> torch.Tensor:
    """x @ (sylvester(power) (x) base) along the last dimension, without forming the product."""
    if base.shape[0] == 1:  # n is a power of two (base [[1]])
        return fwht(x)
    blocks = x.reshape(*x.shape[:-1], power, base.shape[0]) @ base.to(x)
    if power > 1:
        blocks = fwht(blocks.transpose(-1, -2)).transpose(-1, -2)
    return blocks.reshape(x.shape)


class HadamardTransform(nn.Module):
    """x -> x @ M along the last dimension, M = diag(signs) (H_p (x) B) orthogonal, n x n.

    H_p goes through the fast Walsh-Hadamard transform, B (see `hadamard_factorization`) is a
    dense product. `random_signs`: QuaRot's randomized Hadamard (random +-1 signs, torch's
    global RNG). `inverse(x)` = x @ M^T; `matrix()` = M, float64, to fold into weights.
    """

    def __init__(self, n: int, random_signs: bool = False) -> None:
        super().__init__()
        self.factorization = hadamard_factorization(n)
        self.register_buffer("base", base_factor(self.factorization), persistent=False)
        signs = torch.randint(0, 2, (n,), dtype=torch.float64) * 2 - 1 if random_signs else None
        self.register_buffer("signs", signs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = x * self.signs.to(x)
        return kronecker_apply(x, self.factorization.power, self.base.to(x))

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        y = kronecker_apply(x, self.factorization.power, self.base.T.to(x))  # H_p symmetric
        return y * self.signs.to(x) if self.signs is not None else y

    def matrix(self) -> torch.Tensor:
        m = torch.kron(sylvester(self.factorization.power).to(self.base.device), self.base)
        return self.signs[:, None] * m if self.signs is not None else m

    def extra_repr(self) -> str:
        return f"{self.factorization}" + (", random signs" if self.signs is not None else "")
