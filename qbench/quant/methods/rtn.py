"""RTN: round-to-nearest weights and dynamic activations, no calibration; and the embedding
table's rounding, which every non-library quantizer applies with `embeddings: true`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.walk.inventory import ROUNDING_ATTRIBUTE, inventory
from qbench.quant.walk.linear import round_target
from qbench.quant.walk.select import quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


def round_to_nearest(model: nn.Module, quantizer: QuantizerConfig) -> None:
    """Round every target the quantizer selects to nearest, in place (as its `weights:` and
    `activations:` say)."""
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
    setattr(embed, ROUNDING_ATTRIBUTE, (weights.label(), None))


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
