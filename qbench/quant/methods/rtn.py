"""RTN: round-to-nearest weights and dynamic activations, no calibration; and the embedding
table's rounding, which every non-library quantizer applies with `embeddings: true`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qbench.quant.formats.fake import fake_quant
from qbench.quant.formats.spec import WeightQuant
from qbench.quant.walk.inventory import ROUNDING_ATTRIBUTE, Target, inventory, module_path
from qbench.quant.walk.linear import round_target
from qbench.quant.walk.onload import onloaded
from qbench.quant.walk.select import quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


def round_to_nearest(
    model: nn.Module,
    quantizer: QuantizerConfig,
    float_weights: dict[str, list[tuple[int, int]]] | None = None,
) -> None:
    """Round every target the quantizer selects to nearest, in place (as its `weights:` and
    `activations:` say), decoder block by decoder block, each onloaded meanwhile where the
    model is offloaded (qbench.quant.walk.onload), then the targets outside the blocks;
    `float_weights`: (row, column) entries kept in float, by target."""
    found = inventory(model)
    targets = quantized_targets(found, quantizer)
    for i in range(len(found.blocks)):
        with onloaded(model, found.block_path(i)):
            block = {n: t for n, t in found.in_block(i).items() if n in targets}
            _round(model, block, quantizer, float_weights)
    for name, target in found.outside_blocks(targets).items():
        with onloaded(model, name):
            _round(model, {name: target}, quantizer, float_weights)


def _round(
    model: nn.Module,
    targets: dict[str, Target],
    quantizer: QuantizerConfig,
    float_weights: dict[str, list[tuple[int, int]]] | None,
) -> None:
    while targets:  # popped, so each float weight is freed as soon as it is replaced
        name, target = targets.popitem()
        kept = (float_weights or {}).get(name, [])
        round_target(model, target, quantizer.weights, quantizer.activations, kept=kept)


def round_embeddings(model: nn.Module, weights: WeightQuant) -> None:
    """Round the input embedding table, per row as `weights` says (into a new Parameter, so a
    tied lm_head keeps its own float weight; onloaded meanwhile where it is offloaded)."""
    embed = model.get_input_embeddings()
    with onloaded(model, module_path(model, embed)), torch.no_grad():
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
        with onloaded(model, module_path(model, head)):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
