"""Orthogonal Hadamard-type matrices for rotations, for any width n = 2^k * m.

The 2^k part is a normalized Sylvester Hadamard matrix. For an odd factor m > 1 (e.g. 172 =
4 * 43, where no Hadamard matrix of order 43 exists) qbench uses a random orthogonal m x m
matrix (QR of a Gaussian) instead of QuaRot's tables of known Hadamard matrices of order 4m:
the Kronecker product H_{2^k} (x) R_m is orthogonal, which is all that losslessness needs, but
it spreads outliers less evenly than a true Hadamard matrix when m is large.
"""

from __future__ import annotations

import torch


def sylvester(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two sizes, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def random_orthogonal(m: int) -> torch.Tensor:
    """A random m x m orthogonal matrix (Haar, torch's global RNG), float64; [[1]] for m = 1."""
    q, r = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A (x) B orthogonal of size n: A Sylvester of the largest power of two in n."""
    power = n & -n
    return sylvester(power), random_orthogonal(n // power)


def kronecker_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ (a (x) b) along the last dimension without forming the Kronecker product."""
    blocks = x.reshape(*x.shape[:-1], a.shape[0], b.shape[0])
    return torch.einsum("...ij,ik,jl->...kl", blocks, a.to(x.dtype), b.to(x.dtype)).reshape(x.shape)


def random_hadamard(n: int) -> torch.Tensor:
    """QuaRot's randomized Hadamard: diag(random signs) @ (A (x) B), orthogonal, float64."""
    a, b = hadamard_factors(n)
    signs = torch.randint(0, 2, (n,), dtype=torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(a, b)
