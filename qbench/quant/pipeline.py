"""Running a quantizer on a model: refuse or go, transforms, the transformed stage, rounding.

`run` is what `QuantizerConfig.apply`, `quantize_` and the runner's quantized cells all call:

1. refusals before any change (qbench.quant.refusal, the planner's own check) and a model
   qbench already quantized (rounding twice would claim a precision it does not have);
2. one `StepContext` for the whole run, each transform applied in order with the transforms
   before it;
3. `on_transformed(model)`: the float model after the transforms (the runner evaluates it);
4. the rounding step, the embedding table (`embeddings: true`), the KV cache;
5. the coverage report, counted against the inventory taken before step 2, with an error where
   a targeted weight stayed in float.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.errors import QBenchError, RefusedError
from qbench.quant.context import StepContext
from qbench.quant.methods.rtn import round_embeddings, untie_word_embeddings
from qbench.quant.refusal import refusal_of
from qbench.quant.walk.coverage import check_complete, coverage
from qbench.quant.walk.inventory import Inventory, inventory
from qbench.quant.walk.kvcache import quantize_kv_cache
from qbench.quant.walk.linear import rounding

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


def run(
    quantizer: QuantizerConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    shared: dict[Hashable, Any] | None = None,
    notes: list[str] | None = None,
    on_transformed: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Quantize `model` in place as `quantizer` says (see the module docstring and
    `QuantizerConfig.apply`); the coverage report."""
    found = inventory(model)
    check_runnable(quantizer, model, found)
    context = StepContext(
        model,
        quantizer,
        tokenizer,
        seed,
        shared={} if shared is None else shared,
        notes=[] if notes is None else notes,
    )
    before = found.sizes()
    context = transform(context)
    if on_transformed is not None:
        on_transformed(model)
    if quantizer.lm_head or quantizer.embeddings:
        untie_word_embeddings(model)  # they get different weights
    if quantizer.quantizes_linears:
        quantizer.rounding.round(context)
    if quantizer.embeddings:
        round_embeddings(model, quantizer.weights)
    if quantizer.kv is not None:
        quantize_kv_cache(model, quantizer.kv)
    report = coverage(model, before, quantizer)
    check_complete(report, quantizer, model_name(model))
    return report


def transform(context: StepContext) -> StepContext:
    """Apply the quantizer's transforms to `context.model` in order, each with the transforms
    before it; the context that follows them (the rounding's)."""
    transforms = tuple(context.quantizer.transforms)
    for i, step in enumerate(transforms):
        step.apply(context.after(transforms[:i]))
    return context.after(transforms)


def check_runnable(quantizer: QuantizerConfig, model: nn.Module, found: Inventory) -> None:
    """QBenchError where `quantizer` cannot run on `model` (the planner's refusals) or where
    qbench already quantized the model."""
    if done := quantized_modules(model, found):
        raise QBenchError(
            f"{model_name(model)} is already quantized ({len(done)} modules, e.g. {done[0]}): "
            f"quantizing it again with '{quantizer.name}' would round rounded values under a "
            "new label; quantize a fresh copy, or use qbench.quantized(...) to undo a "
            "quantization when the block ends"
        )
    where = f"quantizer '{quantizer.name}'"
    config = getattr(model, "config", None)
    if problem := refusal_of(quantizer, where, model_name(model), config, found):
        raise RefusedError(problem)


def quantized_modules(model: nn.Module, found: Inventory) -> list[str]:
    """The modules qbench rounded: targets, the embedding table, attention's KV steps."""
    done = [name for name, target in found.targets.items() if rounding(target.module)]
    done += [name for name, table in found.embeddings.items() if rounding(table)]
    return done + [
        f"{name}.kv_transform"
        for name, module in model.named_modules()
        if getattr(getattr(module, "kv_transform", None), "quant", None) is not None
    ]


def model_name(model: nn.Module) -> str:
    """What messages call the model: its config's name_or_path, else its class."""
    name = getattr(getattr(model, "config", None), "name_or_path", "")
    return name or type(model).__name__
