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
from qbench.eval.perplexity import perplexity
from qbench.plan import Cell, plan
from qbench.quant import quantize_
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
            result = run_cell(cell, recipe, model, tokenizer, progress)
            write_json_atomic(runs_dir(results_root, recipe) / cell.filename, result)
            done += 1
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"]["perplexity"].items())
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
) -> dict[str, Any]:
    """Quantize a copy of `model` as the cell says, evaluate it, and describe the result."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    if cell.quantizer is not None:
        model = quantize_(copy.deepcopy(model), cell.quantizer)
    quantize_s = time.perf_counter() - start
    scores = {
        spec.column: perplexity(
            model,
            tokenizer,
            load_text(spec.data, spec.split),
            spec.seq_len,
            spec.batch_size,
            spec.max_windows,
            progress,
            desc=f"{cell.checkpoint.name} x {cell.quantizer_name}",
        )
        for spec in recipe.eval.perplexity
    }
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
        "metrics": {"perplexity": {name: s.perplexity for name, s in scores.items()}},
        "details": {"perplexity": {name: s.as_dict() for name, s in scores.items()}},
        "seed": recipe.seed,
        "versions": library_versions(),
        "device": str(next(model.parameters()).device),
        "quantize_s": quantize_s,
        "wall_time_s": time.perf_counter() - start,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
