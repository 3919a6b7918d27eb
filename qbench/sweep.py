"""Sweeps: recipes -> plan -> cells -> executor -> results (-> leaderboards, by the CLI).

Every recipe is loaded and planned before any model work, so one bad field stops the sweep
before it starts. The cells a plan refuses (a quantizer that cannot run on a checkpoint) are
listed and recorded as `refused` next, still before any model work. Cells with a finished
record, or one refused while it ran by the same qbench code, are skipped; missing and failed
cells run, so a rerun retries only those. Pending cells are ordered by checkpoint (across
recipes too), so a worker loads each checkpoint once. `qbench run RECIPE` is a sweep of one
recipe, locally.

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
from qbench.record import REFUSED, Record

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


def refusals(planned: list[PlannedRecipe]) -> list[tuple[PlannedRecipe, Cell]]:
    """The cells the plans refuse, in plan order."""
    return [(p, cell) for p in planned for cell in p.cells if cell.refusal is not None]


def record_refusals(planned: list[PlannedRecipe], results_root: Path) -> int:
    """Record every cell its plan refuses as `refused` (no model work) and print one line
    each; a record that already says the same is kept. Returns how many."""
    found = refusals(planned)
    for p, cell in found:
        print(f"{p.recipe.name}: refused {cell.checkpoint.name} x {cell.quantizer_name}: "
              f"{cell.refusal}", flush=True)  # fmt: skip
        record = store.read_record(results_root, cell)
        same = record is not None and record.status == REFUSED and record.refused_at == "plan"
        if not (same and record.error.message == cell.refusal):
            store.write_record(results_root, cell, Record.refused(cell, p.recipe, cell.refusal))
    return len(found)


def pending_jobs(planned: list[PlannedRecipe], results_root: Path) -> list[Job]:
    """Cells to compute: not refused by the plan, without a record that stands (finished, or
    refused while it ran by this qbench code); grouped by checkpoint; one line per recipe."""
    jobs = []
    for p in planned:
        table = store.load_table(results_root, p.cells)
        todo = [
            c
            for c in p.cells
            if c.refusal is None and not ((r := table.record(c)) is not None and r.stands)
        ]
        refused = sum(c.refusal is not None or table.state(c) == REFUSED for c in p.cells)
        failed = len(table.failed_cells())
        retried = f" ({failed} failed before: retried)" if failed else ""
        retried += f", {refused} refused" if refused else ""
        done = len(p.cells) - len(todo) - refused
        print(
            f"{p.recipe.name}: {len(p.cells)} cells, {done} done, {len(todo)} to run{retried}",
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
    refused: list[Job] = field(default_factory=list)  # refused while they ran
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
        if record is not None and record.stands:
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
        if record.status == REFUSED:
            self.refused.append(job)
            print(f"{position}: REFUSED {record.error.message}", flush=True)
            return
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
    executor: Executor,
    progress: bool = True,
) -> Sweep:
    """Compute every pending cell of the planned recipes with `executor`; return the tally.

    Each recipe's plan is written to its results folder first (plan.json), what killed
    processes left there (unheld claim files, temporary files) is deleted, and the refused
    cells are recorded, all before any model work.
    """
    for p in planned:
        store.write_plan(results_root, p.recipe, p.source, p.cells)
        if removed := store.remove_leftovers(results_root, p.recipe.name):
            print(f"{p.recipe.name}: removed {removed} files left by killed runs", flush=True)
    record_refusals(planned, results_root)
    jobs = pending_jobs(planned, results_root)
    state = Sweep(results_root, len(jobs), progress)
    if jobs:
        executor.run(jobs, state)
    return state
