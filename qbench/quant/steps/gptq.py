"""GPTQ's step: Hessian-aware rounding with error feedback (Frantar et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qbench.data.calibration import CalibrationSpec
from qbench.quant.steps.base import Rounding, register_rounding

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig


@register_rounding("gptq")
class GPTQ(Rounding):
    """GPTQ weights (int formats), RTN activations (qbench.quant.methods.gptq).

    damp: fraction of the Hessian's mean diagonal added to it (GPTQ's percdamp, 0.01);
    block_size: columns per lazy update (128); act_order: columns in order of decreasing
    Hessian diagonal; static_groups: group scales from the original weight (AutoGPTQ's
    name; false: GPTQ's reference code); calibration: the text its Hessians come from.
    """

    method: Literal["gptq"] = "gptq"
    damp: float = Field(default=0.01, gt=0)
    block_size: int = Field(default=128, ge=1)
    act_order: bool = False
    static_groups: bool = True
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        if quantizer.weights is None or quantizer.weights.format != "int":
            return "gptq rounds int weights: set weights: {bits: ...} (format int)"
        if "static_groups" in self.model_fields_set and quantizer.weights.group is None:
            return "static_groups applies to weights with a group: add weights.group"
        return None

    def round(self, context: StepContext) -> None:
        from qbench.quant.methods.gptq import gptq

        gptq(context, self)
