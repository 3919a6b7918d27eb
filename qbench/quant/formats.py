"""The number formats a tensor can be quantized to, by name (`format:` in a recipe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qbench.quant.fp import MX_BLOCK, NV_BLOCK, quantize_mxfp4, quantize_nvfp4, quantize_scaled_fp
from qbench.quant.integer import quantize_int, search_clip_int
from qbench.registry import Registry

if TYPE_CHECKING:
    from qbench.quant.spec import TensorQuant


@dataclass(frozen=True)
class Format:
    """A number format.

    bits: None when the spec chooses it (int). block: elements sharing one fixed-size block
    scale (MX, NV), else None and one scale per granularity unit, shrunk by `clip`.
    quantize: fake-quantizes a 2-D tensor whose rows are the spec's granularity units.
    """

    bits: int | None
    block: int | None
    quantize: Callable[[torch.Tensor, TensorQuant], torch.Tensor]


FORMATS: Registry[Format] = Registry("number format")


def int_clip(rows: torch.Tensor, spec: TensorQuant) -> float | torch.Tensor:
    """The clip ratio of an int spec on these rows: searched per row, or the spec's `clip`."""
    if not spec.clip_search:
        return spec.clip
    return search_clip_int(rows, spec.bits, spec.symmetric, spec.scale_rule, spec.clip_search_norm)


def _int(rows: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    return quantize_int(rows, spec.bits, spec.symmetric, int_clip(rows, spec), spec.scale_rule)


def _scaled_fp(element: str) -> Callable[[torch.Tensor, TensorQuant], torch.Tensor]:
    return lambda rows, spec: quantize_scaled_fp(rows, element, spec.clip)


FORMATS.register("int")(Format(None, None, _int))
FORMATS.register("fp8_e4m3")(Format(8, None, _scaled_fp("e4m3")))
FORMATS.register("fp8_e5m2")(Format(8, None, _scaled_fp("e5m2")))
FORMATS.register("fp4_e2m1")(Format(4, None, _scaled_fp("e2m1")))
FORMATS.register("mxfp4")(
    Format(4, MX_BLOCK, lambda rows, spec: quantize_mxfp4(rows, spec.scale_rule))
)
FORMATS.register("nvfp4")(Format(4, NV_BLOCK, lambda rows, spec: quantize_nvfp4(rows)))
