"""The regression gate: quantized cells must keep a minimum recovery of their fp cell.

Recovery is quantized / fp for metrics where higher is better, and fp / quantized for
perplexity, so 1.0 means no loss and lower means worse. A recovery below its threshold, a
missing cell, a failed cell (an exception, OOM or NaN, fp cells included) and a refused one
fail the gate; absolute expected values from a committed reference only warn.

The gate checks what it reads: by default it plans the recipe now (the checkpoints' content
and the data as they are), so a result of changed weights, a broken config or a deleted
checkpoint is not current and fails; `results_only` gates the cells of plan.json instead,
each re-derived (qbench.store.recorded_plan), and the report says so. `gate.bound` gates the
recovery's interval (paired bootstrap, qbench.report.intervals) instead of its estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter
from tabulate import tabulate

from qbench.errors import QBenchError, describe
from qbench.files import read_text_nofollow, write_json_atomic
from qbench.plan import Cell, plan
from qbench.recipe import Recipe
from qbench.record import FAILED, MISSING, REFUSED, ResultsTable
from qbench.report.intervals import perplexity_intervals, task_intervals
from qbench.store import StalePlanError, load_table, plan_path, recorded_plan, report_cells

REFERENCE_LIMIT = 16 << 20  # bytes
# A reference file: {"<checkpoint>/<quantizer>": {"<metric path>": expected value}}.
Reference = TypeAdapter(dict[str, dict[str, float]])


@dataclass(frozen=True)
class Check:
    """One (cell, metric) comparison against its threshold.

    `interval`: the recovery's (low, high) from a paired bootstrap, where the records allow
    one; `bound`: what must reach the threshold (point: the estimate; lower / upper: that
    end of the interval)."""

    checkpoint: str
    quantizer: str
    metric: str
    base: float | None
    quantized: float | None
    threshold: float
    lower_is_better: bool
    base_state: str = MISSING  # shown where a value is None: "missing", "failed", "refused"
    quantized_state: str = MISSING
    interval: tuple[float, float] | None = None
    bound: str = "point"

    @property
    def recovery(self) -> float | None:
        if self.base is None or self.quantized is None:
            return None
        if self.lower_is_better:
            return self.base / self.quantized if self.quantized else None
        return self.quantized / self.base if self.base else None

    @property
    def gated_value(self) -> float | None:
        """The number compared with the threshold (see `bound`)."""
        if self.bound == "point":
            return self.recovery
        if self.recovery is None or self.interval is None:
            return None
        return self.interval[0] if self.bound == "lower" else self.interval[1]

    @property
    def passed(self) -> bool:
        value = self.gated_value
        return value is not None and math.isfinite(value) and value >= self.threshold


def checks(recipe: Recipe, table: ResultsTable) -> list[Check]:
    """Every gated (quantized cell, metric) against its fp cell."""
    gate = recipe.gate
    found = []
    for cell in table.cells:
        if cell.quantizer is None:
            continue
        fp = table.fp(cell)
        thresholds = gate.min_recovery | gate.quantizers.get(cell.quantizer.name, {})
        for metric, threshold in thresholds.items():
            found.append(
                Check(
                    cell.checkpoint.name,
                    cell.quantizer.name,
                    metric,
                    table.value(fp, metric),
                    table.value(cell, metric),
                    threshold,
                    table.lower_is_better(metric),
                    table.state(fp) if fp is not None else MISSING,
                    table.state(cell),
                    recovery_interval(recipe, table, cell, metric),
                    gate.bound,
                )
            )
    return found


def recovery_interval(
    recipe: Recipe, table: ResultsTable, cell: Cell, metric: str
) -> tuple[float, float] | None:
    """(low, high) of a quantized cell's recovery at `metric` from the paired bootstrap of its
    records against its fp cell's (recipe.report.bootstrap): perplexity from the ×fp interval
    over windows, a task or the zero-shot average from the Δ interval over documents
    (higher-is-better scores); None where the records keep no per-window / per-document
    values."""
    group, _, name = metric.partition(".")
    spec = recipe.report.bootstrap
    fp = table.fp(cell)
    result, base_record = table.finished(cell), table.finished(fp) if fp else None
    if result is None or base_record is None:
        return None
    if group == "perplexity":  # ×fp = quantized / fp; recovery is its inverse
        found = perplexity_intervals(result, base_record, name, spec)
        return None if isinstance(found, str) else (1 / found[1].high, 1 / found[1].low)
    base = table.value(fp, metric)
    if not base or table.lower_is_better(metric):
        return None
    average = metric == "zero_shot_average"
    tasks = [t.name for t in recipe.eval.tasks] if average else [name]
    delta = task_intervals(result, base_record, tasks, spec).get("average" if average else name)
    return None if delta is None else ((base + delta.low) / base, (base + delta.high) / base)


def reference_warnings(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Cells whose value moved more than `tolerance` (relative) from the committed reference."""
    gate = recipe.gate
    if gate.reference is None:
        return []
    path = Path(gate.reference)
    try:
        expected = Reference.validate_json(read_text_nofollow(path, REFERENCE_LIMIT))
    except FileNotFoundError:
        return [f"reference {gate.reference} not found"]
    except ValueError as error:  # a ValidationError too
        raise QBenchError(
            f"{path}: gate.reference: not a reference file ({describe(error)}); rewrite it "
            "with `qbench gate --write-reference`"
        ) from None
    warnings = []
    for cell in table.cells:
        name = f"{cell.checkpoint.name}/{cell.quantizer_name}"
        for metric, value in expected.get(name, {}).items():
            actual = table.value(cell, metric)
            if actual is None or abs(actual - value) > gate.tolerance * abs(value):
                shown = table.state(cell) if actual is None else f"{actual:.6g}"
                warnings.append(f"{name} {metric}: {shown} vs reference {value:.6g}")
    return warnings


def gate_cells(
    recipe: Recipe, source: Path, results_root: Path, results_only: bool = False
) -> tuple[list[Cell], str]:
    """The cells to gate and what they are: the recipe planned now (default), or with
    `results_only` the cells of plan.json, each re-derived. QBenchError when the recipe
    cannot be planned now (its results are then not current), or plan.json is absent, of
    another recipe or inconsistent."""
    if not results_only:
        try:
            return plan(recipe, source), "the recipe planned now"
        except QBenchError as error:
            raise QBenchError(
                f"{error}\n{source}: gate: the recipe cannot be planned now, so no recorded "
                "result is current; fix it, or gate the recorded results alone with "
                "--results-only"
            ) from None
    path = plan_path(results_root, recipe.name)
    try:
        cells, planned = recorded_plan(results_root, recipe)
    except FileNotFoundError:
        raise QBenchError(f"{path}: gate --results-only: no plan.json; run the recipe") from None
    except StalePlanError as error:
        raise QBenchError(f"{error}; gate --results-only needs the plan of this recipe") from None
    return cells, (
        f"recorded results only (--results-only): the cells of plan.json as planned "
        f"{planned.planned_at}; checkpoints and data not checked now"
    )


def run_gate(
    recipe: Recipe, source: Path, results_root: Path, results_only: bool = False
) -> tuple[bool, str]:
    """(passed, report) for `recipe`'s results under `results_root` (see `gate_cells`)."""
    cells, what = gate_cells(recipe, source, results_root, results_only)
    table = load_table(results_root, cells)
    found = checks(recipe, table)
    rows = [
        [
            c.checkpoint,
            c.quantizer,
            c.metric,
            _number(c.base, c.base_state),
            _number(c.quantized, c.quantized_state),
            _number(c.recovery, "–"),
            "–" if c.interval is None else f"[{c.interval[0]:.4f}, {c.interval[1]:.4f}]",
            f"{c.threshold:.4g}",
            "pass" if c.passed else "FAIL",
        ]
        for c in found
    ]
    headers = ["Checkpoint", "Quantizer", "Metric", "Base", "Quantized", "Recovery", "Interval"]
    bound = recipe.gate.bound
    gated = "" if bound == "point" else f"; the interval's {bound} bound is gated"
    lines = [
        f"gate {recipe.name} ({recipe.gate.cadence}), {what}{gated}:",
        tabulate(rows, [*headers, "Threshold", "Status"], tablefmt="github", disable_numparse=True),
    ]
    unfinished = [c for c in table.cells if table.state(c) != "ok"]
    for cell in unfinished:
        name = f"{cell.checkpoint.name}/{cell.quantizer_name}"
        record, state = table.record(cell), table.state(cell)
        if state == FAILED:
            lines.append(f"failed cell: {name}: {record.error_line()}")
        elif state == REFUSED:
            lines.append(f"refused cell: {name}: {record.error.message}")
        else:
            lines.append(f"missing cell: {name}: no record of its current key; run the recipe")
    if bound != "point":
        lines += [
            f"no interval: {c.checkpoint}/{c.quantizer} {c.metric} (the records keep no "
            "per-window / per-document values)"
            for c in found
            if c.recovery is not None and c.interval is None
        ]
    lines += [f"warning: {w}" for w in reference_warnings(recipe, table)]
    passed = all(c.passed for c in found) and not unfinished
    verdict = f"{'PASSED' if passed else 'FAILED'}: {sum(c.passed for c in found)} of "
    verdict += f"{len(found)} checks passed"
    counts = {state: sum(table.state(c) == state for c in unfinished) for state in _UNFINISHED}
    extra = [f"{n} cells {state}" for state, n in counts.items() if n]
    lines.append(verdict + "".join(f"; {e}" for e in extra))
    return passed, "\n".join(lines)


_UNFINISHED = (FAILED, REFUSED, MISSING)


def write_reference(recipe: Recipe, source: Path, results_root: Path, path: Path) -> None:
    """Record the gated metrics of every finished cell as the expected values."""
    table = load_table(results_root, report_cells(results_root, recipe, source))
    metrics = set(recipe.gate.min_recovery).union(*recipe.gate.quantizers.values())
    expected = {}
    for cell in table.cells:
        values = {m: v for m in sorted(metrics) if (v := table.value(cell, m)) is not None}
        if values:
            expected[f"{cell.checkpoint.name}/{cell.quantizer_name}"] = values
    write_json_atomic(path, expected)


def _number(value: float | None, otherwise: str) -> str:
    return otherwise if value is None else f"{value:.4f}"
