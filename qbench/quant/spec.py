"""What to quantize a tensor to: format, bits, granularity, clipping; and `fake_quant`.

Granularity names the set of elements that share one scale, on a tensor whose last
dimension is the reduction (input) dimension of a linear layer:
- tensor: the whole tensor;
- channel: one output row of a weight;
- token: one row of activations (one token's hidden vector);
- group: `group` contiguous elements along the last dimension, within a row.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator

from qbench.config import StrictModel
from qbench.quant.integer import quantize_int


class TensorQuant(StrictModel):
    """Fake-quantization settings shared by weights and activations."""

    format: Literal["int"] = "int"
    bits: int
    symmetric: bool = True
    granularity: str
    group: int | None = None
    clip: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _group_implies_granularity(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("group") is not None and "granularity" not in data:
            return {**data, "granularity": "group"}
        return data

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int) -> int:
        if not 2 <= bits <= 8:
            raise ValueError("must be between 2 and 8")
        return bits

    @field_validator("clip")
    @classmethod
    def _clip_in_range(cls, clip: float) -> float:
        if not 0 < clip <= 1:
            raise ValueError("must be in (0, 1]: the fraction of the range kept")
        return clip

    @field_validator("group")
    @classmethod
    def _group_positive(cls, group: int | None) -> int | None:
        if group is not None and group < 1:
            raise ValueError("must be a positive number of elements")
        return group

    @model_validator(mode="after")
    def _group_matches_granularity(self) -> TensorQuant:
        if self.granularity == "group" and self.group is None:
            raise ValueError("granularity 'group' needs a group size: add group: <elements>")
        if self.granularity != "group" and self.group is not None:
            raise ValueError(f"group is set but granularity is '{self.granularity}'")
        return self

    def label(self) -> str:
        """Short human label, e.g. 'int4 g32 asym'."""
        parts = [f"{self.format}{self.bits}", f"g{self.group}" if self.group else self.granularity]
        if not self.symmetric:
            parts.append("asym")
        if self.clip < 1:
            parts.append(f"clip{self.clip:g}")
        return " ".join(parts)


class WeightQuant(TensorQuant):
    """Weights: quantized once; per output channel by default."""

    granularity: Literal["tensor", "channel", "group"] = "channel"


class ActivationQuant(TensorQuant):
    """Activations: quantized dynamically at every call; per token by default."""

    granularity: Literal["tensor", "token", "group"] = "token"


def divides_error(spec: TensorQuant, in_features: int) -> str | None:
    """Why `spec` cannot quantize an input of width `in_features`, or None if it can."""
    if spec.group is not None and in_features % spec.group:
        return f"group {spec.group} does not divide the input width {in_features}"
    return None


def fake_quant(x: torch.Tensor, spec: TensorQuant) -> torch.Tensor:
    """Quantize and dequantize `x` as `spec` says; same shape and dtype as `x`."""
    if spec.granularity == "tensor":
        rows = x.reshape(1, -1)
    elif spec.granularity == "group":
        if x.shape[-1] % spec.group:
            raise ValueError(f"group {spec.group} does not divide the last dimension {x.shape[-1]}")
        rows = x.reshape(-1, spec.group)
    else:
        rows = x.reshape(-1, x.shape[-1])
    out = quantize_int(rows.float(), spec.bits, spec.symmetric, spec.clip)
    return out.reshape(x.shape).to(x.dtype)
