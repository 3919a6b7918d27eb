"""RTN: round-to-nearest weights and dynamic activations, no calibration."""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant.linear import QuantLinear
from qbench.quant.method import METHODS, QuantizerConfig, replace_module, target_linears
from qbench.quant.spec import fake_quant


@METHODS.register("rtn")
class RTNConfig(QuantizerConfig):
    """Every target linear becomes a QuantLinear; embeddings are rounded when asked."""

    method: Literal["rtn"] = "rtn"

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        linears = target_linears(model, self)
        while linears:  # popped, so each float weight is freed as soon as it is replaced
            name, linear = linears.popitem()
            replace_module(model, name, QuantLinear(linear, self.weights, self.activations))
        if self.embeddings:
            embed = model.get_input_embeddings()
            # A new Parameter: a tied lm_head keeps its own (float) weight.
            embed.weight = nn.Parameter(fake_quant(embed.weight.detach(), self.weights), False)
