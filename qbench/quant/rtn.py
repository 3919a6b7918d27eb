"""RTN: round-to-nearest weights and dynamic activations, no calibration; and the embedding
table's rounding, which every non-library quantizer applies with `embeddings: true`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.quant.inventory import inventory
from qbench.quant.linear import round_target
from qbench.quant.spec import WeightQuant, fake_quant
from qbench.quant.steps import Rounding, Transform, quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


class RTN(Rounding):
    """Every target (linears, experts, and routers when asked) is rounded to nearest."""

    method: Literal["rtn"] = "rtn"

    def round(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        quantizer: QuantizerConfig,
        before: tuple[Transform, ...],
    ) -> None:
        targets = quantized_targets(inventory(model), quantizer)
        while targets:  # popped, so each float weight is freed as soon as it is replaced
            _, target = targets.popitem()
            round_target(model, target, quantizer.weights, quantizer.activations)


def round_embeddings(model: nn.Module, weights: WeightQuant) -> None:
    """Round the input embedding table, per row as `weights` says (into a new Parameter, so a
    tied lm_head keeps its own float weight)."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embed.weight = nn.Parameter(fake_quant(embed.weight.detach(), weights), False)
    embed.qbench_rounding = (weights.label(), None)


def untie_word_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight and tell transformers not to tie it again.

    `tie_weights()` (which lm-eval's HFLM calls on the model it wraps) ties lm_head to the input
    embedding wherever the config's `tie_word_embeddings` is true; it is set false on the config
    and on its text config (which composite models read).
    """
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
