"""What the library backends share: the target linears they replace."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from qbench.errors import QBenchError
from qbench.quant.walk.inventory import inventory
from qbench.quant.walk.select import quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.steps.library import LibraryRounding


def library_linears(
    model: nn.Module, step: LibraryRounding, quantizer: QuantizerConfig
) -> dict[str, nn.Linear]:
    """The quantizer's targets, all nn.Linear (QBenchError otherwise: see `step.refusal`)."""
    found = inventory(model)
    if problem := step.refusal(found, quantizer):
        raise QBenchError(problem)
    return {name: t.module for name, t in quantized_targets(found, quantizer).items()}
