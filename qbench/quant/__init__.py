"""Quantization: tensor specs, QuantLinear, methods, and the one-call `quantize_`."""

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant import (  # noqa: F401  (register methods)
    bitsandbytes,
    gptq,
    quanto,
    rotation,
    rtn,
    smoothquant,
)
from qbench.quant.method import METHODS, QuantizerConfig


def quantize_(
    model: nn.Module, config: QuantizerConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> nn.Module:
    """Quantize `model` in place as `config` says, and return it.

    Methods that calibrate on text (SmoothQuant, GPTQ) need the checkpoint's tokenizer.
    Raises QBenchError when a weight the config targets would stay in float.
    """
    config.apply(model, tokenizer)
    return model


__all__ = ["METHODS", "QuantizerConfig", "quantize_"]
