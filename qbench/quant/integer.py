"""Integer round-to-nearest fake quantization, one scale (and zero point) per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntGrid:
    """Integer grid per row: x -> (clamp(round(x / scale) + zero, low, high) - zero) * scale."""

    scale: torch.Tensor  # [rows, 1]
    zero: torch.Tensor | float
    low: int
    high: int

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x` ([rows, k], or [rows] for one column) onto the grid."""
        scale, zero = self.scale, self.zero
        if x.dim() == 1:
            scale = scale[:, 0]
            zero = zero[:, 0] if isinstance(zero, torch.Tensor) else zero
        return (torch.clamp(torch.round(x / scale) + zero, self.low, self.high) - zero) * scale


def int_grid(rows: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor) -> IntGrid:
    """The grid of each row of a 2-D float tensor at `bits` bits.

    Symmetric: s = clip * max|x| / (2^(b-1) - 1) over [-2^(b-1), 2^(b-1) - 1], no zero point.
    Asymmetric: the row's range [min(x, 0), max(x, 0)], shrunk by `clip`, maps onto
    [0, 2^b - 1] with an integer zero point. A row of zeros gets scale 1.
    `clip` is one ratio, or one per row ([rows, 1]).
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = clip * rows.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return IntGrid(scale, 0.0, -qmax - 1, qmax)
    qmax = 2**bits - 1
    low = clip * rows.amin(dim=1, keepdim=True).clamp(max=0)
    high = clip * rows.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return IntGrid(scale, torch.round(-low / scale), 0, qmax)


def quantize_int(
    rows: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor
) -> torch.Tensor:
    """Fake-quantize each row onto its `int_grid`; rounding is half-to-even (torch.round)."""
    return int_grid(rows, bits, symmetric, clip).round(rows)


def search_clip_int(
    rows: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, max_shrink: float = 0.8
) -> torch.Tensor:
    """Per-row clip ratio in {1, 1 - 1/grid, ...} (down to 1 - max_shrink) that minimizes the
    squared rounding error of the row: the grid search of GPTQ's and QuaRot's quantizers."""
    best_clip = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    best_error = torch.full_like(best_clip, float("inf"))
    for step in range(int(max_shrink * grid)):
        clip = 1 - step / grid
        error = (quantize_int(rows, bits, symmetric, clip) - rows).pow(2).sum(1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, torch.full_like(best_clip, clip), best_clip)
    return best_clip
