"""The leaderboard's answer to "do the outlier-absorbing variants lose less than the baseline?":
per group, whether its unquantized members grew an attention sink and a massive activation,
and how its degradation under each quantizer compares with the baseline's; then a plain
verdict computed from those numbers (never written by hand).

An attention sink: the sink head's attention mass on the first token (BOS) from the queries
where a task rewards a no-op (`diagnostics.sink_mass_non_trigger`, Guo et al. 2024) or, on
text without query types, the largest mass on the first token of any head
(`diagnostics.max_head_first_token_mass`), at least SINK_MASS. A massive activation: the
largest |h| of the residual stream at least MASSIVE_RATIO times its layer's median
(`diagnostics.max_median_ratio`; Sun et al. 2024 call activations massive at ~100x and more).
"""

from __future__ import annotations

from tabulate import tabulate

from qbench.recipe import CheckpointSpec, Recipe
from qbench.record import MISSING, ResultsTable
from qbench.report.intervals import Comparison, comparisons
from qbench.report.seeds import checkpoint_groups, group_values, spread

SINK_MASS = 0.9
MASSIVE_RATIO = 100.0
SINK_METRICS = (
    ("diagnostics.sink_mass_non_trigger", "BOS mass from non-trigger queries at the sink head"),
    ("diagnostics.max_head_first_token_mass", "largest first-token mass of any head"),
)
RATIO = "diagnostics.max_median_ratio"
PEAK_POSITION = "diagnostics.max_activation_position"
SHORT = {"more than baseline": "more", "less than baseline": "less", "not distinguishable": "≈"}


def outlier_verdict_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: the per-group outlier and degradation table and the verdict (with
    report.baseline and eval.diagnostics only)."""
    baseline = recipe.report.baseline
    if baseline is None or recipe.eval.diagnostics is None:
        return []
    groups = checkpoint_groups(recipe)
    sink = _sink_metric(groups, table)
    column = recipe.eval.perplexity[0].column
    found = {
        (c.quantizer, c.group): c
        for c in comparisons(recipe, table)
        if c.column == column and c.group in groups
    }
    quantizers = [q.name for q in recipe.quantizers]
    rows = [
        _row(name, members, table, sink, [found.get((q, name)) for q in quantizers], baseline)
        for name, members in groups.items()
    ]
    headers = ["group", "sink mass", f"≥ {SINK_MASS}", "max/median", f"≥ {MASSIVE_RATIO:g}"]
    headers += ["peak on token 0", *(f"{q} ×fp − {baseline}'s" for q in quantizers)]
    return [
        f"## Outliers and degradation against {baseline}",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        f"Unquantized members (fp cells). sink mass: {sink[1]} (mean ± std over seeds), and "
        f"how many members reach {SINK_MASS}; max/median: the largest residual-stream "
        f"|h| over its layer's median |h|, and how many members reach {MASSIVE_RATIO:g}; peak "
        "on token 0: members whose largest |h| sits on the first token (BOS). The "
        f"differences are the `Degradation against {baseline}` section's ({column} column): "
        "`less` / `more`: the interval excludes 0; `≈`: it does not.",
        "",
        "**Verdict** (computed from the numbers above):",
        "",
        *_verdict(groups, table, sink, found, quantizers, baseline),
        "",
    ]


def _sink_metric(groups: dict[str, list[CheckpointSpec]], table: ResultsTable) -> tuple[str, str]:
    """The task's non-trigger sink mass where the records have it, else the largest head's."""
    members = [m for group in groups.values() for m in group]
    for metric, label in SINK_METRICS:
        if any(v is not None for v in group_values(members, "fp", table, metric)):
            return metric, label
    return SINK_METRICS[-1]


def _row(
    name: str,
    members: list[CheckpointSpec],
    table: ResultsTable,
    sink: tuple[str, str],
    found: list[Comparison | None],
    baseline: str,
) -> list[str]:
    masses = group_values(members, "fp", table, sink[0])
    ratios = group_values(members, "fp", table, RATIO)
    positions = group_values(members, "fp", table, PEAK_POSITION)
    row = [name, _spread(masses, "{:.3f}"), _count(masses, SINK_MASS)]
    row += [_spread(ratios, "{:.0f}"), _count(ratios, MASSIVE_RATIO)]
    row.append(_of([p == 0 for p in positions if p is not None], len(members)))
    for comparison in found:
        row.append(_difference(comparison, name == baseline))
    return row


def _verdict(
    groups: dict[str, list[CheckpointSpec]],
    table: ResultsTable,
    sink: tuple[str, str],
    found: dict[tuple[str, str], Comparison],
    quantizers: list[str],
    baseline: str,
) -> list[str]:
    members = groups[baseline]
    masses = [v for v in group_values(members, "fp", table, sink[0]) if v is not None]
    ratios = [v for v in group_values(members, "fp", table, RATIO) if v is not None]
    has_sink = sum(v >= SINK_MASS for v in masses)
    has_peak = sum(v >= MASSIVE_RATIO for v in ratios)
    lines = [
        f"- {baseline}: an attention sink (sink mass ≥ {SINK_MASS}) in {has_sink} of "
        f"{len(members)} members, a massive activation (max/median ≥ {MASSIVE_RATIO:g}) in "
        f"{has_peak} of {len(members)}."
    ]
    if not masses or not ratios or has_sink < len(members) or has_peak < len(members):
        lines.append(
            f"- So the comparison does not test what the variants are built to absorb in "
            f"every {baseline} member: read its differences as architecture effects, not as "
            "outlier absorption."
        )
    for name in (n for n in groups if n != baseline):
        change = _outlier_change(groups[name], members, table, sink, baseline)
        lines.append(f"- {name}: {change}.")
    for quantizer in quantizers:
        verdicts: dict[str, list[str]] = {}
        for name in groups:
            comparison = found.get((quantizer, name))
            if name != baseline and comparison is not None:
                key = comparison.verdict() or f"no interval ({comparison.reason})"
                verdicts.setdefault(key, []).append(name)
        parts = [f"{key}: {', '.join(names)}" for key, names in sorted(verdicts.items())]
        less = len(verdicts.get("less than baseline", []))
        lines.append(
            f"- Under {quantizer}, {less} of {len(groups) - 1} variants degrade less than "
            f"{baseline} (interval excludes 0); " + ("; ".join(parts) or "no comparison") + "."
        )
    return lines


def _outlier_change(
    members: list[CheckpointSpec],
    baseline: list[CheckpointSpec],
    table: ResultsTable,
    sink: tuple[str, str],
    name: str,
) -> str:
    """'sink mass 0.012 (baseline 0.975), max/median 14 (baseline 310)': group means."""
    parts = []
    for metric, label, pattern in (
        (sink[0], "sink mass", "{:.3f}"),
        (RATIO, "max/median", "{:.0f}"),
    ):
        own, base = (spread(group_values(g, "fp", table, metric)) for g in (members, baseline))
        if own is None or base is None:
            parts.append(f"{label} {MISSING}")
            continue
        parts.append(f"{label} {pattern.format(own.mean)} ({name} {pattern.format(base.mean)})")
    return ", ".join(parts)


def _spread(values: list[float | None], pattern: str) -> str:
    found = spread(values)
    return MISSING if found is None else found.format(pattern)


def _count(values: list[float | None], threshold: float) -> str:
    present = [v for v in values if v is not None]
    return _of([v >= threshold for v in present], len(values))


def _of(hits: list[bool], total: int) -> str:
    return f"{sum(hits)}/{total}" if hits else MISSING


def _difference(comparison: Comparison | None, is_baseline: bool) -> str:
    if is_baseline:
        return "(baseline)"
    if comparison is None or comparison.difference is None:
        return MISSING
    word = SHORT.get(comparison.verdict(), comparison.verdict())
    return f"{comparison.difference.format('{:.4f}', signed=True)} {word}"
