"""The error breakdown: what each part of a quantizer (weights, activations, KV cache) costs
alone, beside the whole, for the quantizers a recipe marks `breakdown: true`.

Each part is a cell of its own (qbench.quant.quantizer.QuantizerConfig.breakdown_parts): the
same pipeline with only that part rounded. Its ×fp comes with the paired bootstrap interval
against the same checkpoint's fp cell, as the leaderboard's (qbench.report.intervals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

from qbench.report.intervals import delta_cells

if TYPE_CHECKING:
    from qbench.plan import Cell
    from qbench.recipe import Recipe
    from qbench.record import ResultsTable

PART_LABELS = {"weights": "weights only", "activations": "activations only", "kv": "KV only"}


def part_names(recipe: Recipe) -> set[str]:
    """The names of the breakdown cells (left out of the leaderboard's main table)."""
    return {p.name for q in recipe.quantizers for _, p in q.breakdown_parts()}


def breakdown_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: per checkpoint and broken-down quantizer, the whole's and each part's ×fp
    [interval] per perplexity column; [] when no quantizer asks for a breakdown."""
    wholes = [q for q in recipe.quantizers if q.breakdown]
    if not wholes:
        return []
    columns = [spec.column for spec in recipe.eval.perplexity]
    rows = []
    for checkpoint in recipe.checkpoints:
        for whole in wholes:
            parts = [("whole", whole), *whole.breakdown_parts()]
            for part, quantizer in parts:
                cell = table.find(checkpoint.name, quantizer.name)
                label = "whole" if part == "whole" else PART_LABELS[part]
                row = [checkpoint.name, whole.name, label, quantizer.precision()]
                rows.append(row + [_ratio(table, cell, recipe, c) for c in columns])
    headers = ["checkpoint", "quantizer", "part", "precision", *(f"{c} ×fp" for c in columns)]
    return [
        "## Error breakdown",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        "Each part is its own cell (`<quantizer>.weights`, `.activations`, `.kv`): the same "
        "pipeline, transforms included (a learned rotation reuses the whole's training), with "
        "only that part rounded and the rest in float; activations-only and KV-only parts "
        "round activations to nearest (as gptq does). ×fp = part / fp perplexity of the same "
        "checkpoint, with the paired bootstrap interval of the main table. The parts' errors "
        "need not multiply to the whole's: they interact.",
        "",
    ]


def _ratio(table: ResultsTable, cell: Cell | None, recipe: Recipe, column: str) -> str:
    """'×fp [low, high]' of a cell, or why there is none (missing, failed, fp ...)."""
    if cell is None:
        return "missing"
    record, fp_cell = table.finished(cell), table.fp(cell)
    fp = table.finished(fp_cell) if fp_cell is not None else None
    if record is None:
        return table.state(cell)
    if fp is None:
        return f"fp {table.state(fp_cell) if fp_cell is not None else 'missing'}"
    return delta_cells(record, fp, column, recipe.report.bootstrap)[1]
