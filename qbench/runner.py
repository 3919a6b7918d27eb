"""Run the cells of a plan and write one JSON result per cell, atomically.

A cell whose result file exists is skipped, so an interrupted run resumes where it
stopped; a result is written to a temporary file and renamed, so a killed run leaves
no partial result.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.checkpoints.load import load_checkpoint
from qbench.data.sources import load_text
from qbench.eval.diagnostics import Diagnostics, diagnose, probe_ids
from qbench.eval.perplexity import Perplexity, perplexity
from qbench.eval.tasks import default_work_dir, discard_request_cache, evaluate_cell_tasks
from qbench.plan import Cell, plan
from qbench.recipe import Recipe
from qbench.versions import library_versions


def runs_dir(results_root: Path, recipe: Recipe) -> Path:
    return results_root / recipe.name / "runs"


def read_result(results_root: Path, recipe: Recipe, cell: Cell) -> dict[str, Any] | None:
    path = runs_dir(results_root, recipe) / cell.filename
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def run(recipe: Recipe, source: Path, results_root: Path, progress: bool = True) -> list[Cell]:
    """Evaluate every cell of `recipe` that has no result yet; return the plan."""
    cells = plan(recipe, source)
    pending = [c for c in cells if read_result(results_root, recipe, c) is None]
    print(
        f"{recipe.name}: {len(cells)} cells, {len(cells) - len(pending)} done, "
        f"{len(pending)} to run",
        flush=True,
    )
    done = len(cells) - len(pending)
    for _, group in itertools.groupby(pending, key=lambda c: c.checkpoint.name):
        group = list(group)
        model, tokenizer = load_checkpoint(group[0].checkpoint, progress)
        for cell in group:
            result = run_cell(cell, recipe, model, tokenizer, progress, results_root / recipe.name)
            write_json_atomic(runs_dir(results_root, recipe) / cell.filename, result)
            discard_request_cache(results_root / recipe.name, cell.key)
            done += 1
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"]["perplexity"].items())
            if (average := result["metrics"].get("zero_shot_average")) is not None:
                scores += f"; {len(recipe.eval.tasks)}-task average {average:.4f}"
            print(
                f"[{done}/{len(cells)}] {cell.checkpoint.name} x {cell.quantizer_name}: "
                f"perplexity {scores} ({result['wall_time_s']:.1f} s)",
                flush=True,
            )
    return cells


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
        "recipe": recipe.name,
        "key": cell.key,
        "checkpoint": {"name": cell.checkpoint.name, "spec": cell.checkpoint.model_dump()},
        "quantizer": {
            "name": cell.quantizer_name,
            "config": cell.quantizer.model_dump() if cell.quantizer else None,
        },
        "stage": cell.stage,
        "precision": cell.quantizer.precision() if cell.quantizer else cell.checkpoint.dtype,
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
        "seed": recipe.seed,
        "versions": library_versions() | (cell.quantizer.versions() if cell.quantizer else {}),
        "device": str(next(model.parameters()).device),
        "quantize_s": quantize_s,
        "wall_time_s": time.perf_counter() - start,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
