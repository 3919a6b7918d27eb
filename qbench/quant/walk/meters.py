"""Live counters on a quantized model: what a quantizer's runtime parts did while the model was
evaluated (the tokens kept in float, the activations an ablation clipped), read into the cell's
coverage report after its evaluation (`measured`).

A meter is any object with `key` (its entry in the report), `report()` (a JSON-able dict) and
`reset()`; it is kept in a list attribute of the model, which qbench's restore removes with the
cell. The pipeline resets them once the model is quantized, so they count the cell's evaluation
(not a transformed stage's, nor a calibration pass).
"""

from __future__ import annotations

from typing import Any

from torch import nn

METERS_ATTRIBUTE = "qbench_meters"


def add_meter(model: nn.Module, meter: Any) -> None:
    """Register `meter` among the model's live counters."""
    setattr(model, METERS_ATTRIBUTE, [*getattr(model, METERS_ATTRIBUTE, []), meter])


def reset_meters(model: nn.Module) -> None:
    """Start every meter of the model from zero."""
    for meter in getattr(model, METERS_ATTRIBUTE, []):
        meter.reset()


def measured(report: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`report` with each of the model's meters' figures so far under its key."""
    return {
        **report,
        **{meter.key: meter.report() for meter in getattr(model, METERS_ATTRIBUTE, [])},
    }
