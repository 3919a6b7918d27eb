"""Quantization: tensor specs, QuantLinear, methods, and the one-call `quantize_`."""

from torch import nn

from qbench.quant import rtn  # noqa: F401  (registers the method)
from qbench.quant.method import METHODS, QuantizerConfig


def quantize_(model: nn.Module, config: QuantizerConfig) -> nn.Module:
    """Quantize `model` in place as `config` says, and return it."""
    config.apply(model)
    return model


__all__ = ["METHODS", "QuantizerConfig", "quantize_"]
