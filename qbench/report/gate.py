"""The regression gate: quantized cells must keep a minimum recovery of their fp cell.

Recovery is quantized / fp for metrics where higher is better, and fp / quantized for
perplexity, so 1.0 means no loss and lower means worse. A recovery below its threshold, a
missing cell and a failed cell (an exception, OOM or NaN, fp cells included) fail the gate;
absolute expected values from a committed reference only warn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from qbench.plan import Cell, plan
from qbench.recipe import Recipe
from qbench.store import FAILED, error_line, is_failed, read_result

LOWER_IS_BETTER = {"perplexity"}


@dataclass(frozen=True)
class Check:
    """One (cell, metric) comparison against its threshold."""

    checkpoint: str
    quantizer: str
    metric: str
    base: float | None
    quantized: float | None
    threshold: float
    base_state: str = "missing"  # shown where a value is None: "missing" or "failed"
    quantized_state: str = "missing"

    lower_is_better: bool | None = None  # None: perplexity is, everything else is not

    @property
    def recovery(self) -> float | None:
        if self.base is None or self.quantized is None:
            return None
        lower = self.lower_is_better
        if lower is None:
            lower = self.metric.split(".")[0] in LOWER_IS_BETTER
        if lower:
            return self.base / self.quantized if self.quantized else None
        return self.quantized / self.base if self.base else None

    @property
    def passed(self) -> bool:
        recovery = self.recovery
        return recovery is not None and math.isfinite(recovery) and recovery >= self.threshold


def metric_value(result: dict[str, Any] | None, metric: str) -> float | None:
    """metrics.<group>.<name> (a task's headline value for tasks.<name>) or metrics.<name> of
    a result; None if absent (a missing or failed cell)."""
    value = _metric_entry(result, metric)
    if isinstance(value, dict):  # a task: {metric, value, stderr, higher_is_better}
        value = value.get("value")
    return float(value) if isinstance(value, int | float) else None


def _metric_entry(result: dict[str, Any] | None, metric: str) -> Any:
    value: Any = (result or {}).get("metrics") or {}
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _lower_is_better(metric: str, *results: dict[str, Any] | None) -> bool | None:
    """What a task's entry says (lambada's perplexity: lower), else None (by metric name)."""
    for result in results:
        entry = _metric_entry(result, metric)
        if isinstance(entry, dict) and "higher_is_better" in entry:
            return not entry["higher_is_better"]
    return None


def checks(recipe: Recipe, cells: list[Cell], results: dict[str, dict | None]) -> list[Check]:
    gate = recipe.gate
    found = []
    for cell in cells:
        if cell.quantizer is None:
            continue
        fp = next(c for c in cells if c.checkpoint == cell.checkpoint and c.quantizer is None)
        thresholds = gate.min_recovery | gate.quantizers.get(cell.quantizer.name, {})
        for metric, threshold in thresholds.items():
            found.append(
                Check(
                    cell.checkpoint.name,
                    cell.quantizer.name,
                    metric,
                    metric_value(results[fp.key], metric),
                    metric_value(results[cell.key], metric),
                    threshold,
                    _state(results[fp.key]),
                    _state(results[cell.key]),
                    _lower_is_better(metric, results[fp.key], results[cell.key]),
                )
            )
    return found


def _state(result: dict[str, Any] | None) -> str:
    return FAILED if is_failed(result) else "missing"


def reference_warnings(
    recipe: Recipe, cells: list[Cell], results: dict[str, dict | None]
) -> list[str]:
    """Cells whose value moved more than `tolerance` (relative) from the committed reference."""
    gate = recipe.gate
    if gate.reference is None or not Path(gate.reference).is_file():
        return [] if gate.reference is None else [f"reference {gate.reference} not found"]
    expected = json.loads(Path(gate.reference).read_text())
    warnings = []
    for cell in cells:
        name = f"{cell.checkpoint.name}/{cell.quantizer_name}"
        for metric, value in expected.get(name, {}).items():
            actual = metric_value(results[cell.key], metric)
            if actual is None or abs(actual - value) > gate.tolerance * abs(value):
                shown = _state(results[cell.key]) if actual is None else f"{actual:.6g}"
                warnings.append(f"{name} {metric}: {shown} vs reference {value:.6g}")
    return warnings


def run_gate(recipe: Recipe, source: Path, results_root: Path) -> tuple[bool, str]:
    """(passed, report) for `recipe`'s results under `results_root`."""
    cells = plan(recipe, source)
    results = {c.key: read_result(results_root, c) for c in cells}
    found = checks(recipe, cells, results)
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
    failed = [c for c in cells if is_failed(results[c.key])]
    lines = [
        f"gate {recipe.name} ({recipe.gate.cadence}):",
        tabulate(rows, [*headers, "Status"], tablefmt="github", disable_numparse=True),
    ]
    lines += [
        f"failed cell: {c.checkpoint.name}/{c.quantizer_name}: {error_line(results[c.key])}"
        for c in failed
    ]
    lines += [f"warning: {w}" for w in reference_warnings(recipe, cells, results)]
    passed = all(c.passed for c in found) and not failed
    verdict = f"{'PASSED' if passed else 'FAILED'}: {sum(c.passed for c in found)} of "
    verdict += f"{len(found)} checks passed"
    lines.append(verdict + (f"; {len(failed)} cells failed" if failed else ""))
    return passed, "\n".join(lines)


def write_reference(recipe: Recipe, source: Path, results_root: Path, path: Path) -> None:
    """Record the gated metrics of every cell as the expected values."""
    cells = plan(recipe, source)
    metrics = set(recipe.gate.min_recovery).union(*recipe.gate.quantizers.values())
    expected = {}
    for cell in cells:
        result = read_result(results_root, cell)
        values = {m: v for m in sorted(metrics) if (v := metric_value(result, m)) is not None}
        if values:
            expected[f"{cell.checkpoint.name}/{cell.quantizer_name}"] = values
    path.write_text(json.dumps(expected, indent=2) + "\n")


def _number(value: float | None, otherwise: str) -> str:
    return otherwise if value is None else f"{value:.4f}"
