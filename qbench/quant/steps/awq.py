"""AWQ's step: activation-aware per-channel scaling and clip search (Lin et al. 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qbench.data.calibration import CalibrationSpec
from qbench.quant.steps.base import Transform, register_transform

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig


@register_transform("awq")
class AWQ(Transform):
    """AWQ's scale search (and, with `clip`, its clip search) for the quantizer's weights
    (qbench.quant.methods.awq, after llm-awq's auto_scale / auto_clip).

    grid: ratios searched (the reference's 20); duo_scaling: llm-compressor's s = x^r / w^(1-r);
    clip / max_shrink: the clip search and the largest fraction of a group's max it may cut.
    """

    transform: Literal["awq"] = "awq"
    grid: int = Field(default=20, ge=2)
    duo_scaling: bool = False
    clip: bool = True
    max_shrink: float = Field(default=0.5, gt=0, lt=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        weights = quantizer.weights
        if weights is None or quantizer.rounding.library:
            return "awq searches scales for the weights it rounds: set weights: (not a library)"
        if weights.granularity == "tensor":
            return "awq scales per channel and group: use weights granularity channel or group"
        return None

    def is_lossless(self) -> bool:
        return not self.clip  # the scaling is lossless; clipping changes the weights

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.awq import awq

        ids = context.calibration_ids(self.calibration, "awq")
        awq(context.model, ids, self.calibration.batch_size, context.quantizer.weights,
            self.grid, self.duo_scaling, self.clip, self.max_shrink)  # fmt: skip
