"""One line per precision and checkpoint: the best method, and whether the data tell it from
the next best (a paired bootstrap over the windows both cells scored)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbench.report.bootstrap import paired_perplexity
from qbench.report.intervals import NO_WINDOWS, windows

if TYPE_CHECKING:
    from qbench.recipe import Recipe
    from qbench.recipe.schema import BootstrapSpec
    from qbench.record import ResultsTable


def precision_blocks(recipe: Recipe) -> dict[str, list[str]]:
    """{precision label: quantizer names in recipe order}, in recipe order."""
    blocks: dict[str, list[str]] = {}
    for quantizer in recipe.quantizers:
        blocks.setdefault(quantizer.precision(), []).append(quantizer.name)
    return blocks


def verdict_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: per checkpoint and precision, the quantizer with the lowest ×fp on the first
    perplexity column, and whether it is distinguishable from the next (the next / best
    perplexity ratio's paired interval excludes 1); [] without quantized results."""
    column = recipe.eval.perplexity[0].column
    spec = recipe.report.bootstrap
    lines = []
    for checkpoint in recipe.checkpoints:
        fp = table.finished(table.find(checkpoint.name, "fp"))
        for precision, names in precision_blocks(recipe).items():
            ranked = sorted(
                (record.metric(f"perplexity.{column}") / fp.metric(f"perplexity.{column}"), name)
                for name in names
                if fp is not None and (record := table.finished(table.find(checkpoint.name, name)))
            )
            if not ranked:
                continue
            (ratio, best), where = ranked[0], f"**{precision}** on `{checkpoint.name}`"
            if len(ranked) == 1:
                lines.append(f"- {where}: `{best}` (×fp {ratio:.3f}), the only one with a result")
                continue
            second, runner_up = ranked[1]
            told = _distinction(table, checkpoint.name, (best, runner_up), column, spec)
            lines.append(
                f"- {where}: best `{best}` (×fp {ratio:.3f}); next `{runner_up}` (×fp "
                f"{second:.3f}): {told}"
            )
    if not lines:
        return []
    return [
        "## Verdict per precision",
        "",
        *lines,
        "",
        f"Best: the lowest ×fp on `{column}`. Next / best: the ratio of the two cells' "
        f"perplexities with its {spec.confidence:.0%} paired bootstrap interval over the "
        "windows both scored; distinguishable where it excludes 1.",
        "",
    ]


def _distinction(
    table: ResultsTable, checkpoint: str, names: tuple[str, str], column: str, spec: BootstrapSpec
) -> str:
    """'distinguishable (next / best r [low, high])', or why there is no interval."""
    pair = [windows(table.finished(table.find(checkpoint, n)), column) for n in names]
    if None in pair:
        return f"no interval ({NO_WINDOWS})"
    try:
        _, ratio = paired_perplexity(pair[0], pair[1], spec)
    except ValueError as error:
        return f"no interval ({error})"
    verdict = "distinguishable" if ratio.excludes(1.0) else "not distinguishable"
    return f"{verdict} (next / best {ratio.format('{:.3f}')})"
