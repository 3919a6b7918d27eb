"""Sweeps: recipes -> plan -> cells -> executor -> results (-> leaderboards, by the CLI).

Every recipe is loaded and planned before any model work, so one bad field stops the sweep
before it starts. Cells with a finished record are skipped; missing and failed cells run, so
a rerun retries only those. Pending cells are ordered by checkpoint (across recipes too), so
a worker loads each checkpoint once. `qbench run RECIPE` is a sweep of one recipe, locally.

The driver (this module) claims each cell before it is computed and writes its record when
it comes back, whichever executor computed it (qbench.executors: `local`, `ray`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qbench import store
from qbench.eval.tasks import discard_request_cache
from qbench.plan import Cell, plan
from qbench.recipe import Recipe, RecipeError, load_recipe
from qbench.record import Record

if TYPE_CHECKING:
    from qbench.executors import Executor


@dataclass(frozen=True)
class PlannedRecipe:
    recipe: Recipe
    source: Path
    cells: list[Cell]


@dataclass(frozen=True)
class Job:
    """One cell to compute, with the recipe that says how to evaluate it."""

    recipe: Recipe
    source: Path
    cell: Cell

    @property
    def label(self) -> str:
        return f"{self.recipe.name}: {self.cell.checkpoint.name} x {self.cell.quantizer_name}"


def plan_recipes(sources: list[Path]) -> list[PlannedRecipe]:
    """Load and plan every recipe; two recipes may not share a name (they share results/)."""
    planned: list[PlannedRecipe] = []
    for source in sources:
        recipe = load_recipe(source)
        same = [p.source for p in planned if p.recipe.name == recipe.name]
        if same:
            raise RecipeError(
                f"{source}: name: '{recipe.name}' is also the name of {same[0]}; "
                "recipes of one sweep need distinct names (each names its results folder)"
            )
        planned.append(PlannedRecipe(recipe, source, plan(recipe, source)))
    return planned


def pending_jobs(planned: list[PlannedRecipe], results_root: Path) -> list[Job]:
    """Cells without a finished record, grouped by checkpoint; one summary line per recipe."""
    jobs = []
    for p in planned:
        table = store.load_table(results_root, p.cells)
        todo = [c for c in p.cells if table.finished(c) is None]
        failed = len(table.failed_cells())
        retried = f" ({failed} failed before: retried)" if failed else ""
        print(
            f"{p.recipe.name}: {len(p.cells)} cells, {len(p.cells) - len(todo)} done, "
            f"{len(todo)} to run{retried}",
            flush=True,
        )
        jobs += [Job(p.recipe, p.source, cell) for cell in todo]
    order: dict[str, int] = {}
    for job in jobs:
        order.setdefault(job.cell.load_key, len(order))
    return sorted(jobs, key=lambda job: order[job.cell.load_key])


@dataclass
class Sweep:
    """The driver's side of a sweep: claims cells, writes records, prints progress, counts."""

    results_root: Path
    total: int
    progress: bool = True
    ran: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    elsewhere: list[Job] = field(default_factory=list)

    def claim(self, job: Job) -> store.Claim | None:
        """A claim on the job's cell, or None (with a line saying why) if it is not ours to run:
        another live process holds it, or finished it since this sweep planned."""
        claim = store.claim(self.results_root, job.cell)
        if claim is None:
            holder = store.claim_holder(self.results_root, job.cell)
            print(f"{job.label}: being computed by {holder}; left to it", flush=True)
            self.elsewhere.append(job)
            return None
        record = store.read_record(self.results_root, job.cell)
        if record is not None and record.finished:
            claim.release()
            print(f"{job.label}: finished by another sweep", flush=True)
            self.elsewhere.append(job)
            return None
        return claim

    def record(self, job: Job, record: Record) -> None:
        """Write the cell's record (atomically) while its claim is held, and report it."""
        store.write_record(self.results_root, job.cell, record)
        self.ran.append(job)
        position = f"[{len(self.ran)}/{self.total}] {job.label}"
        if not record.finished:
            self.failed.append(job)
            print(f"{position}: FAILED {record.error_line()}", flush=True)
            return
        discard_request_cache(self.results_root / job.recipe.name, job.cell.key)
        metrics = record.metrics
        scores = ", ".join(f"{k} {v:.3f}" for k, v in metrics.perplexity.items())
        if metrics.zero_shot_average is not None:
            scores += f"; {len(job.recipe.eval.tasks)}-task average {metrics.zero_shot_average:.4f}"
        print(f"{position}: perplexity {scores} ({record.wall_time_s:.1f} s)", flush=True)


def sweep(
    planned: list[PlannedRecipe],
    results_root: Path,
    executor: Executor | None = None,
    progress: bool = True,
) -> Sweep:
    """Compute every pending cell of the planned recipes (default: locally); return the tally.

    Each recipe's plan is written to its results folder first (plan.json), and what killed
    processes left there (unheld claim files, temporary files) is deleted.
    """
    from qbench.executors import LocalExecutor

    for p in planned:
        store.write_plan(results_root, p.recipe, p.source, p.cells)
        if removed := store.remove_leftovers(results_root, p.recipe.name):
            print(f"{p.recipe.name}: removed {removed} files left by killed runs", flush=True)
    jobs = pending_jobs(planned, results_root)
    state = Sweep(results_root, len(jobs), progress)
    if jobs:
        (executor or LocalExecutor()).run(jobs, state)
    return state
