"""Zero-shot task aggregates: the leaderboard section, tasks.json and plots/recovery.png.

Per cell and task, the headline metric lm-eval reports (acc_norm where lm-eval's published
tables use it, else acc) with its stderr; per cell the average over the recipe's tasks; per
quantized cell the delta (quantized − fp) and the recovery (quantized / fp) of that average
against the fp cell of the same checkpoint. A value that is missing (no result yet, a task
that did not run) stays missing: it is never read as 0, and an average over tasks with one
missing is itself missing.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

from qbench.eval.task_scores import zero_shot_average
from qbench.files import save_figure, write_json_atomic
from qbench.plan import Cell
from qbench.recipe import Recipe
from qbench.record import MISSING, Record, ResultsTable, TaskScore
from qbench.report.bootstrap import Interval
from qbench.report.intervals import NO_INTERVAL, doc_scores, task_intervals

# ---------------------------------------------------------------- aggregates


def task_names(recipe: Recipe) -> list[str]:
    return [t.name for t in recipe.eval.tasks]


def task_entry(record: Record | None, task: str) -> TaskScore | None:
    """The headline {metric, value, stderr, higher_is_better} of one task, or None."""
    entry = record.metric_entry(f"tasks.{task}") if record is not None else None
    return entry if isinstance(entry, TaskScore) and entry.value is not None else None


def cell_average(record: Record | None, tasks: list[str]) -> float | None:
    """The average over `tasks`, recomputed from the record; None if any task is missing."""
    if record is None or record.metrics is None:
        return None
    headlines = {n: s.model_dump() for n, s in (record.metrics.tasks or {}).items()}
    return zero_shot_average(headlines, tasks)


def delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def recovery(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base == 0 else value / base


def summary(recipe: Recipe, table: ResultsTable) -> list[dict[str, Any]]:
    """One entry per cell: task values, average, delta and recovery against its own fp."""
    tasks = task_names(recipe)
    entries = []
    for cell in table.cells:
        record = table.finished(cell)
        fp = table.fp(cell)
        fp_record = table.finished(fp) if fp is not None else None
        average, base = cell_average(record, tasks), cell_average(fp_record, tasks)
        intervals = (
            task_intervals(record, fp_record, tasks, recipe.report.bootstrap)
            if cell.quantizer and record and fp_record
            else {}
        )
        entries.append(
            {
                "checkpoint": cell.checkpoint.name,
                "quantizer": cell.quantizer_name,
                "precision": _precision(cell),
                "key": cell.key,
                "has_result": record is not None,
                "tasks": {
                    t: _task_record(task_entry(record, t), task_entry(fp_record, t))
                    | {"delta_interval": _as_dict(intervals.get(t))}
                    | _chance_record(record, t, recipe.report.bootstrap.confidence)
                    for t in tasks
                },
                "average": average,
                "fp_average": base,
                "delta": delta(average, base) if cell.quantizer else None,
                "delta_interval": _as_dict(intervals.get("average")),
                "recovery": recovery(average, base) if cell.quantizer else None,
                "perplexity": {
                    s.column: table.value(cell, f"perplexity.{s.column}")
                    for s in recipe.eval.perplexity
                },
            }
        )
    return entries


def chance(record: Record | None, task: str) -> float | None:
    """A task's chance level as its run recorded it (a uniform guess's accuracy), or None."""
    details = record.details if record is not None else None
    runs = (details.tasks if details is not None else None) or {}
    return (runs.get(task) or {}).get("chance")


def score_low(record: Record | None, task: str, confidence: float) -> float | None:
    """The lower end of a task score's two-sided `confidence` interval (normal, from the
    per-document scores' spread, else from lm-eval's stderr); None without a score."""
    entry = task_entry(record, task)
    if entry is None:
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    scores = doc_scores(record, task)
    if scores is not None and len(scores) > 1:
        return entry.value - z * statistics.stdev(scores) / math.sqrt(len(scores))
    return entry.value - z * entry.stderr if entry.stderr is not None else entry.value


def _chance_record(record: Record | None, task: str, confidence: float) -> dict[str, Any]:
    """{chance, at_chance}: at_chance when the score's interval reaches down to chance (the
    task cannot tell this model from a guess); None where either is unknown."""
    level, low = chance(record, task), score_low(record, task, confidence)
    return {"chance": level, "at_chance": None if level is None or low is None else low <= level}


def _task_record(entry: TaskScore | None, fp: TaskScore | None) -> dict[str, Any]:
    value = entry.value if entry is not None else None
    base = fp.value if fp is not None else None
    return {
        "metric": (entry or fp).metric if (entry or fp) is not None else None,
        "value": value,
        "stderr": entry.stderr if entry is not None else None,
        "delta": delta(value, base),
        "recovery": recovery(value, base),
    }


# ---------------------------------------------------------------- markdown

_PRECISION = re.compile(r"^W(\d+)A(\d+)(?:KV(\d+))?")


def _precision(cell: Cell) -> str:
    return cell.quantizer.precision() if cell.quantizer else "fp"


def block_order(precision: str) -> tuple[int, ...]:
    """fp first, then wider before narrower: W8A8, W4A16, W4A8, W4A4, W4A4KV4."""
    if precision == "fp":
        return (0,)
    match = _PRECISION.match(precision)
    if not match:
        return (2,)
    w, a, kv = (int(g) if g else 99 for g in match.groups())
    return (1, -w, -a, -kv)


def _blocks(recipe: Recipe) -> list[tuple[str, list[str]]]:
    """[(precision, [quantizer names in recipe order])], fp block first."""
    blocks: dict[str, list[str]] = {"fp": ["fp"]}
    for q in recipe.quantizers:
        blocks.setdefault(q.precision(), []).append(q.name)
    return sorted(blocks.items(), key=lambda item: block_order(item[0]))


def _pct(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{100 * value:.{digits}f}"


def _show(text: str | None, bold: bool = False) -> str:
    if text is None:
        return MISSING
    return f"**{text}**" if bold else text


def _best(values: dict[str, float | None], higher: bool) -> str | None:
    """The quantizer with the best value, when at least two compete."""
    scored = [(v if higher else -v, name) for name, v in values.items() if v is not None]
    return max(scored)[1] if len(scored) >= 2 else None


def tasks_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown lines: blocks by precision, then per-task tables; [] without tasks."""
    if not recipe.eval.tasks:
        return []
    records = {(r["checkpoint"], r["quantizer"]): r for r in summary(recipe, table)}
    columns = [s.column for s in recipe.eval.perplexity]
    methods = {q.name: f"{q.method}" for q in recipe.quantizers} | {"fp": "unquantized"}
    headers = ["precision", "quantizer", "method"]
    for checkpoint in recipe.checkpoints:
        headers += [f"{checkpoint.name} avg", f"{checkpoint.name} recovery"]
        headers += [f"{checkpoint.name} {col} ppl" for col in columns]
    rows = []
    for precision, names in _blocks(recipe):
        bold: dict[tuple[str, str], str | None] = {}
        for checkpoint in recipe.checkpoints:
            block = {n: records[(checkpoint.name, n)] for n in names}
            bold[(checkpoint.name, "avg")] = _best(
                {n: r["average"] for n, r in block.items()}, True
            )
            bold[(checkpoint.name, "rec")] = _best(
                {n: r["recovery"] for n, r in block.items()}, True
            )
            for col in columns:
                ppl = {n: r["perplexity"][col] for n, r in block.items()}
                bold[(checkpoint.name, f"ppl:{col}")] = _best(ppl, False)
        for i, name in enumerate(names):
            row = [f"**{precision}**" if i == 0 else "", name, methods[name]]
            for checkpoint in recipe.checkpoints:
                r = records[(checkpoint.name, name)]
                row.append(_show(_pct(r["average"]), bold[(checkpoint.name, "avg")] == name))
                rec = "100%" if name == "fp" and r["average"] is not None else None
                rec = rec or (None if r["recovery"] is None else f"{100 * r['recovery']:.1f}%")
                row.append(_show(rec, bold[(checkpoint.name, "rec")] == name))
                for col in columns:
                    ppl = r["perplexity"][col]
                    text = None if ppl is None else f"{ppl:.3f}"
                    row.append(_show(text, bold[(checkpoint.name, f"ppl:{col}")] == name))
            rows.append(row)
    lines = [
        "## Zero-shot tasks",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        *_notes(recipe, table),
        "",
    ]
    for checkpoint in recipe.checkpoints:
        lines += _per_task_table(recipe, checkpoint.name, records)
    lines += _chance_lines(recipe, records)
    lines += ["## Perplexity per cell", ""]
    return lines


def _chance_lines(recipe: Recipe, records: dict[Any, Any]) -> list[str]:
    """One line per (checkpoint, task) whose fp score is not above chance."""
    confidence = recipe.report.bootstrap.confidence
    lines = []
    for checkpoint in recipe.checkpoints:
        for task, entry in records[(checkpoint.name, "fp")]["tasks"].items():
            if entry["at_chance"]:
                lines.append(
                    f"- **{task}** on `{checkpoint.name}`: fp {_pct(entry['value'])}%, chance "
                    f"{_pct(entry['chance'])}% (within the score's {confidence:.0%} interval): "
                    "at chance: this task says nothing about this checkpoint, nor its "
                    "quantized cells' recovery."
                )
    return ["### At chance", "", *lines, ""] if lines else []


def _per_task_table(recipe: Recipe, checkpoint: str, records: dict[Any, Any]) -> list[str]:
    tasks = task_names(recipe)
    metric = {
        t: next(
            (r["tasks"][t]["metric"] for (c, _), r in records.items()
             if c == checkpoint and r["tasks"][t]["metric"]),
            None,
        )
        for t in tasks
    }  # fmt: skip
    level = {
        t: next(
            (r["tasks"][t]["chance"] for (c, _), r in records.items()
             if c == checkpoint and r["tasks"][t]["chance"] is not None),
            None,
        )
        for t in tasks
    }  # fmt: skip
    headers = ["precision", "quantizer"]
    for t in tasks:
        about = [metric[t] or "", f"chance {_pct(level[t])}" if level[t] is not None else ""]
        headers.append(f"{t} ({'; '.join(a for a in about if a)})" if any(about) else t)
    headers += ["avg", "Δ avg", "recovery"]
    rows = []
    for precision, names in _blocks(recipe):
        for i, name in enumerate(names):
            r = records[(checkpoint, name)]
            row = [precision if i == 0 else "", name]
            for t in tasks:
                entry = r["tasks"][t]
                value = _pct(entry["value"])
                if value is not None and entry["stderr"] is not None:
                    value += f" ± {_pct(entry['stderr'])}"
                if value is not None and entry["at_chance"]:
                    value += " (at chance)"
                row.append(_show(value))
            row.append(_show(_pct(r["average"])))
            if name == "fp":
                row += ["", ""]
            else:
                row.append(_show(_delta_text(r["delta"], r["delta_interval"])))
                row.append(_show(None if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"))
            rows.append(row)
    return [
        f"### {checkpoint}: per task",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
    ]


def _as_dict(interval: Interval | None) -> dict[str, float] | None:
    return interval.as_dict() if interval else None


def _delta_text(value: float | None, interval: dict[str, float] | None) -> str | None:
    """Points, with the paired bootstrap interval of the average's Δ where there is one."""
    if value is None:
        return None
    if interval is None:
        return f"{100 * value:+.1f} {NO_INTERVAL}"
    return Interval(**interval | {"estimate": value}).format("{:.1f}", signed=True, scale=100)


def _notes(recipe: Recipe, table: ResultsTable) -> list[str]:
    options = recipe.eval.task_options
    sources: dict[str, str] = {}
    for cell in table.cells:
        record = table.finished(cell)
        details = record.details if record is not None else None
        for name, run in ((details.tasks if details is not None else None) or {}).items():
            sources.setdefault(name, run.get("source", "?"))
    described = []
    for spec in recipe.eval.tasks:
        limit = spec.limit if spec.limit is not None else options.limit
        fewshot = spec.num_fewshot if spec.num_fewshot is not None else options.num_fewshot
        scope = f"first {limit} documents" if limit else "all documents"
        described.append(
            f"`{spec.name}` ({sources.get(spec.name, 'not run yet')}, {scope}, {fewshot}-shot)"
        )
    return [
        "Accuracies in percent (higher is better), from lm-evaluation-harness run in process on "
        "each cell's model. Per task the metric lm-eval's published tables use (acc_norm for "
        "arc, piqa, hellaswag, embedded_mc; acc otherwise) ± its stderr; `avg` is their mean "
        "over the recipe's tasks; recovery = quantized avg / fp avg and Δ = quantized − fp "
        "(points), both against the same checkpoint unquantized. The best value of each "
        "precision block is in bold. `missing` = no result (never counted as 0); an average "
        "with a missing task is missing. Δ avg [brackets]: the "
        f"{recipe.report.bootstrap.confidence:.0%} interval of a paired bootstrap over "
        "documents, each task's documents drawn within it, both cells scored on the same "
        f"draws ({recipe.report.bootstrap.iterations} resamples); `{NO_INTERVAL}`: a record "
        "has no per-document scores (written before qbench kept them). `chance`: the accuracy "
        "of a uniform guess (1 / choices, averaged over the documents); `(at chance)`: the fp "
        "score's interval reaches down to it, so the task cannot tell the model from a guess.",
        "",
        "Tasks: " + "; ".join(described) + ". Sources: local = lm-eval's prompts and metrics "
        "on the release files in QBENCH_DATA_DIR; lm-eval = lm-eval's own task and dataset; "
        "embedded = qbench's embedded next-sentence task.",
    ]


# ---------------------------------------------------------------- files


def write_task_outputs(recipe: Recipe, table: ResultsTable, folder: Path) -> list[Path]:
    """results/<recipe>/tasks.json and plots/recovery.png; nothing without tasks."""
    if not recipe.eval.tasks:
        return []
    records = summary(recipe, table)
    path = folder / "tasks.json"
    write_json_atomic(path, {"recipe": recipe.name, "cells": records})
    return [path, write_recovery_plot(recipe, records, folder / "plots")]


def write_recovery_plot(recipe: Recipe, records: list[dict[str, Any]], folder: Path) -> Path:
    """Grouped bars from 0: recovery of the zero-shot average per checkpoint and quantizer,
    with the paired bootstrap interval of each (from the Δ avg interval) as error bars."""
    from matplotlib.figure import Figure

    checkpoints = [c.name for c in recipe.checkpoints]
    quantizers = [q.name for q in recipe.quantizers]
    by_cell = {(r["checkpoint"], r["quantizer"]): r for r in records}
    figure = Figure(figsize=(max(6, 1.2 * len(checkpoints) * max(1, len(quantizers))), 4),
                    layout="constrained")  # fmt: skip
    axes = figure.subplots()
    width = 0.8 / max(1, len(quantizers))
    for j, quantizer in enumerate(quantizers):
        xs = [i + (j - (len(quantizers) - 1) / 2) * width for i in range(len(checkpoints))]
        entries = [by_cell.get((c, quantizer)) or {} for c in checkpoints]
        values = [e.get("recovery") for e in entries]
        spans = [_recovery_span(e) for e in entries]
        heights = [100 * v if v is not None else 0.0 for v in values]
        pairs = list(zip(values, spans, strict=True))
        errors = [  # below and above each bar
            [100 * (v - s[0]) if v is not None and s else 0.0 for v, s in pairs],
            [100 * (s[1] - v) if v is not None and s else 0.0 for v, s in pairs],
        ]
        bars = axes.bar(xs, heights, width, yerr=errors, capsize=3, label=quantizer)
        for bar, value, span in zip(bars, values, spans, strict=True):
            x = bar.get_x() + width / 2
            if value is None:
                bar.set_visible(False)
                axes.text(x, 0, MISSING, rotation=90, ha="center", va="bottom",
                          fontsize="x-small")  # fmt: skip
            else:
                top = 100 * (span[1] if span else value)
                axes.text(x, top, f"{100 * value:.1f}", ha="center", va="bottom",
                          fontsize="x-small")  # fmt: skip
    axes.set_ylim(bottom=0)
    axes.axhline(100, color="black", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(checkpoints)), checkpoints)
    axes.set(ylabel="recovery of zero-shot average (% of fp)")
    confidence = recipe.report.bootstrap.confidence
    axes.set_title(
        f"{recipe.name}: quantized / fp, average over {len(recipe.eval.tasks)} tasks "
        f"({confidence:.0%} paired bootstrap intervals)"
    )
    if quantizers:
        axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return save_figure(figure, folder / "recovery.png")


def _recovery_span(entry: dict[str, Any]) -> tuple[float, float] | None:
    """(low, high) recovery of a cell's average from its Δ avg interval and fp average."""
    interval, base = entry.get("delta_interval"), entry.get("fp_average")
    if not interval or not base:
        return None
    return (base + interval["low"]) / base, (base + interval["high"]) / base
