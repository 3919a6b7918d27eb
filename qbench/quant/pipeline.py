"""Running a quantizer on a model: refuse or go, transforms, the transformed stage, rounding.

`run` is what `QuantizerConfig.apply`, `quantize_` and the runner's quantized cells all call:

1. refusals before any change (qbench.quant.refusal, the planner's own check) and a model
   qbench already quantized (rounding twice would claim a precision it does not have);
2. one `StepContext` for the whole run, each transform applied in order with the transforms
   before it;
3. `on_transformed(model)`: the float model after the transforms (the runner evaluates it);
4. `keep_float.super_weights`: the super weights of the transformed model, which the rounding
   keeps in float; the rounding step, the embedding table (`embeddings: true`), the KV cache;
   `keep_float`'s tokens (their activations and KV stay in float from now on);
5. the coverage report, counted against the inventory taken before step 2, with the steps'
   facts (an ablation's zeroed weights, the super weights kept), and an error where a targeted
   weight stayed in float.
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
from qbench.quant.walk.kvcache import kv_sites, quantize_kv_cache
from qbench.quant.walk.linear import rounding
from qbench.quant.walk.meters import reset_meters
from qbench.quant.walk.onload import check_quantizable
from qbench.quant.walk.select import quantized_targets
from qbench.quant.walk.structure import applied_outside_forward
from qbench.quant.walk.tokens import exempt_tokens

if TYPE_CHECKING:
    from qbench.quant.artifacts import Artifacts
    from qbench.quant.quantizer import QuantizerConfig


def run(
    quantizer: QuantizerConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    shared: dict[Hashable, Any] | None = None,
    notes: list[str] | None = None,
    caveats: list[str] | None = None,
    on_transformed: Callable[[nn.Module], None] | None = None,
    artifacts: Artifacts | None = None,
    progress: bool = False,
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
        caveats=[] if caveats is None else caveats,
        artifacts=artifacts,
        progress=progress,
    )
    before = found.sizes()
    context = transform(context)
    if on_transformed is not None:
        on_transformed(model)
    if quantizer.lm_head or quantizer.embeddings:
        untie_word_embeddings(model)  # they get different weights
    keep = quantizer.keep_float
    if keep is not None and keep.super_weights is not None:
        from qbench.quant.methods.superweights import keep_super_weights

        keep_super_weights(context, keep.super_weights)
    if quantizer.quantizes_linears:
        quantizer.rounding.round(context)
    if quantizer.embeddings:
        round_embeddings(model, quantizer.weights)
    if quantizer.kv is not None:
        quantize_kv_cache(model, quantizer.kv)
        if found.of_kind("ssm"):
            context.note(
                "kv: the attention layers' keys and values are rounded; the state-space "
                "mixers' recurrent states (conv and SSM states) stay in float",
                caveat=True,
            )
    context.release_activations()
    if keep is not None and keep.tokens:
        sites = kv_sites(model) if quantizer.kv is not None else []
        exempt_tokens(model, inventory(model), keep, sites)
    reset_meters(model)  # they count the quantized model's evaluation from here
    report = coverage(model, before, quantizer) | context.facts
    check_complete(report, quantizer, model_name(model))
    return report


def transform(context: StepContext) -> StepContext:
    """Apply the quantizer's transforms to `context.model` in order, each with the transforms
    before it; the context that follows them (the rounding's)."""
    transforms = tuple(context.quantizer.transforms)
    for i, step in enumerate(transforms):
        step.apply(context.after(transforms[:i]))
        context.release_activations()
    return context.after(transforms)


def check_runnable(quantizer: QuantizerConfig, model: nn.Module, found: Inventory) -> None:
    """RefusedError where `quantizer` cannot run on `model` (the planner's refusals, linears
    whose weight their parent applies outside their forward); QBenchError where qbench already
    quantized the model."""
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
    if problem := _outside_forward(quantizer, model, found):
        raise RefusedError(f"{where} on {model_name(model)}: {problem}")
    check_quantizable(model, quantizer.rounding.method, quantizer.rounding.library)


def _outside_forward(quantizer: QuantizerConfig, model: nn.Module, found: Inventory) -> str | None:
    """Why the quantizer cannot reach linears whose weight a parent applies itself (one probe
    pass finds them): their inputs (activations:) and their module (a library's) are never
    used. Their weights alone are rounded in place, so weight-only qbench rounding runs."""
    probed = hasattr(model, "get_input_embeddings")  # a decoder: a bare module tree has no ids
    if (
        not probed
        or not quantizer.quantizes_linears
        or not (quantizer.activations is not None or quantizer.rounding.library)
    ):
        return None
    outside = applied_outside_forward(model, quantized_targets(found, quantizer))
    if not outside:
        return None
    what = "activations:" if quantizer.activations is not None else quantizer.rounding.method
    last = outside[0].rsplit(".", 1)[-1]
    return (
        f"{len(outside)} linears (e.g. {outside[0]}) have their weight applied by their parent "
        f"(x @ W) and their forward never called, which {what} relies on; leave them out with "
        f"ignore: ['re:.*\\.{last}$'], or round weights only with rtn or gptq"
    )


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
