"""RTN: round-to-nearest weights and dynamic activations, no calibration."""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant.linear import QuantLinear
from qbench.quant.method import METHODS, QuantizerConfig, replace_module, target_linears


@METHODS.register("rtn")
class RTNConfig(QuantizerConfig):
    """Every target linear becomes a QuantLinear (embeddings: see QuantizerConfig.quantize)."""

    method: Literal["rtn"] = "rtn"

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        linears = target_linears(model, self)
        while linears:  # popped, so each float weight is freed as soon as it is replaced
            name, linear = linears.popitem()
            replace_module(model, name, QuantLinear(linear, self.weights, self.activations))
