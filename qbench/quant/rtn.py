"""RTN: round-to-nearest weights and dynamic activations, no calibration."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant.inventory import inventory
from qbench.quant.linear import round_target
from qbench.quant.method import METHODS, QuantizerConfig, quantized_targets
from qbench.quant.spec import WeightQuant, fake_quant


@METHODS.register("rtn")
class RTNConfig(QuantizerConfig):
    """Every target (linears, experts, and routers when asked) is rounded to nearest;
    embeddings are rounded when asked."""

    method: Literal["rtn"] = "rtn"

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        targets = quantized_targets(inventory(model), self)
        while targets:  # popped, so each float weight is freed as soon as it is replaced
            _, target = targets.popitem()
            round_target(model, target, self.weights, self.activations)
        if self.embeddings:
            round_embeddings(model, self.weights)


def round_embeddings(model: nn.Module, weights: WeightQuant) -> None:
    """Round the input embedding table, per row as `weights` says. A new Parameter, so a tied
    lm_head keeps its own (float) weight."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embed.weight = nn.Parameter(fake_quant(embed.weight.detach(), weights), False)
    embed.qbench_rounding = (weights.label(), None)
