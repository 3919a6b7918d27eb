"""The results folder: records, claims, the plan, and what dead processes left behind.

    results/<recipe>/plan.json        the cells of the last run (keys, what each key is the
                                      digest of, names, identities) and the recipe's columns:
                                      report (and gate --results-only) need nothing else
    results/<recipe>/runs/<checkpoint>--<quantizer>--<key[:16]>.json    one record per cell
    results/<recipe>/runs/.claims/<same name>.lock    a claim while a process computes a cell
    results/<recipe>/runs/.invalid/   records that failed validation, moved aside
    results/<recipe>/cache/           lm-eval request caches (JSON values), while cells run

Records (qbench.record.Record) are written atomically (qbench.files) and validated on read:
one that is truncated, empty, wrongly typed, a symlink, or whose key, recipe, checkpoint or
quantizer disagrees with the cell whose file it sits in (a record copied over another cell's
file) is moved to runs/.invalid/ with a one-line warning, and the cell counts as missing, so
the next run recomputes it. Nothing in the folder is unpickled.

A claim is an exclusive flock on the cell's claim file, held while a process computes the
cell: a second sweep on the same folder skips the cell instead of computing it twice, and the
kernel drops the lock of a process that dies. Claim files are opened without following
symlinks. `remove_leftovers` deletes claim files no live process holds and temporary files of
dead writers.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from qbench.checkpoints.spec import CheckpointIdentity
from qbench.errors import QBenchError, describe, warn
from qbench.files import (
    make_directory,
    read_text_nofollow,
    remove_if_unlocked,
    remove_stale_temporaries,
    write_json_atomic,
)
from qbench.plan import Cell, plan, recipe_digest, rederived_key
from qbench.recipe import CheckpointSpec, Recipe
from qbench.record import Key, Record, ResultsTable

RECORD_LIMIT = 64 << 20  # bytes; a record above this is not one qbench wrote
PLAN_LIMIT = 64 << 20


def recipe_dir(results_root: Path, recipe: str) -> Path:
    return results_root / recipe


def runs_dir(results_root: Path, recipe: str) -> Path:
    return recipe_dir(results_root, recipe) / "runs"


def result_path(results_root: Path, cell: Cell) -> Path:
    return runs_dir(results_root, cell.recipe) / cell.filename


# ---------------------------------------------------------------- records


def write_record(results_root: Path, cell: Cell, record: Record) -> None:
    write_json_atomic(result_path(results_root, cell), record.to_json())


def read_record(results_root: Path, cell: Cell) -> Record | None:
    """The cell's validated record (finished or failed), or None if it has none; an invalid
    one is moved aside to runs/.invalid/ with a warning and counts as none."""
    path = result_path(results_root, cell)
    try:
        return Record.from_json(read_text_nofollow(path, RECORD_LIMIT), cell)
    except FileNotFoundError:
        return None
    except ValueError as error:
        _set_aside(path, str(error))
        return None


def _set_aside(path: Path, reason: str) -> None:
    folder = path.parent / ".invalid"
    _own_directory(folder)
    target = folder / path.name
    if os.path.lexists(target):
        target = folder / f"{path.name}.{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process moved it first
        return
    warn(f"{path}: {reason}; moved to {target}; the cell will be recomputed")


def load_table(results_root: Path, cells: list[Cell]) -> ResultsTable:
    """The records of `cells` in the results folder (invalid ones set aside)."""
    records = {c.key: r for c in cells if (r := read_record(results_root, c)) is not None}
    return ResultsTable(cells, records)


# ---------------------------------------------------------------- the plan


class PlannedCell(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str
    quantizer: str  # "fp" for the unquantized cell
    key: Key
    file: str
    identity: CheckpointIdentity
    dtype: str | None = None  # the dtype it loads in (a checkpoint's `dtype: auto` resolved)
    determinants: dict[str, Any] | None = None  # what `key` is the digest of (qbench.plan)
    refusal: str | None = None  # why the plan refused the cell


class PlanFile(BaseModel):
    """results/<recipe>/plan.json: what `qbench run` planned, so that report (and gate with
    --results-only) work from the results folder alone (without the checkpoints or the data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str
    recipe_digest: str  # qbench.plan.recipe_digest: the recipe's fields but gate/resources
    source: str  # the recipe file it was planned from
    planned_at: str
    perplexity_columns: list[str]
    tasks: list[str]
    cells: list[PlannedCell]


def plan_path(results_root: Path, recipe: str) -> Path:
    return recipe_dir(results_root, recipe) / "plan.json"


def write_plan(results_root: Path, recipe: Recipe, source: Path, cells: list[Cell]) -> None:
    planned = PlanFile(
        recipe=recipe.name,
        recipe_digest=recipe_digest(recipe),
        source=str(source),
        planned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        perplexity_columns=[spec.column for spec in recipe.eval.perplexity],
        tasks=[task.name for task in recipe.eval.tasks],
        cells=[
            PlannedCell(
                checkpoint=c.checkpoint.name,
                quantizer=c.quantizer_name,
                key=c.key,
                file=c.filename,
                identity=c.identity,
                dtype=c.checkpoint.dtype,
                determinants=json.loads(c.determinants) if c.determinants else None,
                refusal=c.refusal,
            )
            for c in cells
        ],
    )
    write_json_atomic(plan_path(results_root, recipe.name), planned.model_dump(mode="json"))


def read_plan(results_root: Path, recipe: Recipe) -> list[Cell] | None:
    """The cells of plan.json if it was planned from this recipe and every cell re-derives
    (`recorded_plan`); else None, with a warning where plan.json is unreadable or inconsistent
    (it is then ignored)."""
    try:
        return recorded_plan(results_root, recipe)[0]
    except FileNotFoundError:
        return None
    except StalePlanError:
        return None
    except QBenchError as error:
        warn(f"{error}; ignored: planning from the recipe instead")
        return None


class StalePlanError(QBenchError):
    """plan.json was planned from another recipe (or another version of this one)."""


def recorded_plan(results_root: Path, recipe: Recipe) -> tuple[list[Cell], PlanFile]:
    """The cells of plan.json, each checked against `recipe`, and the file.

    Checked: plan.json was planned from this recipe (same digest; else StalePlanError), it
    lists every cell of the recipe once and no other, and every cell's key is the digest of
    its determinants rebuilt from the recipe's own fields, the cell's identity and what the
    determinants say of the environment at plan time (qbench.plan.rederived_key), so a cell
    copied over another, given another's key, listed twice or left out is refused.
    FileNotFoundError without plan.json; QBenchError naming plan.json and the problem.
    """
    path = plan_path(results_root, recipe.name)
    try:
        planned = PlanFile.model_validate_json(read_text_nofollow(path, PLAN_LIMIT))
    except ValueError as error:  # a ValidationError too
        raise QBenchError(f"{path}: unreadable ({describe(error)})") from None
    if planned.recipe != recipe.name or planned.recipe_digest != recipe_digest(recipe):
        raise StalePlanError(f"{path}: planned from another version of the recipe")
    try:
        return _planned_cells(planned, recipe), planned
    except ValueError as error:
        raise QBenchError(f"{path}: {error}") from None


def _planned_cells(planned: PlanFile, recipe: Recipe) -> list[Cell]:
    """plan.json's cells as the recipe's cells, in plan order; ValueError on the first one
    that does not re-derive (see `recorded_plan`)."""
    checkpoints = {c.name: c for c in recipe.checkpoints}
    quantizers = {q.name: q for q in recipe.quantizers}
    expected = [(c, q) for c in checkpoints for q in ["fp", *quantizers]]
    entries: dict[tuple[str, str], PlannedCell] = {}
    for entry in planned.cells:
        pair = (entry.checkpoint, entry.quantizer)
        if pair not in set(expected):
            raise ValueError(f"cell {'/'.join(pair)} is no cell of this recipe")
        if pair in entries:
            raise ValueError(f"cell {'/'.join(pair)} is listed twice")
        entries[pair] = entry
    if missing := [pair for pair in expected if pair not in entries]:
        raise ValueError(f"cell {'/'.join(missing[0])} is missing ({len(missing)} in all)")
    if len({e.key for e in entries.values()}) < len(entries):
        raise ValueError("two cells share one key")
    cells, fp_key = [], None
    for name, quantizer in expected:
        entry = entries[(name, quantizer)]
        where = f"cell {name}/{quantizer}"
        if entry.determinants is None:
            raise ValueError(f"{where}: no determinants (an older qbench's plan): rerun qbench run")
        checkpoint = _planned_dtype(checkpoints[name], entry.dtype)
        config = quantizers.get(quantizer)
        rederived = rederived_key(recipe, checkpoint, config, entry.identity, entry.determinants)
        if rederived != entry.key:
            raise ValueError(f"{where}: its key is not the digest of its fields and identity")
        fp_key = entry.key if config is None else fp_key
        blob = json.dumps(entry.determinants, sort_keys=True)
        cell = Cell(
            recipe.name, checkpoint, config, entry.key, entry.identity, entry.refusal, fp_key, blob
        )
        if entry.file != cell.filename:
            raise ValueError(f"{where}: its file is '{entry.file}', not '{cell.filename}'")
        cells.append(cell)
    return cells


def _planned_dtype(checkpoint: CheckpointSpec, dtype: str | None) -> CheckpointSpec:
    """The checkpoint as planned: in the dtype plan.json names (older plans name none)."""
    return checkpoint if dtype is None else checkpoint.model_copy(update={"dtype": dtype})


def report_cells(results_root: Path, recipe: Recipe, source: Path) -> list[Cell]:
    """The cells a report describes: the last run's plan.json when it was planned from this
    recipe, else a fresh plan (which reads the checkpoints' configs and the data)."""
    return read_plan(results_root, recipe) or plan(recipe, source)


# ---------------------------------------------------------------- claims


class Claim:
    """An exclusive flock on a cell's claim file, held until `release` (or process death)."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path, self._descriptor = path, descriptor

    def release(self) -> None:
        """Delete the claim file while still holding the lock, then unlock."""
        if self._descriptor < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def claims_dir(results_root: Path, recipe: str) -> Path:
    return runs_dir(results_root, recipe) / ".claims"


def claim_path(results_root: Path, cell: Cell) -> Path:
    return claims_dir(results_root, cell.recipe) / f"{Path(cell.filename).stem}.lock"


def claim(results_root: Path, cell: Cell) -> Claim | None:
    """Claim `cell` for this process, or None while another live process holds it."""
    path = claim_path(results_root, cell)
    _own_directory(path.parent)
    while True:
        descriptor = _open_claim(path)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        # The holder may have released (and unlinked) the file between our open and flock:
        # then we hold a lock on a deleted file, and must try again on the path's new file.
        if _is_current(path, descriptor):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            return Claim(path, descriptor)
        os.close(descriptor)


def _open_claim(path: Path) -> int:
    """The claim file's descriptor, never through a symlink: a symlink planted at the claim
    path is removed (its target untouched) and a regular file made in its place."""
    while True:
        try:
            return os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            if error.errno != errno.ELOOP:
                problem = describe(error)
                raise QBenchError(f"{path}: cannot create the claim file: {problem}") from None
        warn(f"{path}: a symlink in place of a claim file; removed (its target is untouched)")
        path.unlink(missing_ok=True)


def _is_current(path: Path, descriptor: int) -> bool:
    try:
        return os.lstat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _own_directory(folder: Path) -> None:
    """A folder qbench keeps inside runs/: made if absent, never a symlink."""
    make_directory(folder)
    if folder.is_symlink():
        raise QBenchError(f"{folder}: a symlink where qbench keeps its own folder; remove it")


def claim_holder(results_root: Path, cell: Cell) -> str:
    """Who holds the cell's claim ('host pid N'), as far as the claim file says."""
    try:
        text = read_text_nofollow(claim_path(results_root, cell), 1024).strip()
    except (OSError, ValueError):
        return "another process"
    return text.splitlines()[0] if text else "another process"


def remove_leftovers(results_root: Path, recipe: str) -> int:
    """Delete claim files that no live process holds and temporary files of dead writers
    (left by killed processes); return how many."""
    claims = claims_dir(results_root, recipe)
    removed = sum(remove_if_unlocked(path) for path in claims.glob("*.lock"))
    for folder in (recipe_dir(results_root, recipe), runs_dir(results_root, recipe)):
        removed += remove_stale_temporaries(folder)
    return removed
