"""The regression gate: quantized cells must keep a minimum recovery of their fp cell.

Recovery is quantized / fp for metrics where higher is better, and fp / quantized for
perplexity, so 1.0 means no loss and lower means worse. A recovery below its threshold, a
missing cell and a failed cell (an exception, OOM or NaN, fp cells included) fail the gate;
absolute expected values from a committed reference only warn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter
from tabulate import tabulate

from qbench.errors import QBenchError, describe
from qbench.files import read_text_nofollow, write_json_atomic
from qbench.recipe import Recipe
from qbench.record import MISSING, ResultsTable
from qbench.store import load_table, report_cells

REFERENCE_LIMIT = 16 << 20  # bytes
# A reference file: {"<checkpoint>/<quantizer>": {"<metric path>": expected value}}.
Reference = TypeAdapter(dict[str, dict[str, float]])


@dataclass(frozen=True)
class Check:
    """One (cell, metric) comparison against its threshold."""

    checkpoint: str
    quantizer: str
    metric: str
    base: float | None
    quantized: float | None
    threshold: float
    lower_is_better: bool
    base_state: str = MISSING  # shown where a value is None: "missing" or "failed"
    quantized_state: str = MISSING

    @property
    def recovery(self) -> float | None:
        if self.base is None or self.quantized is None:
            return None
        if self.lower_is_better:
            return self.base / self.quantized if self.quantized else None
        return self.quantized / self.base if self.base else None

    @property
    def passed(self) -> bool:
        recovery = self.recovery
        return recovery is not None and math.isfinite(recovery) and recovery >= self.threshold


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
                )
            )
    return found


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


def run_gate(recipe: Recipe, source: Path, results_root: Path) -> tuple[bool, str]:
    """(passed, report) for `recipe`'s results under `results_root` (the cells of the last
    run's plan.json, else of a fresh plan)."""
    table = load_table(results_root, report_cells(results_root, recipe, source))
    found = checks(recipe, table)
    rows = [
        [
            c.checkpoint,
            c.quantizer,
            c.metric,
            _number(c.base, c.base_state),
            _number(c.quantized, c.quantized_state),
            _number(c.recovery, "–"),
            f"{c.threshold:.4g}",
            "pass" if c.passed else "FAIL",
        ]
        for c in found
    ]
    headers = ["Checkpoint", "Quantizer", "Metric", "Base", "Quantized", "Recovery", "Threshold"]
    failed = table.failed_cells()
    lines = [
        f"gate {recipe.name} ({recipe.gate.cadence}):",
        tabulate(rows, [*headers, "Status"], tablefmt="github", disable_numparse=True),
    ]
    lines += [
        f"failed cell: {c.checkpoint.name}/{c.quantizer_name}: {table.record(c).error_line()}"
        for c in failed
    ]
    lines += [f"warning: {w}" for w in reference_warnings(recipe, table)]
    passed = all(c.passed for c in found) and not failed
    verdict = f"{'PASSED' if passed else 'FAILED'}: {sum(c.passed for c in found)} of "
    verdict += f"{len(found)} checks passed"
    lines.append(verdict + (f"; {len(failed)} cells failed" if failed else ""))
    return passed, "\n".join(lines)


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
