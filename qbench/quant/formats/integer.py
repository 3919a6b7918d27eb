"""Integer round-to-nearest fake quantization, one scale (and zero point) per row.

Two conventions for the symmetric scale (`scale_rule` of a recipe's int spec):
- "qmax": s = absmax / (2^(b-1) - 1), so absmax maps onto 2^(b-1) - 1 (QuaRot's and
  SmoothQuant's quantizers; -2^(b-1) is reached only by clipped values);
- "half-range": s = absmax / ((2^b - 1) / 2), half the width of the grid (GPTQ's quant.py with
  zero point 2^(b-1), compressed-tensors, vLLM, torchao's MappingType.SYMMETRIC); a positive
  absmax lands on 2^(b-1) - 1/2 and rounds to 2^(b-1) - 1 (ties to even, then clamped).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from qbench.quant.formats.spec import CLIP_SEARCH_NORM

IntScaleRule = Literal["qmax", "half-range"]
CLIP_SEARCH_GRID = 100  # GPTQ's quant.py: grid=100, maxshrink=0.8, norm=2.4
CLIP_SEARCH_MAX_SHRINK = 0.8
SEARCH_CHUNK = 1 << 20  # elements of a batch of rows the clip search evaluates at once
SCREEN_WIDTH = 1024  # rows this long (and symmetric) are screened by histogram first
SCREEN_BINS_PER_STEP = 64  # the screen's nodes per step of the grid (16320 at 8 bits)
SCREEN_MIN_BINS = 4096  # and at least this many over the row's unclipped grid
SCREEN_BAND = 2e-3  # ratios within this of the smallest estimate are computed exactly
SCREENED_ROWS = 4  # pairs (row, ratio) computed at once: this many times a batch's rows


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
        q = torch.div(x, scale).round_().add_(zero).clamp_(self.low, self.high)  # in place:
        return q.sub_(zero).mul_(scale)  # one buffer, not six (same operations, same bits)


def int_grid(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: float | torch.Tensor,
    scale_rule: IntScaleRule = "qmax",
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> IntGrid:
    """The grid of each row of a 2-D float tensor at `bits` bits.

    Symmetric: s = clip * max|x| / d over [-2^(b-1), 2^(b-1) - 1], no zero point, with
    d = 2^(b-1) - 1 (`scale_rule` "qmax") or (2^b - 1) / 2 ("half-range"; see the module).
    Asymmetric: the row's range [min(x, 0), max(x, 0)], shrunk by `clip`, maps onto
    [0, 2^b - 1] with an integer zero point round(-min / s). A row of zeros gets scale 1.
    `clip` is one ratio, or one per row ([rows, 1]); `ranges`: the rows' `row_ranges`, when
    the caller has them (the clip search, for every ratio).
    """
    low, high = ranges if ranges is not None else row_ranges(rows, symmetric)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        divisor = (2**bits - 1) / 2 if scale_rule == "half-range" else qmax
        scale = clip * high / divisor
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return IntGrid(scale, 0.0, -qmax - 1, qmax)
    qmax = 2**bits - 1
    low, high = clip * low, clip * high
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return IntGrid(scale, torch.round(-low / scale), 0, qmax)


def row_ranges(rows: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) [rows, 1] of each row's grid before the clip: (-max|x|, max|x|), or
    asymmetric (min(x, 0), max(x, 0))."""
    if symmetric:
        absmax = rows.abs().amax(dim=1, keepdim=True)
        return -absmax, absmax
    return rows.amin(dim=1, keepdim=True).clamp(max=0), rows.amax(dim=1, keepdim=True).clamp(min=0)


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

    Fast and equal to that loop: rows are searched in batches of about SEARCH_CHUNK elements,
    all ratios of a batch while it is in cache, each ratio's error computed as the loop
    computes it. Symmetric rows of SCREEN_WIDTH elements or more are first screened: every
    ratio's error estimated from the row's histogram (`screened_errors`: one pass over the
    row and one matrix product, where the loop takes one pass per ratio), and only the
    ratios within SCREEN_BAND of the row's smallest estimate are computed exactly. The
    screen's error (at most 2.2e-4 relative at 3 and 4 bits, 5.2e-4 at 8 bits, on Gaussian
    and Student-t rows of 4096) is well inside the band, so the choice is the loop's
    (tests/test_formats compares them).
    """
    ratios = [1 - step / grid for step in range(int(max_shrink * grid))]
    clips = torch.tensor(ratios, dtype=rows.dtype, device=rows.device)
    errors = torch.full(
        (rows.shape[0], len(ratios)), float("inf"), dtype=rows.dtype, device=rows.device
    )
    per = max(1, SEARCH_CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], per):
        x = rows[start : start + per]
        ranges = row_ranges(x, symmetric)
        if symmetric and rows.shape[1] >= SCREEN_WIDTH:
            estimate = screened_errors(x, ranges[1], bits, scale_rule, norm, ratios)
            screened = estimate <= estimate.amin(dim=1, keepdim=True) * (1 + SCREEN_BAND)
            pairs = screened.nonzero()  # [pairs, 2]: the (row, ratio) pairs computed exactly
            for batch in pairs.split(SCREENED_ROWS * per):  # bounded, though ties can screen in
                # every ratio of a row (a row of zeros: 80 pairs)
                row, g = batch.unbind(1)
                bounds = (ranges[0][row], ranges[1][row])
                errors[start + row, g] = _clip_errors(x[row], bits, symmetric, clips[g, None],
                                                      scale_rule, bounds, norm)  # fmt: skip
            continue
        for g, clip in enumerate(ratios):
            errors[start : start + per, g] = _clip_errors(x, bits, symmetric, clip, scale_rule,
                                                          ranges, norm)  # fmt: skip
    best = errors.argmin(dim=1, keepdim=True)  # the first smallest, as the loop keeps it
    return clips[best]


def _clip_errors(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: float | torch.Tensor,
    scale_rule: IntScaleRule,
    ranges: tuple[torch.Tensor, torch.Tensor],
    norm: float,
) -> torch.Tensor:
    """sum |q(x) - x|^norm [rows] of each row on its grid clipped by `clip` (one, or [rows, 1])."""
    rounded = int_grid(rows, bits, symmetric, clip, scale_rule, ranges).round(rows)
    return rounded.sub_(rows).abs_().pow_(norm).sum(1)  # (in place: a fresh buffer)


def screened_errors(
    rows: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    scale_rule: IntScaleRule,
    norm: float,
    ratios: list[float],
) -> torch.Tensor:
    """[rows, ratios] estimates of sum |q_c(x) - x|^norm for a symmetric grid: with s the
    unclipped scale and u = x / s in [-d, d], q_c(x) - x = s (c clamp(round(u / c)) - u), so
    the error is s^norm times a sum of one function of u per ratio. Each row's u are spread
    over `screen_bins(bits)` nodes (linear interpolation weights); the sums are then one
    product with that function's table at the nodes (float64, cached per grid)."""
    qmax = 2 ** (bits - 1) - 1
    divisor = (2**bits - 1) / 2 if scale_rule == "half-range" else qmax
    scale = absmax / divisor  # [rows, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    bins = screen_bins(bits)
    position = torch.div(rows, scale).float()  # u, then its place among the nodes, in place
    position.add_(divisor).mul_((bins - 1) / (2 * divisor)).clamp_(0, bins - 1)
    low = position.long().clamp_(max=bins - 2)  # the node below (a floor: position >= 0)
    weight = position.sub_(low)  # the node above's share
    histogram = torch.zeros(rows.shape[0], bins, device=rows.device)  # [rows, bins]
    histogram.scatter_add_(1, low, 1 - weight)
    histogram[:, 1:].scatter_add_(1, low, weight)  # at low + 1
    table = _error_table(bits, divisor, norm, tuple(ratios)).to(rows.device)
    sums = histogram @ table  # [rows, ratios]
    return sums * scale.float().pow(norm)


def screen_bins(bits: int) -> int:
    """The screen's nodes over a `bits`-bit grid: SCREEN_BINS_PER_STEP per step of its
    2^bits - 1, at least SCREEN_MIN_BINS (the estimate's error follows the nodes per step;
    the histogram's product costs rows x nodes x ratios)."""
    return max(SCREEN_MIN_BINS, SCREEN_BINS_PER_STEP * (2**bits - 1))


@functools.lru_cache(maxsize=16)
def _error_table(bits: int, divisor: float, norm: float, ratios: tuple[float, ...]) -> torch.Tensor:
    """|c clamp(round(u / c), -2^(b-1), 2^(b-1) - 1) - u|^norm at screen_bins(b) nodes u spread
    evenly over [-divisor, divisor], one column per ratio c (float32 of float64 values)."""
    qmax = 2 ** (bits - 1) - 1
    u = torch.linspace(-divisor, divisor, screen_bins(bits), dtype=torch.float64)[:, None]
    c = torch.tensor(ratios, dtype=torch.float64)[None]
    levels = torch.clamp(torch.round(u / c), -qmax - 1, qmax)
    return (levels * c - u).abs().pow(norm).float()
