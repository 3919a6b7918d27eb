"""Intervals on every degradation, from what the records keep: per-window NLL sums
(`details.perplexity.<column>.window_nll`) and per-document scores
(`details.tasks.<task>.doc_scores`).

- A quantized cell against its fp cell: Δ and ×fp perplexity per column, Δ per task and Δ of
  the zero-shot average, each with a paired bootstrap interval (qbench.report.bootstrap).
- A group against the baseline group (`report.baseline`): the group's mean ×fp over its
  members (seeds) and its difference from the baseline's, by a hierarchical bootstrap over
  seeds and windows, with whether the interval excludes 0.

Intervals are computed when the report is built (never stored in a cell's record), so
changing `report.bootstrap` never reruns a cell; `results/<recipe>/intervals.json` holds them.
A record without per-window NLLs (written before qbench kept them) gets no interval, and
the leaderboard says so.
"""

from __future__ import annotations

import dataclasses
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from qbench.files import write_json_atomic
from qbench.recipe.schema import BootstrapSpec
from qbench.report.bootstrap import (
    Interval,
    Member,
    Windows,
    degradation_difference,
    group_degradation,
    paired_perplexity,
    paired_scores,
)
from qbench.report.seeds import checkpoint_groups

if TYPE_CHECKING:
    from qbench.recipe import CheckpointSpec, Recipe
    from qbench.record import Record, ResultsTable
NO_INTERVAL = "[no interval]"
NO_WINDOWS = "a record has no per-window NLLs (written before qbench kept them): rerun it"


def windows(record: Record | None, column: str) -> Windows | None:
    """The per-window NLLs one (finished) record keeps for a perplexity column, or None."""
    details = record.details if record is not None else None
    entry = (details.perplexity.get(column) if details is not None else None) or {}
    if "window_nll" not in entry:
        return None
    nll = np.asarray(entry["window_nll"], dtype=float)
    return Windows(nll, np.full(len(nll), entry["window_tokens"]), entry["windows_sha"])


def perplexity_intervals(
    result: Record, fp: Record, column: str, spec: BootstrapSpec
) -> tuple[Interval, Interval] | str:
    """(Δ, ×fp) of a quantized cell's perplexity against its fp cell, or why there is none.
    The estimates are the recorded perplexities' difference and ratio."""
    value, base = windows(result, column), windows(fp, column)
    if value is None or base is None:
        return NO_WINDOWS
    try:
        delta, ratio = paired_perplexity(base, value, spec)
    except ValueError as error:
        return str(error)
    quantized, unquantized = _perplexity(result, column), _perplexity(fp, column)
    return (
        dataclasses.replace(delta, estimate=quantized - unquantized),
        dataclasses.replace(ratio, estimate=quantized / unquantized),
    )


def _perplexity(record: Record, column: str) -> float:
    return record.metrics.perplexity[column]


def delta_cells(result: Record, fp: Record, column: str, spec: BootstrapSpec) -> list[str]:
    """The leaderboard's Δ and ×fp texts: 'estimate [low, high]'."""
    intervals = perplexity_intervals(result, fp, column, spec)
    if isinstance(intervals, str):
        value, base = _perplexity(result, column), _perplexity(fp, column)
        return [f"{value - base:+.3f} {NO_INTERVAL}", f"{value / base:.3f} {NO_INTERVAL}"]
    delta, ratio = intervals
    return [delta.format("{:.3f}", signed=True), ratio.format("{:.3f}")]


def interval_note(spec: BootstrapSpec) -> list[str]:
    """What the brackets of Δ and ×fp mean."""
    return [
        f"Brackets: the {spec.confidence:.0%} interval of a paired bootstrap over the windows "
        f"({spec.iterations} resamples, seed {spec.seed}): both cells' perplexities recomputed "
        "on the same resampled windows (qbench/report/bootstrap.py). "
        f"`{NO_INTERVAL}`: {NO_WINDOWS}.",
    ]


# ---------------------------------------------------------------- tasks


def doc_scores(record: Record | None, task: str) -> list[float] | None:
    details = record.details if record is not None else None
    runs = (details.tasks if details is not None else None) or {}
    return (runs.get(task) or {}).get("doc_scores")


def task_intervals(
    result: Record, fp: Record, tasks: list[str], spec: BootstrapSpec
) -> dict[str, Interval | None]:
    """Δ score (quantized − fp) per task and of the average over the higher-is-better tasks
    (key "average"), with paired intervals over documents; None where a record lacks
    per-document scores."""
    scores = {t: (doc_scores(fp, t), doc_scores(result, t)) for t in tasks}
    intervals: dict[str, Interval | None] = {
        t: _scores_interval([pair], spec) for t, pair in scores.items()
    }
    headlines = result.metrics.tasks or {}
    averaged = [t for t in tasks if t not in headlines or headlines[t].higher_is_better]
    intervals["average"] = _scores_interval([scores[t] for t in averaged], spec)
    return intervals


def _scores_interval(
    pairs: list[tuple[list[float] | None, list[float] | None]], spec: BootstrapSpec
) -> Interval | None:
    if not pairs or any(base is None or value is None for base, value in pairs):
        return None
    try:
        return paired_scores([b for b, _ in pairs], [v for _, v in pairs], spec)
    except ValueError:
        return None


# ---------------------------------------------------------------- groups vs the baseline


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One group under one quantizer on one perplexity column."""

    quantizer: str
    column: str
    group: str
    members: int  # with both cells and per-window NLLs
    of: int  # members in the group
    degradation: Interval | None = None  # mean ×fp over members
    difference: Interval | None = None  # minus the baseline's; None for the baseline itself
    paired_seeds: bool | None = None
    shared_windows: bool | None = None
    reason: str | None = None  # why an interval is missing

    def verdict(self) -> str:
        if self.difference is None:
            return ""
        if not self.difference.excludes(0):
            return "not distinguishable"
        return "more than baseline" if self.difference.estimate > 0 else "less than baseline"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict() or None}


Seeded = list[tuple[int | None, Member]]  # (training seed, or None; (fp, quantized) windows)


def _members(
    members: list[CheckpointSpec], quantizer: str, column: str, table: ResultsTable
) -> Seeded:
    """The members that have both cells with per-window NLLs, with their training seeds."""
    found = []
    for member in members:
        fp, value = (
            windows(table.finished(table.find(member.name, name)), column)
            for name in ("fp", quantizer)
        )
        if fp is not None and value is not None:
            found.append((member.train.seed if member.train else None, (fp, value)))
    return found


def _matched(variant: Seeded, baseline: Seeded) -> tuple[list[Member], list[Member], bool]:
    """Both groups' members, ordered by seed and paired when they hold the same distinct
    training seeds; else as they are, unpaired."""
    seeds = [seed for seed, _ in variant]
    distinct = None not in seeds and len(set(seeds)) == len(seeds)
    if distinct and sorted(seeds) == sorted(seed for seed, _ in baseline):
        ordered = [sorted(group, key=itemgetter(0)) for group in (variant, baseline)]
        return [m for _, m in ordered[0]], [m for _, m in ordered[1]], True
    return [m for _, m in variant], [m for _, m in baseline], False


def comparisons(recipe: Recipe, table: ResultsTable) -> list[Comparison]:
    """Every group's mean ×fp per quantizer and column, and its difference from the
    baseline's (recipe.report.baseline); [] when there is no baseline and no group of two."""
    groups = checkpoint_groups(recipe)
    baseline = recipe.report.baseline
    if baseline is None and all(len(members) == 1 for members in groups.values()):
        return []
    found = []
    for quantizer in recipe.quantizers:
        for column in (spec.column for spec in recipe.eval.perplexity):
            seeded = {
                name: _members(members, quantizer.name, column, table)
                for name, members in groups.items()
            }
            for name, members in groups.items():
                base = seeded[baseline] if baseline not in (None, name) else None
                found.append(
                    _compare(
                        Comparison(quantizer.name, column, name, len(seeded[name]), len(members)),
                        seeded[name],
                        base,
                        recipe.report.bootstrap,
                    )
                )
    return found


def _compare(
    empty: Comparison, own: Seeded, baseline: Seeded | None, spec: BootstrapSpec
) -> Comparison:
    """`empty` with the group's degradation and, given the baseline's members, the
    difference; a reason where an interval cannot be drawn."""
    if not own:
        return dataclasses.replace(empty, reason=NO_WINDOWS)
    try:
        degradation = group_degradation([member for _, member in own], spec)
        if baseline is None:
            return dataclasses.replace(empty, degradation=degradation)
        if not baseline:
            reason = f"baseline: {NO_WINDOWS}"
            return dataclasses.replace(empty, degradation=degradation, reason=reason)
        variant_members, baseline_members, paired = _matched(own, baseline)
        result = degradation_difference(variant_members, baseline_members, spec, paired)
    except ValueError as error:
        return dataclasses.replace(empty, reason=str(error))
    return dataclasses.replace(
        empty,
        degradation=degradation,
        difference=result.difference,
        paired_seeds=result.paired_seeds,
        shared_windows=result.shared_windows,
    )


def comparison_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: per quantizer, column and group, mean ×fp [interval] and, against the
    baseline, the difference [interval] and whether it excludes 0."""
    found = comparisons(recipe, table)
    if not found:
        return []
    baseline = recipe.report.baseline
    spec = recipe.report.bootstrap
    headers = ["quantizer", "column", "group", "n", "×fp (mean over members)"]
    if baseline:
        headers += [f"×fp − {baseline}'s", "seeds", "degrades"]
    rows = []
    for c in found:
        row = [c.quantizer, c.column, c.group, f"{c.members}/{c.of}"]
        row.append(c.degradation.format("{:.4f}") if c.degradation else f"{NO_INTERVAL}")
        if baseline:
            if c.group == baseline:
                row += ["(baseline)", "", ""]
            elif c.difference is None:
                row += [f"{NO_INTERVAL}: {c.reason}" if c.reason else NO_INTERVAL, "", ""]
            else:
                seeds = "paired" if c.paired_seeds else "independent"
                row += [c.difference.format("{:.4f}", signed=True), seeds, c.verdict()]
        rows.append(row)
    title = f"## Degradation against {baseline}" if baseline else "## Degradation per group"
    return [
        title,
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        *_method_note(spec, baseline),
        "",
    ]


def _method_note(spec: BootstrapSpec, baseline: str | None) -> list[str]:
    against = (
        f" The difference is the group's mean ×fp minus {baseline}'s on the same resample; "
        "seeds `paired`: both groups hold the same training seeds, drawn together (seed s of "
        "every variant saw the same data order and started from the same shared weights), "
        "else drawn independently. `degrades`: `more than baseline` / `less than baseline` "
        "when the interval excludes 0, else `not distinguishable`."
        if baseline
        else ""
    )
    return [
        f"×fp = quantized / fp perplexity of each member (seed), averaged over the group; "
        f"brackets: the {spec.confidence:.0%} interval of a hierarchical bootstrap "
        f"({spec.iterations} resamples, seed {spec.seed}) that draws the members with "
        "replacement and, within them, the windows with replacement (the same windows for "
        "every member when all scored the same tokens)." + against + " With 3 seeds the seed "
        "level has only 10 distinct resamples and a bootstrap interval is narrower than a t "
        "interval over seeds would be: read an interval that barely excludes 0 as indicative, "
        "not conclusive. (The ± of the Over seeds table is the spread over seeds, a sample "
        "standard deviation, not an interval.)"
    ]


# ---------------------------------------------------------------- intervals.json


def write_intervals(recipe: Recipe, table: ResultsTable, folder: Path) -> Path:
    """results/<recipe>/intervals.json: every cell's intervals against its fp cell, and the
    group comparisons."""
    spec = recipe.report.bootstrap
    tasks = [t.name for t in recipe.eval.tasks]
    records = []
    for cell in table.cells:
        result = table.finished(cell)
        fp = table.finished(table.fp(cell)) if cell.quantizer is not None else None
        if result is None or fp is None:
            continue
        perplexity = {}
        for column in (s.column for s in recipe.eval.perplexity):
            found = perplexity_intervals(result, fp, column, spec)
            perplexity[column] = (
                {"reason": found}
                if isinstance(found, str)
                else {"delta": found[0].as_dict(), "ratio": found[1].as_dict()}
            )
        task_found = task_intervals(result, fp, tasks, spec) if tasks else {}
        records.append(
            {
                "checkpoint": cell.checkpoint.name,
                "quantizer": cell.quantizer_name,
                "perplexity": perplexity,
                "tasks": {k: v.as_dict() if v else None for k, v in task_found.items()},
            }
        )
    path = folder / "intervals.json"
    write_json_atomic(
        path,
        {
            "recipe": recipe.name,
            "bootstrap": spec.model_dump(),
            "baseline": recipe.report.baseline,
            "cells": records,
            "comparisons": [c.as_dict() for c in comparisons(recipe, table)],
        },
    )
    return path
