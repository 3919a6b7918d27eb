"""Round-to-nearest: weights once, activations dynamically at every call; no calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from qbench.quant.steps.base import Rounding, register_rounding

if TYPE_CHECKING:
    from qbench.quant.context import StepContext


@register_rounding("rtn")
class RTN(Rounding):
    """Every target (linears, experts, and routers when asked) is rounded to nearest as the
    quantizer's `weights:` say; its inputs as `activations:` say (qbench.quant.methods.rtn)."""

    method: Literal["rtn"] = "rtn"

    def round(self, context: StepContext) -> None:
        from qbench.quant.methods.rtn import round_to_nearest

        round_to_nearest(context.model, context.quantizer)
