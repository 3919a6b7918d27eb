"""Recipe -> cells: every checkpoint x (fp + each quantizer), each with a result key.

Planning reads only configs and text, never weights, so that every cross-field error
(a group size that does not divide a layer, a window longer than the model's context,
a missing checkpoint or dataset) surfaces before any model work starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from qbench.checkpoints.dispatch import check_module_map, offload_refusal
from qbench.checkpoints.load import (
    CheckpointIdentity,
    checkpoint_config,
    checkpoint_dtype,
    checkpoint_identity,
)
from qbench.data.sources import text_fingerprint
from qbench.errors import QBenchError, describe
from qbench.eval.tasks import task_identity
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.refusal import refusal_of, text_config
from qbench.quant.walk.inventory import inventory, linear_conv1d
from qbench.recipe import CheckpointSpec, Recipe, RecipeError
from qbench.versions import library_versions

T = TypeVar("T")


@dataclass(frozen=True)
class Cell:
    """One evaluation: a checkpoint, unquantized (fp) or under one quantizer.

    `refusal`: why the quantizer cannot run on this checkpoint, decided at plan time (the
    cell is recorded as failed with this reason, without loading the model); None: it runs.
    """

    recipe: str
    checkpoint: CheckpointSpec
    quantizer: QuantizerConfig | None
    key: str
    identity: CheckpointIdentity  # the checkpoint's content, as the key holds it
    refusal: str | None = None
    fp_key: str | None = None  # the key of the same checkpoint's fp cell

    @property
    def quantizer_name(self) -> str:
        return self.quantizer.name if self.quantizer else "fp"

    @property
    def stage(self) -> str:
        return "quantized" if self.quantizer else "fp"

    @property
    def precision(self) -> str:
        """The quantizer's precision label (e.g. W4A8), or the checkpoint's dtype for fp."""
        return self.quantizer.precision() if self.quantizer else self.checkpoint.dtype

    @property
    def label(self) -> str:
        """What the quantizer does (e.g. 'rtn: int4 g32 / int8 token'), or 'unquantized'."""
        return self.quantizer.label() if self.quantizer else "unquantized"

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
    eval_identity = [
        {
            **spec.identity(),
            "text": _at(
                source,
                f"eval.perplexity[{i}].{spec.source_field}",
                lambda s=spec: text_fingerprint(s.text()),
            ),
        }
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
        _check_context(recipe, source, checkpoint, config)
        found = inventory(skeleton)
        offloaded = offload_refusal(checkpoint.device_map)
        fp_key = None
        for index, quantizer in enumerate([None, *recipe.quantizers]):
            determinants = {
                "checkpoint": identity.model_dump(),
                "dtype": checkpoint.dtype,
                "quantizer": _quantizer_identity(quantizer) if quantizer else None,
                "eval": eval_identity,
                "seed": recipe.seed,
                "versions": versions | (quantizer.versions() if quantizer else {}),
            }
            if checkpoint.device_map is not None:  # undispatched checkpoints keep their keys
                determinants["device_map"] = checkpoint.device_map
            if tasks:  # recipes without tasks keep their keys
                determinants["tasks"] = tasks
            if recipe.eval.diagnostics is not None:
                determinants["diagnostics"] = recipe.eval.diagnostics.model_dump()
            blob = json.dumps(determinants, sort_keys=True).encode()
            key = hashlib.sha256(blob).hexdigest()
            fp_key = fp_key or key
            refusal = quantizer and (
                _offload_refusal(quantizer, index - 1, i, checkpoint, offloaded)
                or refusal_of(
                    quantizer,
                    f"quantizers[{index - 1}] '{quantizer.name}'",
                    checkpoint.name,
                    config,
                    found,
                )
            )
            cells.append(
                Cell(recipe.name, checkpoint, quantizer, key, identity, refusal or None, fp_key)
            )
    return cells


def _resolved(
    source: Path, i: int, checkpoint: CheckpointSpec, config: PretrainedConfig, skeleton: nn.Module
) -> CheckpointSpec:
    """The checkpoint with `dtype: auto` resolved from its config (so cells, keys and labels
    name the dtype it loads in), its module device_map checked against the model's modules."""
    if isinstance(checkpoint.device_map, dict):
        _at(
            source,
            f"checkpoints[{i}].device_map",
            lambda: check_module_map(checkpoint.device_map, skeleton),
        )
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
    version of that layout; `targets:` / `ignore:` only where given (keys from before they
    existed stay valid)."""
    unset = {f for f in ("targets", "ignore") if not getattr(quantizer, f)}
    return {
        "schema": QUANTIZER_SCHEMA,
        **quantizer.model_dump(exclude={"name", "method", *unset}),
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
    recipe: Recipe, source: Path, checkpoint: CheckpointSpec, config: PretrainedConfig
) -> None:
    """Perplexity windows fit the checkpoint's context."""
    context = getattr(text_config(config), "max_position_embeddings", None)
    for i, spec in enumerate(recipe.eval.perplexity):
        if context is not None and spec.seq_len > context:
            raise RecipeError(
                f"{source}: eval.perplexity[{i}].seq_len: {spec.seq_len} exceeds checkpoint "
                f"'{checkpoint.name}''s max_position_embeddings {context}; use seq_len <= {context}"
            )


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
    quantizer: QuantizerConfig,
    index: int,
    i: int,
    checkpoint: CheckpointSpec,
    offloaded: str | None,
) -> str | None:
    """The refusal of `quantizer` (recipe entry `index`) on checkpoint `i`, whose device_map
    offloads modules (`offloaded`: dispatch.offload_refusal's reason), else None."""
    if offloaded is None:
        return None
    return (
        f"quantizers[{index}] '{quantizer.name}' on checkpoint '{checkpoint.name}': "
        f"checkpoints[{i}].device_map {offloaded}"
    )
