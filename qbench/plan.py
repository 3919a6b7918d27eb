"""Recipe -> cells: every checkpoint x (fp + each quantizer and its breakdown's parts), each
with a result key.

Planning reads only configs and text, never weights, so that every cross-field error
(a group size that does not divide a layer, a window longer than the model's context,
a missing checkpoint or dataset) surfaces before any model work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from qbench.checkpoints.dispatch import check_gpus, check_module_map, offload_refusal
from qbench.checkpoints.gguf import dequantized_from, gguf_versions
from qbench.checkpoints.limits import memory_refusal
from qbench.checkpoints.load import (
    CheckpointIdentity,
    checkpoint_config,
    checkpoint_dtype,
    checkpoint_identity,
)
from qbench.checkpoints.random import random_checkpoint_dir
from qbench.data.sources import text_fingerprint
from qbench.errors import QBenchError, describe
from qbench.eval.task_index import task_identity, task_options_identity
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.refusal import refusal_of, text_config
from qbench.quant.walk.inventory import inventory, linear_conv1d
from qbench.recipe import CheckpointSpec, Recipe, RecipeError
from qbench.versions import library_versions

T = TypeVar("T")


@dataclass(frozen=True)
class Cell:
    """One evaluation: a checkpoint, unquantized (fp) or under one quantizer.

    `refusal`: why the cell cannot run (the quantizer on this checkpoint, or the checkpoint
    here at all), decided at plan time: the cell is recorded as refused with this reason,
    without loading the model; None: it runs.
    `determinants`: the sorted JSON whose sha256 is `key` (`cell_determinants`), kept in
    plan.json so that a reader can re-derive the key.
    """

    recipe: str
    checkpoint: CheckpointSpec
    quantizer: QuantizerConfig | None
    key: str
    identity: CheckpointIdentity  # the checkpoint's content, as the key holds it
    refusal: str | None = None
    fp_key: str | None = None  # the key of the same checkpoint's fp cell
    determinants: str | None = field(default=None, compare=False, repr=False)

    @property
    def quantizer_name(self) -> str:
        return self.quantizer.name if self.quantizer else "fp"

    @property
    def stage(self) -> str:
        """ "fp", "quantized", or "ablation" (ablations alone: a changed float model)."""
        if self.quantizer is None:
            return "fp"
        return "ablation" if self.quantizer.rounding.float_only else "quantized"

    @property
    def precision(self) -> str:
        """The quantizer's precision label (e.g. W4A8), or the checkpoint's dtype for fp."""
        return self.quantizer.precision() if self.quantizer else self.checkpoint.dtype

    @property
    def label(self) -> str:
        """What the quantizer does (e.g. 'rtn: int4 g32 / int8 token'), or 'unquantized' (a
        GGUF checkpoint's: '... (dequantized from Q4_1 / Q8_0)')."""
        if self.quantizer:
            return self.quantizer.label()
        origin = dequantized_from(self.identity.gguf_types)
        return f"unquantized (dequantized from {origin})" if origin else "unquantized"

    @property
    def load_key(self) -> str:
        """What the loaded model depends on: cells with equal load keys share one load."""
        spec = self.checkpoint
        return json.dumps(
            [
                self.identity.model_dump(),
                spec.dtype,
                spec.trust_remote_code,
                spec.device_map,
                spec.offload_folder,
            ],
            sort_keys=True,
        )

    @property
    def filename(self) -> str:
        return f"{self.checkpoint.name}--{self.quantizer_name}--{self.key[:16]}.json"

    def fp_cell(self) -> Cell:
        """The same checkpoint's fp cell (the reference of this cell's degradation)."""
        return Cell(self.recipe, self.checkpoint, None, self.fp_key or self.key, self.identity)


def plan(recipe: Recipe, source: Path) -> list[Cell]:
    """All cells of `recipe`, in run order (grouped by checkpoint, fp first)."""
    texts = [
        _at(
            source,
            f"eval.perplexity[{i}].{spec.source_field}",
            lambda s=spec: text_fingerprint(s.text()),
        )
        for i, spec in enumerate(recipe.eval.perplexity)
    ]
    tasks = [
        _at(source, f"eval.tasks[{i}]", lambda t=task: task_identity(t, recipe.eval.task_options))
        for i, task in enumerate(recipe.eval.tasks)
    ]
    versions = library_versions()
    cells = []
    for i, checkpoint in enumerate(recipe.checkpoints):
        where = f"checkpoints[{i}].{checkpoint.source_field}"
        identity = _at(source, where, lambda c=checkpoint: checkpoint_identity(c))
        commit = identity.commit
        config = _at(source, where, lambda c=checkpoint, h=commit: checkpoint_config(c, h))
        skeleton = _skeleton(source, where, checkpoint, config)
        checkpoint = _resolved(source, i, checkpoint, config, skeleton)
        context = context_length(config, skeleton)
        _check_context(recipe, source, checkpoint, context)
        found = inventory(skeleton)
        unloadable = _memory_refusal(i, checkpoint, config, skeleton)
        fp_key = None
        for index, quantizer in [(None, None), *recipe.cell_quantizers()]:
            every = versions | (quantizer.versions() if quantizer else {})
            every |= gguf_versions() if checkpoint.is_gguf else {}
            determinants = cell_determinants(
                recipe, checkpoint, quantizer, identity, texts, tasks, every
            )
            key = cell_key(determinants)
            fp_key = fp_key or key
            refusal = unloadable or (
                quantizer
                and (
                    _offload_refusal(quantizer, index, i, checkpoint)
                    or refusal_of(
                        quantizer,
                        f"quantizers[{index}] '{quantizer.name}'",
                        checkpoint.name,
                        config,
                        found,
                        context,
                    )
                )
            )
            blob = json.dumps(determinants, sort_keys=True)
            refusal = refusal or None
            cells.append(
                Cell(recipe.name, checkpoint, quantizer, key, identity, refusal, fp_key, blob)
            )
    return cells


def cell_determinants(
    recipe: Recipe,
    checkpoint: CheckpointSpec,
    quantizer: QuantizerConfig | None,
    identity: CheckpointIdentity,
    texts: list[str],
    tasks: list[dict[str, Any]],
    versions: dict[str, str],
) -> dict[str, Any]:
    """What a cell's key is the digest of (as JSON, see `cell_key`): the checkpoint's content
    `identity` and dtype (resolved), the quantizer, the perplexity specs with the fingerprint
    of each one's text (`texts`), the tasks' identities (`task_identity`), the seed, the
    library `versions` (the quantizer's included), the device_map and diagnostics where set.

    Raises ValueError when `texts` does not give one fingerprint per perplexity spec."""
    specs = recipe.eval.perplexity
    if len(texts) != len(specs):
        raise ValueError(f"{len(texts)} text fingerprints for {len(specs)} perplexity specs")
    determinants = {
        "checkpoint": identity.model_dump(),
        "dtype": checkpoint.dtype,
        "quantizer": _quantizer_identity(quantizer) if quantizer else None,
        "eval": [{**spec.identity(), "text": t} for spec, t in zip(specs, texts, strict=True)],
        "seed": recipe.seed,
        "versions": versions,
    }
    if checkpoint.device_map is not None:  # undispatched checkpoints keep their keys
        determinants["device_map"] = checkpoint.device_map
    if tasks:  # recipes without tasks keep their keys
        determinants["tasks"] = tasks
    if recipe.eval.diagnostics is not None:
        determinants["diagnostics"] = recipe.eval.diagnostics.identity()
    return json.loads(json.dumps(determinants, sort_keys=True))  # as plan.json holds them


def cell_key(determinants: dict[str, Any]) -> str:
    """A cell's result key: the sha256 of its determinants as sorted JSON."""
    return hashlib.sha256(json.dumps(determinants, sort_keys=True).encode()).hexdigest()


def _resolved(
    source: Path, i: int, checkpoint: CheckpointSpec, config: PretrainedConfig, skeleton: nn.Module
) -> CheckpointSpec:
    """The checkpoint with `dtype: auto` resolved from its config (so cells, keys and labels
    name the dtype it loads in), its module device_map checked against the model's modules."""
    if isinstance(device_map := checkpoint.device_map, dict):

        def check_map() -> None:
            check_gpus(device_map)
            check_module_map(device_map, skeleton)

        _at(source, f"checkpoints[{i}].device_map", check_map)
    dtype = _at(source, f"checkpoints[{i}].dtype", lambda: checkpoint_dtype(checkpoint, config))
    return checkpoint.model_copy(update={"dtype": dtype})


def recipe_digest(recipe: Recipe) -> str:
    """A digest of everything in `recipe` that shapes its cells and their results (all but
    `gate` and `resources`): a plan.json holds it to show which recipe it was planned from."""
    blob = recipe.model_dump_json(exclude={"gate", "resources"}).encode()
    return hashlib.sha256(blob).hexdigest()


QUANTIZER_SCHEMA = 2  # 2: a quantizer is its pipeline (transforms, rounding): keys changed once


def _quantizer_identity(quantizer: QuantizerConfig) -> dict:
    """The quantizer's pipeline and formats (its name and shorthand aside), with the schema
    version of that layout; `targets:` / `ignore:` / `convs:` / `keep_float:` only where given
    (keys from before they existed stay valid); never `breakdown:`, which adds cells of its own
    and changes nothing a cell computes."""
    unset = {f for f in ("targets", "ignore", "convs", "keep_float") if not getattr(quantizer, f)}
    return {
        "schema": QUANTIZER_SCHEMA,
        **quantizer.model_dump(exclude={"name", "method", "breakdown", *unset}),
    }


def _at(source: Path, where: str, compute: Callable[[], T]) -> T:
    """Run `compute`, turning a QBenchError into a RecipeError naming file and field."""
    try:
        return compute()
    except RecipeError:
        raise
    except QBenchError as error:
        raise RecipeError(f"{source}: {where}: {error}") from None


def _check_context(
    recipe: Recipe, source: Path, checkpoint: CheckpointSpec, context: tuple[int, str] | None
) -> None:
    """Perplexity windows fit the checkpoint's context (`context_length`)."""
    for i, spec in enumerate(recipe.eval.perplexity):
        if context is not None and spec.seq_len > context[0]:
            raise RecipeError(
                f"{source}: eval.perplexity[{i}].seq_len: {spec.seq_len} exceeds checkpoint "
                f"'{checkpoint.name}''s {context[1]} {context[0]}; use seq_len <= {context[0]}"
            )


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_POSITION_TABLE = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def context_length(config: PretrainedConfig, skeleton: nn.Module) -> tuple[int, str] | None:
    """(tokens, what says so): the longest window the model takes. The config's
    max_position_embeddings (or n_positions, n_ctx, seq_length), or the rows of a learned
    position table (GPT-2's wpe, OPT's embed_positions less its offset) where fewer: beyond
    it a learned-position model fails with an IndexError and a rotary one runs on positions
    it never saw. None where neither says."""
    text = text_config(config)
    found = None
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found = (value, name)
            break
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Embedding) and _POSITION_TABLE.search(name):
            rows = module.num_embeddings - getattr(module, "offset", 0)
            if found is None or rows < found[0]:
                found = (rows, f"learned position table ({name})")
    return found


def _memory_refusal(
    i: int, checkpoint: CheckpointSpec, config: PretrainedConfig, skeleton: nn.Module
) -> str | None:
    """Why checkpoint `i` cannot be loaded here (its weights exceed the memory it loads into),
    for every cell of it; None where it fits, or a device_map decides where it goes."""
    if checkpoint.device_map is not None or checkpoint.train is not None:
        return None
    built = checkpoint.random is None or random_checkpoint_dir(checkpoint.random, config).is_dir()
    problem = memory_refusal(skeleton, checkpoint.dtype, built_in_float32=not built)
    return problem and f"checkpoints[{i}] '{checkpoint.name}' ({config.model_type}): {problem}"


def _skeleton(
    source: Path, where: str, checkpoint: CheckpointSpec, config: PretrainedConfig
) -> torch.nn.Module:
    """The checkpoint's modules on the meta device (no weights), as the loader shapes them."""
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=checkpoint.trust_remote_code
            )
    except Exception as error:  # a config transformers accepts but cannot build a model from
        raise RecipeError(
            f"{source}: {where}: the config of checkpoint '{checkpoint.name}' does not build a "
            f"model: {describe(error)}"
        ) from None
    linear_conv1d(skeleton)
    return skeleton


def _offload_refusal(
    quantizer: QuantizerConfig, index: int, i: int, checkpoint: CheckpointSpec
) -> str | None:
    """The refusal of library-rounding `quantizer` (recipe entry `index`) on checkpoint `i`,
    whose device_map offloads modules, else None (qbench's own steps onload them)."""
    if not quantizer.rounding.library:
        return None
    offloaded = offload_refusal(checkpoint.device_map, quantizer.rounding.method)
    if offloaded is None:
        return None
    return (
        f"quantizers[{index}] '{quantizer.name}' on checkpoint '{checkpoint.name}': "
        f"checkpoints[{i}].device_map {offloaded}"
    )


def rederived_key(
    recipe: Recipe,
    checkpoint: CheckpointSpec,
    quantizer: QuantizerConfig | None,
    identity: CheckpointIdentity,
    determinants: dict[str, Any],
) -> str:
    """The key the recipe's own fields give, with `identity` and what stored `determinants`
    say of the environment at plan time (text fingerprints, task sources and data, versions):
    the stored key only when the stored determinants agree with the recipe. ValueError for
    determinants of another layout."""
    try:
        texts = [entry["text"] for entry in determinants["eval"]]
        tasks = [
            {**stored, **task_options_identity(spec, recipe.eval.task_options)}
            for stored, spec in zip(determinants.get("tasks", []), recipe.eval.tasks, strict=True)
        ]
        versions = determinants["versions"]
        rebuilt = cell_determinants(recipe, checkpoint, quantizer, identity, texts, tasks, versions)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"its determinants do not fit this recipe ({describe(error)})") from None
    return cell_key(rebuilt)
