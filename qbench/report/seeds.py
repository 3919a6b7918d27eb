"""Aggregates over a checkpoint group (e.g. one variant trained with several seeds).

A group's value for one quantizer is the mean over its members, with the sample standard
deviation, the min-max range and the count of members that have a value. A missing cell or
metric is left out of the aggregate, never counted as 0; a group with no values is missing.
Deltas are taken per member against the same member's fp cell, then aggregated.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from tabulate import tabulate

from qbench.recipe import CheckpointSpec, Recipe
from qbench.record import MISSING, ResultsTable

# (metric path, header, format) of the diagnostics columns of the seed table.
DIAGNOSTIC_COLUMNS = [
    ("diagnostics.max_activation", "max \\|h\\|", "{:.2f}"),
    ("diagnostics.max_median_ratio", "max/median", "{:.1f}"),
    ("diagnostics.first_token_mass", "first-token mass", "{:.3f}"),
    ("diagnostics.sink_mass_non_trigger", "sink BOS mass non-trigger", "{:.3f}"),
    ("diagnostics.sink_mass_trigger", "sink BOS mass trigger", "{:.3f}"),
    ("diagnostics.max_input_kurtosis", "max kurtosis (inputs)", "{:.1f}"),
    ("diagnostics.min_sqnr_db", "min SQNR dB", "{:.1f}"),
]
TASK_COLUMNS = ("diagnostics.sink_mass_non_trigger", "diagnostics.sink_mass_trigger")


# How a quantized value compares with its fp value: (function, format, signed).
COMPARISONS = [(operator.sub, "{:.3f}", True), (operator.truediv, "{:.4f}", False)]


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None for one value), range, and count of a group."""

    mean: float
    std: float | None
    low: float
    high: float
    n: int

    def format(self, pattern: str, signed: bool = False) -> str:
        """'mean ± std' with `pattern` (e.g. '{:.3f}'); a '+' on positive means if signed."""
        mean = pattern.format(self.mean)
        mean = f"+{mean}" if signed and self.mean > 0 else mean
        return mean if self.std is None else f"{mean} ± {pattern.format(self.std)}"


def spread(values: list[float | None]) -> Spread | None:
    """The spread of the values that are present; None if none is."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else None
    return Spread(statistics.fmean(present), std, min(present), max(present), len(present))


def checkpoint_groups(recipe: Recipe) -> dict[str, list[CheckpointSpec]]:
    """Checkpoints by group, in recipe order; a checkpoint without a group is its own."""
    groups: dict[str, list[CheckpointSpec]] = {}
    for checkpoint in recipe.checkpoints:
        groups.setdefault(checkpoint.group or checkpoint.name, []).append(checkpoint)
    return groups


def group_values(
    members: list[CheckpointSpec],
    quantizer: str,
    table: ResultsTable,
    metric: str,
    against_fp: Callable[[float, float], float] | None = None,
) -> list[float | None]:
    """One value per member for `quantizer` at a metric path; with `against_fp` (e.g.
    operator.sub), that function of the value and the same member's fp value."""
    values = []
    for member in members:
        cell = table.find(member.name, quantizer)
        value = table.value(cell, metric)
        if against_fp is not None:
            base = table.value(table.find(member.name, "fp"), metric)
            value = None if value is None or base is None else against_fp(value, base)
        values.append(value)
    return values


def seed_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: mean ± std over each group's members, per quantizer (only if groups exist)."""
    groups = checkpoint_groups(recipe)
    if all(len(members) == 1 for members in groups.values()):
        return []
    quantizers = ["fp", *(q.name for q in recipe.quantizers)]
    columns = [spec.column for spec in recipe.eval.perplexity]
    members = [m for group in groups.values() for m in group]
    diagnostics = [  # a synthetic task's sink columns only where records have them
        column
        for column in (DIAGNOSTIC_COLUMNS if recipe.eval.diagnostics else [])
        if column[0] not in TASK_COLUMNS
        or any(
            v is not None for q in quantizers for v in group_values(members, q, table, column[0])
        )
    ]
    rows = []
    for name, members in groups.items():
        for quantizer in quantizers:
            row = [name, quantizer]
            counts = []
            for column in columns:
                metric = f"perplexity.{column}"
                values = group_values(members, quantizer, table, metric)
                counts.append(sum(v is not None for v in values))
                row.append(_shown(spread(values), "{:.3f}"))
                for against_fp, pattern, signed in COMPARISONS:
                    if quantizer == "fp":
                        row.append("")
                        continue
                    versus = group_values(members, quantizer, table, metric, against_fp)
                    row.append(_shown(spread(versus), pattern, signed))
            for metric, _, pattern in diagnostics:
                values = group_values(members, quantizer, table, metric)
                unquantized = quantizer == "fp" and metric.endswith("min_sqnr_db")  # no error
                row.append("" if unquantized else _shown(spread(values), pattern))
            rows.append([*row[:2], f"{min(counts)}/{len(members)}", *row[2:]])
    headers = ["group", "quantizer", "n"]
    for column in columns:
        headers += [f"{column} ppl", "Δ vs fp", "×fp"]
    headers += [header for _, header, _ in diagnostics]
    return [
        "## Over seeds",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        "Mean ± sample standard deviation over the group's checkpoints (n = how many have a "
        "result); Δ = quantized − fp and ×fp = quantized / fp are taken per checkpoint against "
        "its own fp cell. Missing cells are left out, never counted as 0.",
        "",
    ]


def _shown(value: Spread | None, pattern: str, signed: bool = False) -> str:
    return MISSING if value is None else value.format(pattern, signed)
