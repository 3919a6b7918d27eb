"""Floating-point formats: FP8 (E4M3, E5M2), FP4 (E2M1), and block-scaled MXFP4 and NVFP4.

Every function takes a 2-D float tensor whose rows share the outermost scale and returns
its fake-quantized (quantized, then dequantized) values. Element rounding is
round-to-nearest, ties to even mantissa, saturating at the format's largest value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from qbench.quant.formats.spec import MX_BLOCK, NV_BLOCK

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest binade (4 and 6)
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def round_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest value of the float8 `dtype` (torch's cast), saturating instead of NaN/inf."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit).to(dtype).to(x.dtype)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 E2M1 value: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives; saturates at ±6."""
    magnitude = x.abs().clamp(max=E2M1_MAX)
    # Spacing of the grid: 0.5 below 2 (subnormals and the first binade), 1 in [2, 4), 2 above.
    step = torch.exp2((float_exponent(magnitude.clamp(min=1)) - 1).to(magnitude.dtype))
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


MxScaleRule = Literal["floor", "even"]
F32_MANTISSA_BITS, F32_EXPONENT_BIAS = 23, 127
E2M1_MANTISSA_BITS = 1
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127


def float_exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 |x|) of float32 values, read from their exponent bits (int32).

    Exact where float32 log2 is not: log2 of 2^k (1 - 2^-24) rounds to k. Zero and subnormals
    read -127 (the biased exponent 0), as torchao's MX code reads them.
    """
    bits = x.float().view(torch.int32)
    return ((bits >> F32_MANTISSA_BITS) & 0xFF) - F32_EXPONENT_BIAS


def mx_scale(blocks: torch.Tensor, rule: MxScaleRule = "floor") -> torch.Tensor:
    """The shared power-of-two (E8M0) scale of each row of `blocks` (float32 [..., 32]).

    "floor" (OCP MX v1.0, section 6.3): 2^(floor(log2 max|x|) - emax_elem), emax_elem = 2 for
    E2M1, so a block max in [4, 8) * 2^k gets scale 2^k and values above 6 * 2^k saturate.
    "even" (torchao's ScaleCalculationMode.EVEN, compressed-tensors' MX scales): max|x| is first
    rounded to E2M1's one mantissa bit (half up, on the float's bits), so a max in [7, 8) * 2^k
    gets 2^(k+1) instead of saturating. The exponent comes from the float's exponent bits
    (`float_exponent`), clamped to E8M0's -127..127; an all-zero block gets 2^-127.
    """
    amax = blocks.float().abs().amax(dim=-1, keepdim=True)
    if rule == "even":
        half_ulp = 1 << (F32_MANTISSA_BITS - E2M1_MANTISSA_BITS - 1)
        sign_and_exponent = ~((1 << F32_MANTISSA_BITS) - 1)
        amax = ((amax.view(torch.int32) + half_ulp) & sign_and_exponent).view(torch.float32)
    exponent = float_exponent(amax) - E2M1_EMAX
    return torch.exp2(exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT).float())


def quantize_mxfp4(rows: torch.Tensor, rule: MxScaleRule = "floor") -> torch.Tensor:
    """MXFP4: blocks of 32 consecutive elements share a power-of-two (E8M0) scale.

    Elements are E2M1; a block whose max|x| / scale exceeds 6 saturates (OCP spec). `rule`:
    see `mx_scale`.
    """
    blocks = rows.reshape(-1, MX_BLOCK)
    scale = mx_scale(blocks, rule).to(rows.dtype)
    return (round_e2m1(blocks / scale) * scale).reshape(rows.shape)


def nv_scales(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 (FP32 global scale per row [n, 1], E4M3 block scale per 16-block [n, blocks, 1]).

    As compressed-tensors computes them (generate_gparam, calculate_qparams): the global scale
    g = 448 * 6 / max|row| maps the row's max onto the largest E4M3 block scale times the
    largest E2M1 element (g = 1 where that overflows: a row of zeros); each block scale,
    g * max|block| / 6, is rounded to E4M3 (saturating at 448). A block scale that rounds to 0
    (block max at most 2^-10 * 6 / g) stays 0: `quantize_nvfp4` decodes that block to zeros.
    """
    global_scale = (FP8_E4M3_MAX * E2M1_MAX) / rows.abs().amax(dim=1, keepdim=True)
    global_scale = torch.where(global_scale.isfinite(), global_scale, torch.ones_like(global_scale))
    blocks = rows.reshape(rows.shape[0], -1, NV_BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = round_fp8(global_scale[..., None] * (block_amax / E2M1_MAX), torch.float8_e4m3fn)
    return global_scale, block_scale


def quantize_nvfp4(rows: torch.Tensor) -> torch.Tensor:
    """NVFP4: E2M1 elements, an E4M3 scale per 16-element block, an FP32 scale per row.

    x -> round_e2m1(x / s) * s with s = block scale / global scale (see `nv_scales`); a block
    whose E4M3 scale is 0 decodes to 0, as a zero scale does in the format.
    """
    global_scale, block_scale = nv_scales(rows)
    scale = block_scale / global_scale[..., None]
    blocks = rows.reshape(rows.shape[0], -1, NV_BLOCK)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # NaN stays NaN
    out = torch.where(scale == 0, torch.zeros_like(blocks), round_e2m1(blocks / safe) * safe)
    return out.reshape(rows.shape)
