"""Floating-point formats: FP8 (E4M3, E5M2), FP4 (E2M1), and block-scaled MXFP4 and NVFP4.

Every function takes a 2-D float tensor whose rows share the outermost scale and returns
its fake-quantized (quantized, then dequantized) values. Element rounding is
round-to-nearest, ties to even mantissa, saturating at the format's largest value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest binade (4 and 6)
MX_BLOCK, NV_BLOCK = 32, 16
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def round_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest value of the float8 `dtype` (torch's cast), saturating instead of NaN/inf."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype).to(x.dtype)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives; saturates at ±6."""
    magnitude = x.abs().clamp(max=E2M1_MAX)
    # Spacing of the grid: 0.5 below 2 (subnormals and the first binade), 1 in [2, 4), 2 above.
    step = torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=1))) - 1)
    return torch.sign(x) * torch.round(magnitude / step) * step


def element_rounding(name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(rounding function, largest value) of the element format 'e4m3', 'e5m2' or 'e2m1'."""
    if name == "e2m1":
        return round_e2m1, E2M1_MAX
    dtype = FP8_DTYPES[name]
    return (lambda x: round_fp8(x, dtype)), torch.finfo(dtype).max


def quantize_scaled_fp(rows: torch.Tensor, element: str, clip: float) -> torch.Tensor:
    """One FP32 scale per row, s = clip * max|x| / max_value; elements rounded to `element`."""
    rounding, max_value = element_rounding(element)
    scale = clip * rows.abs().amax(dim=1, keepdim=True) / max_value
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return rounding(rows / scale) * scale


def mx_scale(blocks: torch.Tensor) -> torch.Tensor:
    """OCP MX shared scale of each row of `blocks`: 2^(floor(log2 max|x|) - emax_elem).

    E8M0 holds exponents -127..127; an all-zero block gets 2^-127 (its values stay zero).
    """
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = torch.floor(torch.log2(amax)) - E2M1_EMAX
    return torch.exp2(exponent.clamp(-127, 127))


def quantize_mxfp4(rows: torch.Tensor) -> torch.Tensor:
    """MXFP4: blocks of 32 consecutive elements share a power-of-two (E8M0) scale.

    Elements are E2M1; as the OCP spec says, a block whose max|x| / scale exceeds 6 saturates.
    """
    blocks = rows.reshape(-1, MX_BLOCK)
    scale = mx_scale(blocks)
    return (round_e2m1(blocks / scale) * scale).reshape(rows.shape)


def nv_scales(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 (FP32 scale per row [n, 1], FP8 E4M3 scale per 16-block [n, blocks, 1]).

    The row scale maps the row's max|x| onto 448 * 6, the largest E4M3 block scale times the
    largest E2M1 element; each block scale, max|block| / (6 * row scale), is rounded to E4M3.
    """
    row_scale = rows.abs().amax(dim=1, keepdim=True) / (torch.finfo(torch.float8_e4m3fn).max * 6)
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    blocks = rows.reshape(rows.shape[0], -1, NV_BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = round_fp8(block_amax / (E2M1_MAX * row_scale[..., None]), torch.float8_e4m3fn)
    return row_scale, block_scale


def quantize_nvfp4(rows: torch.Tensor) -> torch.Tensor:
    """NVFP4: E2M1 elements, an E4M3 scale per 16-element block, an FP32 scale per row."""
    row_scale, block_scale = nv_scales(rows)
    scale = block_scale * row_scale[..., None]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    blocks = rows.reshape(rows.shape[0], -1, NV_BLOCK)
    return (round_e2m1(blocks / scale) * scale).reshape(rows.shape)
