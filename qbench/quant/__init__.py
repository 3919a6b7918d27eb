"""Quantization: tensor specs, the quantizer pipeline (transforms, rounding, KV cache), and the
one-call `quantize_`."""

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant.quantizer import SHORTHANDS, QuantizerConfig
from qbench.quant.steps import ROUNDINGS, TRANSFORMS


def quantize_(
    model: nn.Module, config: QuantizerConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> nn.Module:
    """Quantize `model` in place as `config` says, and return it.

    Steps that calibrate on text (SmoothQuant, AWQ, GPTQ, quanto's activations) need the
    checkpoint's tokenizer. Raises QBenchError when a weight the config targets would stay in
    float.
    """
    config.apply(model, tokenizer)
    return model


def quantizer(**fields: object) -> QuantizerConfig:
    """A validated quantizer from recipe fields, e.g. quantizer(name="w4", method="rtn",
    weights={"bits": 4})."""
    return QuantizerConfig.model_validate(fields)


__all__ = ["ROUNDINGS", "SHORTHANDS", "TRANSFORMS", "QuantizerConfig", "quantize_", "quantizer"]
