"""Fake quantization: a tensor quantized and dequantized as its spec (qbench.quant.formats.spec)
says, by the arithmetic of each number format (qbench.quant.formats.integer and .fp)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qbench.quant.formats.fp import (
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_scaled_fp,
)
from qbench.quant.formats.integer import quantize_int, search_clip_int
from qbench.quant.formats.spec import FORMATS, TensorQuant

Arithmetic = Callable[[torch.Tensor, TensorQuant], torch.Tensor]


def int_clip(rows: torch.Tensor, spec: TensorQuant) -> float | torch.Tensor:
    """The clip ratio of an int spec on these rows: searched per row, or the spec's `clip`."""
    if not spec.clip_search:
        return spec.clip
    return search_clip_int(rows, spec.bits, spec.symmetric, spec.scale_rule, spec.clip_search_norm)


def _int(rows: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    return quantize_int(rows, spec.bits, spec.symmetric, int_clip(rows, spec), spec.scale_rule)


def _scaled_fp(element: str) -> Arithmetic:
    return lambda rows, spec: quantize_scaled_fp(rows, element, spec.clip)


# format name -> fake-quantizes a 2-D tensor whose rows are the spec's granularity units
ARITHMETIC: dict[str, Arithmetic] = {
    "int": _int,
    "fp8_e4m3": _scaled_fp("e4m3"),
    "fp8_e5m2": _scaled_fp("e5m2"),
    "fp4_e2m1": _scaled_fp("e2m1"),
    "mxfp4": lambda rows, spec: quantize_mxfp4(rows, spec.scale_rule),
    "nvfp4": lambda rows, spec: quantize_nvfp4(rows),
}
assert set(ARITHMETIC) == set(FORMATS), "every format of the spec's table has its arithmetic"


def fake_quant(x: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """Quantize and dequantize `x` as `spec` says; same shape and dtype as `x`.

    x: [..., tokens, features] (an activation: granularity tensor = one scale per sequence)
    or [rows, features] (a weight, or one sequence). Raises ValueError when a group or block
    does not divide the last dimension.
    """
    if spec.block is not None and x.shape[-1] % spec.block:
        what = "group" if spec.group else f"{spec.format} block"
        raise ValueError(f"{what} {spec.block} does not divide the last dimension {x.shape[-1]}")
    if spec.granularity == "tensor":
        rows = x.reshape(-1, x.shape[-2] * x.shape[-1]) if x.dim() > 2 else x.reshape(1, -1)
    elif spec.granularity == "group":
        rows = x.reshape(-1, spec.group)
    else:
        rows = x.reshape(-1, x.shape[-1])
    out = ARITHMETIC[spec.format](rows.float(), spec)
    return out.reshape(x.shape).to(x.dtype)
