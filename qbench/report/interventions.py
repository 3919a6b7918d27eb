"""The leaderboard's block for the papers' interventions: ablations, not quantizers.

A cell whose quantizer holds an ablation (qbench.quant.steps.ablations: zeroing the super
weights, SW + SA, the control, clipping the massive activations, removing the attention sink),
alone ("fp (ablation)") or followed by a quantizer's steps, is listed here and not among the
quantizers: its perplexity ×fp against the same checkpoint unquantized with the paired
interval, what the ablation changed (from the cell's record: the weights it zeroed, the
elements it clipped while the model was evaluated, the attention modules it masked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from qbench.report.intervals import delta_cells

if TYPE_CHECKING:
    from qbench.plan import Cell
    from qbench.recipe import Recipe
    from qbench.record import ResultsTable

TITLE = "## Interventions (ablations, not quantizers)"


def is_intervention(cell: Cell) -> bool:
    return cell.quantizer is not None and cell.quantizer.ablation


def intervention_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown lines: one row per intervention cell ([] without any)."""
    cells = [c for c in table.cells if is_intervention(c)]
    if not cells:
        return []
    columns = [spec.column for spec in recipe.eval.perplexity]
    headers = ["checkpoint", "intervention", "precision", "what it changes", "what it did"]
    for column in columns:
        headers += [f"{column} ppl", "×fp"]
    rows = []
    for cell in cells:
        record = table.record(cell)
        row = [cell.checkpoint.name, cell.quantizer_name, cell.precision, cell.label]
        row.append(what_it_did(record.coverage or {}) if record and record.finished else "")
        for column in columns:
            row += _perplexity(table, cell, column, recipe)
        rows.append(row)
    return [
        TITLE,
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        'Interventions on the float model from the outlier papers (Yu et al. 2024, "The Super '
        'Weight": zero the super weights, and restore the super activation they cause, SW + SA; '
        "the control zeroes as many of the largest other weights of the same matrices; Sun et al."
        ' 2024, "Massive Activations": clip the residual stream; the attention sink removed: '
        "the first key masked for every later query, attention renormalised). Each asks whether "
        "an outlier acts as a rescaling factor or as a contributor; none is a quantizer. A "
        "precision other than `fp (ablation)` is a quantizer applied after the ablation (in "
        "brackets beside its perplexity: the ablated float model's, before rounding). ×fp: "
        "perplexity over the same checkpoint unquantized, with the paired bootstrap interval of "
        "the table above. `failed`: the cell failed (see Failed cells).",
        "",
    ]


def _perplexity(table: ResultsTable, cell: Cell, column: str, recipe: Recipe) -> list[str]:
    record, fp = table.finished(cell), table.finished(table.fp(cell))
    if record is None:
        return ["failed" if table.record(cell) else "missing", ""]
    value = record.metrics.perplexity[column]
    text = f"{value:.3f}"
    stage = (record.stages or {}).get("transformed", {}).get("perplexity", {})
    if column in stage:  # a quantizer after the ablation: the ablated float model's too
        text += f" (float {stage[column]:.3f})"
    if fp is None:
        return [text, ""]
    return [text, delta_cells(record, fp, column, recipe.report.bootstrap)[1]]


def what_it_did(coverage: dict[str, Any]) -> str:
    """The record's facts in a line: weights zeroed, elements clipped, modules masked."""
    parts = []
    for entry in coverage.get("ablations", []):
        kind = entry["transform"]
        if kind in ("zero_super_weights", "zero_large_weights"):
            zeroed = ", ".join(_weight(w) for w in entry["zeroed"])
            restored = "; SA restored" if entry.get("restored_activation") else ""
            parts.append(f"zeroed {zeroed}{restored}")
        elif kind == "remove_attention_sink":
            parts.append(f"key 0 masked in {entry['attention_modules']} attention modules")
    if clipped := coverage.get("clipped"):
        count, total = clipped["elements"]
        channels = ", ".join(clipped["channels"]) or "none"
        parts.append(
            f"clipped {count:,} of {total:,} residual elements at ±{clipped['threshold']:g} "
            f"(channels {channels})"
        )
    return "; ".join(parts)


def _weight(weight: dict[str, Any]) -> str:
    spike = f", spike {weight['ratio']:.0f}x" if "ratio" in weight else ""
    return f"{weight['module']}[{weight['row']}, {weight['column']}] = {weight['value']:.3g}{spike}"
