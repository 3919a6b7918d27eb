"""Orthogonal Hadamard matrices for rotations, for any width n, and their fast application.

A width n is factored as n = p * m with p a power of two and m a "base" order, and rotated
by H_p (x) B_m: H_p the normalized Sylvester matrix (applied by the fast Walsh-Hadamard
transform, O(n log n)), B_m a dense normalized Hadamard matrix. The base is the smallest
order m = 4 * odd(n) * 2^i that one of these gives, in this order of preference:

1. compressed-tensors' table of Hadamard matrices (its hadamards.safetensors: every multiple
   of 4 up to 256, from N. J. A. Sloane's library, the source of QuaRot's and SpinQuant's
   tables too), through its public `random_hadamard_matrix` (seed 0, so the table's matrix
   with fixed row signs): 172 = 4 * 43 (stories260K, Llama-2-7B's 11008 = 64 * 172), 12, 28,
   108, ...;
2. a Paley construction for larger orders, which QuaRot's table lacks:
   Paley I: order q + 1 for a prime q = 3 (mod 4) (10944 = 16 * 684, q = 683);
   Paley II: order 2 (q + 1) for a prime q = 1 (mod 4) (29568 = 32 * 924, q = 461);
3. none: where n = 2 (mod 4) or n is odd (no Hadamard matrix of order n exists), or the odd
   part's multiples have neither, B is a random orthogonal matrix of the odd order (QR of a
   Gaussian, from the caller's generator): H_p (x) B is still orthogonal, which is all losslessness
   needs, but spreads outliers less evenly than a true Hadamard matrix.

`hadamard_construction(n)` names the matrix a width gets, e.g.
"sylvester(64) x compressed-tensors(172)"; `hadamard_factorization(n)` gives the parts (the
rotation notes them on its cell, so a rotated cell's record lists the matrix of each width).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib.metadata import version

import torch
from torch import nn

TABLE = "compressed-tensors"  # the construction name of a base from compressed-tensors' table
TABLE_SEED = 0  # the generator seed of the table matrices' row signs
FWHT_BLOCK = 64  # the fast transform's lowest levels, applied as one dense product


@dataclass(frozen=True)
class HadamardFactorization:
    """n = power * order: Sylvester H_power (x) a base factor of size `order`.

    construction: "sylvester" (order 1, n a power of two), "compressed-tensors" (the table),
    "paley-1" / "paley-2" (with prime `q`), or "random-orthogonal" (no Hadamard matrix).
    """

    n: int
    power: int
    order: int
    construction: str
    q: int | None = None

    def __str__(self) -> str:
        if self.order == 1:
            return f"sylvester({self.power})"
        base = f"{self.construction}({self.order}" + (f", q={self.q})" if self.q else ")")
        return base if self.power == 1 else f"sylvester({self.power}) x {base}"

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


@functools.lru_cache(maxsize=64)
def _table_matrix(order: int) -> torch.Tensor | None:
    """compressed-tensors' Hadamard matrix of this order (entries +-1, float64), if tabled.

    Called with order = 4 * odd: the helper finds it only as the table's entry of that order
    (it would build order * 2^j from a smaller entry, but the odd part fixes the entry).
    """
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    generator = torch.Generator().manual_seed(TABLE_SEED)
    try:
        return random_hadamard_matrix(order, torch.float64, gen=generator)
    except ValueError:  # "Cannot construct random hadamard matrix of size ..."
        return None


def hadamard_factorization(n: int) -> HadamardFactorization:
    """How a width-n rotation is built (see the module docstring); ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive width, not {n}")
    power_of_two = n & -n
    odd = n // power_of_two
    if odd == 1:
        return HadamardFactorization(n, n, 1, "sylvester")
    order = 4 * odd
    if order <= n and _table_matrix(order) is not None:
        return HadamardFactorization(n, n // order, order, TABLE)
    while order <= n:
        if paley := _paley(order):
            return HadamardFactorization(n, n // order, order, *paley)
        order *= 2
    return HadamardFactorization(n, power_of_two, odd, "random-orthogonal")


def hadamard_versions() -> dict[str, str]:
    """The package whose table the base matrices come from, with its version (for keys)."""
    return {"compressed-tensors": version("compressed-tensors")}


def hadamard_construction(n: int) -> str:
    """The matrix a width-n rotation gets, e.g. "sylvester(64) x compressed-tensors(172)",
    "sylvester(16) x paley-1(684, q=683)" or "sylvester(4) x random-orthogonal(43)"."""
    return str(hadamard_factorization(n))


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


def random_orthogonal(m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random m x m orthogonal matrix (Haar, drawn from `generator`, default torch's global
    RNG), float64; [[1]] for m = 1."""
    q, r = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=generator))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def base_factor(
    factorization: HadamardFactorization, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The dense, normalized base factor B (float64); random orthogonal ones are drawn from
    `generator` (default torch's global RNG)."""
    construction, order = factorization.construction, factorization.order
    if construction == "sylvester":
        return torch.ones(1, 1, dtype=torch.float64)
    if construction == "random-orthogonal":
        return random_orthogonal(order, generator)
    if construction == TABLE:
        return _table_matrix(order) / order**0.5
    assert factorization.q is not None
    return paley(construction, factorization.q)


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
    dense product. `random_signs`: QuaRot's randomized Hadamard (random +-1 signs). Random
    draws (signs, a random orthogonal base) come from `generator` (default torch's global
    RNG). `inverse(x)` = x @ M^T; `matrix()` = M, float64, to fold into weights.
    """

    def __init__(
        self, n: int, random_signs: bool = False, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.factorization = hadamard_factorization(n)
        self.register_buffer("base", base_factor(self.factorization, generator), persistent=False)
        signs = None
        if random_signs:
            signs = torch.randint(0, 2, (n,), dtype=torch.float64, generator=generator) * 2 - 1
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
