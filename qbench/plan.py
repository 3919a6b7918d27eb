"""Recipe -> cells: every checkpoint x (fp + each quantizer), each with a result key.

Planning reads only configs and text, never weights, so that every cross-field error
(a group size that does not divide a layer, a window longer than the model's context,
a missing checkpoint or dataset) surfaces before any model work starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from qbench.checkpoints.load import CheckpointIdentity, checkpoint_config, checkpoint_identity
from qbench.data.sources import load_text, text_fingerprint
from qbench.errors import QBenchError, describe
from qbench.eval.tasks import task_identity
from qbench.quant.adapters import ARCHITECTURES, head_dim
from qbench.quant.method import QuantizerConfig, target_linears
from qbench.quant.spec import KVQuant, divides_error
from qbench.recipe import CheckpointSpec, Recipe, RecipeError
from qbench.versions import library_versions

T = TypeVar("T")


@dataclass(frozen=True)
class Cell:
    """One evaluation: a checkpoint, unquantized (fp) or under one quantizer."""

    recipe: str
    checkpoint: CheckpointSpec
    quantizer: QuantizerConfig | None
    key: str
    identity: CheckpointIdentity  # the checkpoint's content, as the key holds it

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
            [self.identity.model_dump(), spec.dtype, spec.trust_remote_code], sort_keys=True
        )

    @property
    def filename(self) -> str:
        return f"{self.checkpoint.name}--{self.quantizer_name}--{self.key[:16]}.json"


def plan(recipe: Recipe, source: Path) -> list[Cell]:
    """All cells of `recipe`, in run order (grouped by checkpoint, fp first)."""
    eval_identity = [
        {
            **spec.model_dump(),
            "text": _at(
                source,
                f"eval.perplexity[{i}].data",
                lambda s=spec: text_fingerprint(load_text(s.data, s.split)),
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
        _check_fits(recipe, source, checkpoint, config, where)
        for quantizer in [None, *recipe.quantizers]:
            determinants = {
                "checkpoint": identity.model_dump(),
                "dtype": checkpoint.dtype,
                "quantizer": _quantizer_identity(quantizer) if quantizer else None,
                "eval": eval_identity,
                "seed": recipe.seed,
                "versions": versions | (quantizer.versions() if quantizer else {}),
            }
            if tasks:  # recipes without tasks keep their keys
                determinants["tasks"] = tasks
            if recipe.eval.diagnostics is not None:
                determinants["diagnostics"] = recipe.eval.diagnostics.model_dump()
            blob = json.dumps(determinants, sort_keys=True).encode()
            key = hashlib.sha256(blob).hexdigest()
            cells.append(Cell(recipe.name, checkpoint, quantizer, key, identity))
    return cells


def recipe_digest(recipe: Recipe) -> str:
    """A digest of everything in `recipe` that shapes its cells and their results (all but
    `gate` and `resources`): a plan.json holds it to show which recipe it was planned from."""
    blob = recipe.model_dump_json(exclude={"gate", "resources"}).encode()
    return hashlib.sha256(blob).hexdigest()


def _quantizer_identity(quantizer: QuantizerConfig) -> dict:
    """The quantizer's fields but its name; kv only when set, so older keys stay valid."""
    return quantizer.model_dump(exclude={"name"} if quantizer.kv else {"name", "kv"})


def _at(source: Path, where: str, compute: Callable[[], T]) -> T:
    """Run `compute`, turning a QBenchError into a RecipeError naming file and field."""
    try:
        return compute()
    except RecipeError:
        raise
    except QBenchError as error:
        raise RecipeError(f"{source}: {where}: {error}") from None


def _check_fits(
    recipe: Recipe,
    source: Path,
    checkpoint: CheckpointSpec,
    config: PretrainedConfig,
    where: str,
) -> None:
    """Group and block sizes divide every quantized layer's width; windows fit the context."""
    context = getattr(config, "max_position_embeddings", None)
    for i, spec in enumerate(recipe.eval.perplexity):
        if context is not None and spec.seq_len > context:
            raise RecipeError(
                f"{source}: eval.perplexity[{i}].seq_len: {spec.seq_len} exceeds checkpoint "
                f"'{checkpoint.name}''s max_position_embeddings {context}; use seq_len <= {context}"
            )
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
    embeddings = {"embeddings": skeleton.get_input_embeddings().weight.shape[1]}
    for i, quantizer in enumerate(recipe.quantizers):
        calibration = getattr(quantizer, "calibration", None)
        if calibration is not None and context is not None and calibration.seq_len > context:
            raise RecipeError(
                f"{source}: quantizers[{i}].calibration.seq_len: {calibration.seq_len} exceeds "
                f"checkpoint '{checkpoint.name}''s max_position_embeddings {context}"
            )
        if quantizer.kv is not None:
            _check_kv(source, f"quantizers[{i}].kv", quantizer.kv, checkpoint, config)
        linears = {name: m.in_features for name, m in target_linears(skeleton, quantizer).items()}
        misfit = next(_misfits(quantizer, linears, embeddings), None)
        if misfit is not None:
            field, layer, text, fix = misfit
            raise RecipeError(
                f"{source}: quantizers[{i}].{field}: {text} of layer {layer} "
                f"in checkpoint '{checkpoint.name}'; {fix}"
            )


def _misfits(
    quantizer: QuantizerConfig, linears: dict[str, int], embeddings: dict[str, int]
) -> Iterator[tuple[str, str, str, str]]:
    """(field path, layer, problem, fix) for each layer of these input widths that `quantizer`
    cannot quantize: its weight / activation formats, then the method's own fields."""
    roles = {
        "weights": linears | (embeddings if quantizer.embeddings else {}),
        "activations": linears,
    }
    for role, widths in roles.items():
        spec = getattr(quantizer, role)
        for layer, width in widths.items() if spec is not None else ():
            if problem := divides_error(spec, width):
                field, text, fix = problem
                yield f"{role}.{field}", layer, text, fix
    for layer, width in linears.items():
        if problem := quantizer.width_error(width):
            field, text, fix = problem
            yield field, layer, text, fix


def _check_kv(
    source: Path, where: str, kv: KVQuant, checkpoint: CheckpointSpec, config: PretrainedConfig
) -> None:
    """The KV step has an adapter for the model, and groups or blocks divide head_dim."""
    if config.model_type not in ARCHITECTURES:
        raise RecipeError(
            f"{source}: {where}: no KV-cache support for model_type '{config.model_type}' of "
            f"checkpoint '{checkpoint.name}' (no architecture adapter; known: "
            f"{', '.join(ARCHITECTURES)}); remove kv: for it"
        )
    width = head_dim(config)
    if kv.block is not None and width % kv.block:
        what = (
            f"group {kv.group} does" if kv.group else f"{kv.format}'s {kv.block}-element blocks do"
        )
        raise RecipeError(
            f"{source}: {where}.{'group' if kv.group else 'format'}: {what} not divide "
            f"head_dim {width} of checkpoint '{checkpoint.name}'; use a group that divides "
            f"{width}, or no group (one scale per token and head)"
        )
