"""Evaluate cells on a worker: one load per checkpoint, one record per cell, failures recorded.

A `Worker` keeps the checkpoint it loaded last (a `CheckpointContext`): the pristine model,
which every quantized cell deep-copies (weights restored from memory, never reloaded), its
tokenizer, and a store of what the checkpoint's cells share: calibration token ids, the fp
model's SmoothQuant activation absmax, GPTQ's layer-0 Hessians (qbench.data.calibration's
`shared_statistic`). `Worker.execute` never raises for a failing cell: an exception (an OOM
included) or a non-finite perplexity becomes a `status: failed` record.
"""

from __future__ import annotations

import copy
import datetime
import gc
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.checkpoints.dispatch import check_quantizable, device_label
from qbench.checkpoints.load import load_checkpoint
from qbench.data.calibration import sharing_statistics
from qbench.data.sources import load_text
from qbench.errors import QBenchError
from qbench.eval.diagnostics import Diagnostics, diagnose, probe_ids
from qbench.eval.perplexity import Perplexity, perplexity
from qbench.eval.tasks import default_work_dir, evaluate_cell_tasks
from qbench.plan import Cell
from qbench.quant.fused import fast_quant_mode
from qbench.recipe import CheckpointSpec, Recipe
from qbench.store import FAILED, OK, Result
from qbench.versions import library_versions

TRACEBACK_LINES = 40  # the tail of a failed cell's traceback kept in its record


class NonFiniteMetricError(QBenchError):
    """A cell's model produced NaN or infinite perplexity."""


@dataclass
class CheckpointContext:
    """One checkpoint loaded on a worker, and the statistics its cells share."""

    identity: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    shared: dict[Any, Any] = field(default_factory=dict)


def checkpoint_identity(checkpoint: CheckpointSpec) -> str:
    """What the loaded weights depend on (not the recipe's name for them)."""
    return checkpoint.model_dump_json(exclude={"name", "group", "seeds"})


class Worker:
    """Runs cells one at a time, keeping the last checkpoint loaded."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.loads = 0  # checkpoint loads so far
        self._context: CheckpointContext | None = None

    def context(self, checkpoint: CheckpointSpec) -> CheckpointContext:
        identity = checkpoint_identity(checkpoint)
        if self._context is None or self._context.identity != identity:
            self.release()
            model, tokenizer = load_checkpoint(checkpoint, self.progress)
            self._context = CheckpointContext(identity, model, tokenizer)
            self.loads += 1
        return self._context

    def release(self) -> None:
        """Drop the loaded checkpoint and what its cells shared."""
        self._context = None
        _free_memory()

    def execute(self, cell: Cell, recipe: Recipe, results_root: Path) -> Result:
        """The cell's record: `status: ok` with metrics, or `status: failed` with the error."""
        start = time.perf_counter()
        try:
            context = self.context(cell.checkpoint)
            with sharing_statistics(context.shared):
                result = run_cell(
                    cell,
                    recipe,
                    context.model,
                    context.tokenizer,
                    self.progress,
                    results_root / recipe.name,
                )
            check_finite(result)
            return result
        except Exception as error:  # recorded; KeyboardInterrupt and SystemExit are not caught
            record = failure_record(cell, recipe, error, time.perf_counter() - start)
        _free_memory()  # the error's traceback held the cell's model copy
        return record


def check_finite(result: Result) -> None:
    bad = {k: v for k, v in result["metrics"]["perplexity"].items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteMetricError(f"non-finite perplexity {bad}: the model produced NaN/inf")


def failure_record(cell: Cell, recipe: Recipe, error: BaseException, wall_time_s: float) -> Result:
    """A failed cell's record: the error's type, message and traceback tail; no metrics."""
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {
        **_header(cell, recipe),
        "status": FAILED,
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "\n".join(lines.splitlines()[-TRACEBACK_LINES:]),
        },
        **_footer(cell, wall_time_s),
    }


def _header(cell: Cell, recipe: Recipe) -> Result:
    return {
        "recipe": recipe.name,
        "key": cell.key,
        "checkpoint": {"name": cell.checkpoint.name, "spec": cell.checkpoint.model_dump()},
        "quantizer": {
            "name": cell.quantizer_name,
            "config": cell.quantizer.model_dump() if cell.quantizer else None,
        },
        "stage": cell.stage,
        "precision": cell.quantizer.precision() if cell.quantizer else cell.checkpoint.dtype,
        "seed": recipe.seed,
    }


def _footer(cell: Cell, wall_time_s: float) -> Result:
    return {
        "versions": library_versions() | (cell.quantizer.versions() if cell.quantizer else {}),
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "wall_time_s": wall_time_s,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cell(
    cell: Cell,
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool = True,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Quantize a copy of `model` as the cell says, evaluate it, and describe the result.

    `work_dir` (results/<recipe>) holds lm-eval's request cache and logged samples.
    """
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    stages, transformed_eval_s, fp_model = {}, 0.0, model
    if cell.quantizer is not None:
        check_quantizable(model)
        model = copy.deepcopy(model)
        cell.quantizer.transform(model, tokenizer)
        if cell.quantizer.has_transform:  # the float model after smoothing / rotation
            eval_start = time.perf_counter()
            scores = _perplexities(cell, recipe, model, tokenizer, progress, " (transformed)")
            stages["transformed"] = {"perplexity": {k: s.perplexity for k, s in scores.items()}}
            transformed_eval_s = time.perf_counter() - eval_start
        cell.quantizer.quantize(model, tokenizer)
    quantize_s = time.perf_counter() - start - transformed_eval_s
    scores = _perplexities(cell, recipe, model, tokenizer, progress)
    diagnostics = _diagnostics(cell, recipe, model, fp_model, tokenizer)
    tasks = (
        evaluate_cell_tasks(
            model,
            tokenizer,
            recipe.eval,
            cell.key,
            Path(cell.filename).stem,
            work_dir or default_work_dir(recipe.name),
            progress,
        )
        if recipe.eval.tasks
        else {"metrics": {}, "details": {}}
    )
    return {
        **_header(cell, recipe),
        "status": OK,
        "metrics": {
            "perplexity": {name: s.perplexity for name, s in scores.items()},
            **({"diagnostics": diagnostics.summary} if diagnostics else {}),
            **tasks["metrics"],
        },
        "details": {
            "perplexity": {name: s.as_dict() for name, s in scores.items()},
            **({"diagnostics": diagnostics.details} if diagnostics else {}),
            **tasks["details"],
        },
        "stages": stages,
        "device": device_label(model),
        "fast_quant": fast_quant_mode(),  # QBENCH_FAST_QUANT: compiled fake-quant (auto: CUDA)
        "quantize_s": quantize_s,
        **_footer(cell, time.perf_counter() - start),
    }


def _perplexities(
    cell: Cell,
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool,
    stage: str = "",
) -> dict[str, Perplexity]:
    return {
        spec.column: perplexity(
            model,
            tokenizer,
            load_text(spec.data, spec.split),
            spec.seq_len,
            spec.batch_size,
            spec.max_windows,
            progress,
            desc=f"{cell.checkpoint.name} x {cell.quantizer_name}{stage}",
        )
        for spec in recipe.eval.perplexity
    }


def _diagnostics(
    cell: Cell,
    recipe: Recipe,
    model: PreTrainedModel,
    fp_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> Diagnostics | None:
    """Outlier diagnostics of the cell's model on the first perplexity text, if asked for."""
    spec = recipe.eval.diagnostics
    if spec is None:
        return None
    text = recipe.eval.perplexity[0]
    ids = probe_ids(tokenizer, load_text(text.data, text.split), spec)
    return diagnose(model, ids, cell.quantizer, fp_model)
