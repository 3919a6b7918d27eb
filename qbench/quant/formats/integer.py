"""Integer round-to-nearest fake quantization, one scale (and zero point) per row.

Two conventions for the symmetric scale (`scale_rule` of a recipe's int spec):
- "qmax": s = absmax / (2^(b-1) - 1), so absmax maps onto 2^(b-1) - 1 (QuaRot's and
  SmoothQuant's quantizers; -2^(b-1) is reached only by clipped values);
- "half-range": s = absmax / ((2^b - 1) / 2), half the width of the grid (GPTQ's quant.py with
  zero point 2^(b-1), compressed-tensors, vLLM, torchao's MappingType.SYMMETRIC); a positive
  absmax lands on 2^(b-1) - 1/2 and rounds to 2^(b-1) - 1 (ties to even, then clamped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qbench.quant.formats.spec import CLIP_SEARCH_NORM

IntScaleRule = Literal["qmax", "half-range"]
CLIP_SEARCH_GRID = 100  # GPTQ's quant.py: grid=100, maxshrink=0.8, norm=2.4
CLIP_SEARCH_MAX_SHRINK = 0.8


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


def int_grid(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: float | torch.Tensor,
    scale_rule: IntScaleRule = "qmax",
) -> IntGrid:
    """The grid of each row of a 2-D float tensor at `bits` bits.

    Symmetric: s = clip * max|x| / d over [-2^(b-1), 2^(b-1) - 1], no zero point, with
    d = 2^(b-1) - 1 (`scale_rule` "qmax") or (2^b - 1) / 2 ("half-range"; see the module).
    Asymmetric: the row's range [min(x, 0), max(x, 0)], shrunk by `clip`, maps onto
    [0, 2^b - 1] with an integer zero point round(-min / s). A row of zeros gets scale 1.
    `clip` is one ratio, or one per row ([rows, 1]).
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        divisor = (2**bits - 1) / 2 if scale_rule == "half-range" else qmax
        scale = clip * rows.abs().amax(dim=1, keepdim=True) / divisor
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return IntGrid(scale, 0.0, -qmax - 1, qmax)
    qmax = 2**bits - 1
    low = clip * rows.amin(dim=1, keepdim=True).clamp(max=0)
    high = clip * rows.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return IntGrid(scale, torch.round(-low / scale), 0, qmax)


def quantize_int(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: float | torch.Tensor,
    scale_rule: IntScaleRule = "qmax",
) -> torch.Tensor:
    """Fake-quantize each row onto its `int_grid`; rounding is half-to-even (torch.round)."""
    return int_grid(rows, bits, symmetric, clip, scale_rule).round(rows)


def search_clip_int(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_rule: IntScaleRule = "qmax",
    norm: float = CLIP_SEARCH_NORM,
    grid: int = CLIP_SEARCH_GRID,
    max_shrink: float = CLIP_SEARCH_MAX_SHRINK,
) -> torch.Tensor:
    """Per-row clip ratio [rows, 1] that minimizes sum |q(x) - x|^norm over the row.

    The grid search of GPTQ's quant.py (`Quantizer.find_params` with mse=True) and QuaRot's
    WeightQuantizer: ratios 1, 1 - 1/grid, ... (int(max_shrink * grid) of them, down to
    1 - (that - 1)/grid), first best kept; the shrunk range gets its own scale and, when
    asymmetric, a recomputed zero point (as `int_grid` computes them). Defaults: theirs
    (norm 2.4, grid 100, max_shrink 0.8); norm 2 is the squared error.
    """
    best_clip = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    best_error = torch.full_like(best_clip, float("inf"))
    for step in range(int(max_shrink * grid)):
        clip = 1 - step / grid
        rounded = quantize_int(rows, bits, symmetric, clip, scale_rule)
        error = (rounded - rows).abs().pow(norm).sum(1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, torch.full_like(best_clip, clip), best_clip)
    return best_clip
