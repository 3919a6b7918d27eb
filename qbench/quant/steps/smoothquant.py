"""SmoothQuant's step: migrate activation outliers into the weights (Xiao et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qbench.data.calibration import CalibrationSpec
from qbench.quant.steps.base import Transform, register_transform

if TYPE_CHECKING:
    from qbench.quant.context import StepContext


@register_transform("smoothquant")
class SmoothQuant(Transform):
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel of every residual norm's
    readers, folded into the norm (1/s) and the readers' columns (s): lossless in float
    (qbench.quant.methods.smoothquant). alpha: the migration strength (the paper's 0.5
    default; 0.8-0.85 for its larger models); calibration: the text its ranges come from."""

    transform: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.5, ge=0, le=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(self, context: StepContext) -> None:
        from qbench.quant.methods.smoothquant import smoothquant

        smoothquant(context, self.alpha, self.calibration)
