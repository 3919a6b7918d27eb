"""optimum-quanto's quantize -> (Calibration) -> freeze on the target linears (what each qtype
does: the step's docstring, qbench.quant.steps.quanto)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qbench.quant.backends.library import library_linears

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.steps.quanto import Quanto


def quantize_linears(context: StepContext, step: Quanto) -> None:
    """Quanto's QLinear in place of every target linear, activations calibrated on the
    step's calibration text where it quantizes them, then frozen."""
    from optimum.quanto import Calibration, freeze, qtypes, quantize

    model, quantizer = context.model, context.quantizer
    names = list(library_linears(model, step, quantizer))
    activations = qtypes[step.activation_qtype] if step.activation_qtype else None
    quantize(model, weights=qtypes[step.weight_qtype], activations=activations, include=names)
    if step.group is not None:
        for name in names:  # read by quanto when it quantizes the weight (freeze)
            model.get_submodule(name).weight_group_size = step.group
    if activations is not None:
        ids = context.calibration_ids(step.calibration, "quanto's activation_qtype")
        device = next(model.parameters()).device
        with torch.no_grad(), Calibration():
            for batch in ids.split(step.calibration.batch_size):
                model(batch.to(device))
    freeze(model)
    weights, activations = step.formats_label(quantizer).split(" / ")
    for name in names:
        held = (weights, None if activations == "fp" else activations)
        model.get_submodule(name).qbench_rounding = held
