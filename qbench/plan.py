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

from qbench.checkpoints.dispatch import check_module_map
from qbench.checkpoints.load import checkpoint_config, checkpoint_dtype, checkpoint_identity
from qbench.data.sources import load_text, text_fingerprint
from qbench.errors import QBenchError
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

    @property
    def quantizer_name(self) -> str:
        return self.quantizer.name if self.quantizer else "fp"

    @property
    def stage(self) -> str:
        return "quantized" if self.quantizer else "fp"

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
        config = _at(source, where, lambda c=checkpoint: checkpoint_config(c))
        checkpoint = _resolved(source, i, checkpoint, config)
        _check_fits(recipe, source, checkpoint, config)
        identity = _at(source, where, lambda c=checkpoint: checkpoint_identity(c))
        for quantizer in [None, *recipe.quantizers]:
            determinants = {
                "checkpoint": identity,
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
            cells.append(Cell(recipe.name, checkpoint, quantizer, hashlib.sha256(blob).hexdigest()))
    return cells


def _resolved(
    source: Path, i: int, checkpoint: CheckpointSpec, config: PretrainedConfig
) -> CheckpointSpec:
    """The checkpoint with `dtype: auto` resolved from its config (so cells, keys and labels
    name the dtype it loads in), its module device_map checked against the model."""
    if isinstance(checkpoint.device_map, dict):
        _at(
            source,
            f"checkpoints[{i}].device_map",
            lambda: check_module_map(checkpoint.device_map, config, checkpoint.trust_remote_code),
        )
    dtype = _at(source, f"checkpoints[{i}].dtype", lambda: checkpoint_dtype(checkpoint, config))
    return checkpoint.model_copy(update={"dtype": dtype})


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
    recipe: Recipe, source: Path, checkpoint: CheckpointSpec, config: PretrainedConfig
) -> None:
    """Group and block sizes divide every quantized layer's width; windows fit the context."""
    context = getattr(config, "max_position_embeddings", None)
    for i, spec in enumerate(recipe.eval.perplexity):
        if context is not None and spec.seq_len > context:
            raise RecipeError(
                f"{source}: eval.perplexity[{i}].seq_len: {spec.seq_len} exceeds checkpoint "
                f"'{checkpoint.name}''s max_position_embeddings {context}; use seq_len <= {context}"
            )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            config, trust_remote_code=checkpoint.trust_remote_code
        )
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
