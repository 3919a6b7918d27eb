"""The outlier-diagnostics part of a leaderboard: a table per checkpoint and per-layer plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from qbench.files import save_figure
from qbench.plan import Cell
from qbench.recipe import Recipe
from qbench.record import MISSING, ResultsTable
from qbench.report.seeds import checkpoint_groups

# (key in metrics.diagnostics, header, format) of the unquantized model's figures; a list's
# items fill the format's fields.
SUMMARY_COLUMNS = [
    ("max_activation", "max \\|h\\|", "{:.2f}"),
    ("max_activation_at", "at (layer, pos, ch)", "({}, {}, {})"),
    ("max_median_ratio", "max/median", "{:.1f}"),
    ("first_token_mass", "first-token mass", "{:.3f}"),
    ("max_head_first_token_mass", "max head first-token mass", "{:.3f}"),
    ("sink_mass_non_trigger", "sink head BOS mass non-trigger", "{:.3f}"),
    ("sink_mass_trigger", "sink head BOS mass trigger", "{:.3f}"),
    ("sink_share_0.3", "sink heads > 0.3", "{:.1%}"),
    ("sink_share_0.5", "sink heads > 0.5", "{:.1%}"),
    ("bias_slot_mass", "bias-slot mass", "{:.3f}"),
    ("super_weight", "super weight (layer, row, col)", "({}, {}, {})"),
    ("max_input_kurtosis", "max kurtosis (inputs)", "{:.1f}"),
    ("max_weight_kurtosis", "max kurtosis (weights)", "{:.2f}"),
]

# (key per layer in details.diagnostics.layers, axis label, log scale) of the plots.
LAYER_PLOTS = [
    ("max", "max |h| (residual stream)", True),
    ("first_token_mass", "attention mass on the first token", False),
]


def outlier_section(recipe: Recipe, table: ResultsTable) -> list[str]:
    """Markdown: the fp cell's outlier figures and each quantizer's worst-layer SQNR."""
    if recipe.eval.diagnostics is None:
        return []
    fp = {c.checkpoint.name: c for c in table.cells if c.quantizer is None}
    columns = [
        column
        for column in SUMMARY_COLUMNS
        if any(_figure(table, c, column[0]) is not None for c in fp.values())
    ] or SUMMARY_COLUMNS[:1]
    rows = []
    for checkpoint in recipe.checkpoints:
        own = [c for c in table.cells if c.checkpoint.name == checkpoint.name]
        row = [checkpoint.name]
        row += [_shown(table, fp[checkpoint.name], key, pattern) for key, _, pattern in columns]
        row += [_shown(table, c, "min_sqnr_db", "{:.1f}") for c in own[1:]]
        rows.append(row)
    headers = ["checkpoint", *(header for _, header, _ in columns)]
    headers += [f"min SQNR dB {q.name}" for q in recipe.quantizers]
    spec = recipe.eval.diagnostics
    text = recipe.eval.perplexity[0]
    if spec.windows == "document":
        bos = "the tokenizer's BOS token first where it has one" if spec.bos else "no BOS added"
        windows = f"the first {spec.samples} documents with {spec.seq_len} tokens ({bos})"
    else:
        windows = f"the first {spec.samples} windows of {spec.seq_len} tokens"
    return [
        "## Outlier diagnostics",
        "",
        tabulate(rows, headers, tablefmt="github", disable_numparse=True),
        "",
        f"Unquantized model, {windows} of {text.data} {text.split}. max |h|: largest "
        "residual-stream magnitude over layers, at (layer, position, channel; position 0 = the "
        "first token); max/median: its largest ratio to the layer's median |h|; first-token "
        "mass: attention on the first token, mean over layers, heads and queries 1..t-1 (max "
        "head: the largest of one head; sink head BOS mass: on a synthetic task's data, the "
        "head with the largest mass from non-trigger queries, from its non-trigger and its "
        "trigger queries; bias-slot mass: on the learned attention-bias slot); sink heads > "
        "eps: the share of all heads whose first-token score (mean over all queries) exceeds "
        "eps (Gu et al. 2025's Sink metric, eps 0.3); super weight: the MLP output "
        "projection's W[row, column] at its largest input and output spikes, largest |input| "
        "x |output| over layers (Yu et al. 2024); kurtosis: "
        "Pearson (3 = Gaussian); min SQNR: the worst linear layer's output under that "
        "quantizer's formats. Per-layer plots: plots/outliers.png (all checkpoints) and "
        "plots/outliers-<checkpoint>.png (residual peaks, first-token score per head, the MLP "
        "output projections' input and output spikes).",
        "",
    ]


def write_outlier_plots(recipe: Recipe, table: ResultsTable, folder: Path) -> Path | None:
    """plots/outliers.png: per-layer max |h| and first-token mass, one line per group (the
    mean over its members, shaded between their min and max); None without diagnostics."""
    if recipe.eval.diagnostics is None:
        return None
    from matplotlib.figure import Figure

    layers = {c.checkpoint.name: _layers(table, c) for c in table.cells if c.quantizer is None}
    figure = Figure(figsize=(6 * len(LAYER_PLOTS), 4), layout="constrained")
    panels = zip(figure.subplots(1, len(LAYER_PLOTS)), LAYER_PLOTS, strict=True)
    for axes, (key, label, log) in panels:
        for i, (group, members) in enumerate(checkpoint_groups(recipe).items()):
            curves = [c for c in (_curve(layers[m.name], key) for m in members) if c]
            if not curves:
                continue
            depth = min(len(c) for c in curves)
            x = range(depth)
            columns = [[c[j] for c in curves] for j in x]
            style = {"color": "black", "linewidth": 2.5} if i == 0 else {"linewidth": 1.5}
            mean = [sum(v) / len(v) for v in columns]
            (line,) = axes.plot(x, mean, label=group, marker="o", **style)
            low, high = [min(v) for v in columns], [max(v) for v in columns]
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        axes.set(xlabel="layer", ylabel=label, yscale="log" if log else "linear")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.suptitle(f"{recipe.name}: unquantized, per layer (first group in black)")
    return save_figure(figure, folder / "outliers.png")


def write_checkpoint_plots(recipe: Recipe, table: ResultsTable, folder: Path) -> list[Path]:
    """plots/outliers-<checkpoint>.png for each unquantized cell with per-layer details: max |h|
    per layer (log), the first-token score of every head (layers x heads), and the MLP output
    projections' largest |input| and |output| per layer (log), the super weight marked."""
    if recipe.eval.diagnostics is None:
        return []
    from matplotlib.figure import Figure

    written = []
    for cell in (c for c in table.cells if c.quantizer is None):
        layers = _layers(table, cell)
        if not layers or any("sink_score" not in layer for layer in layers):
            continue  # no maps (a record from before sink scores), nothing to draw
        figure = Figure(figsize=(17, 4.2), layout="constrained")
        peaks, heads, spikes = figure.subplots(1, 3)
        x = [layer["layer"] for layer in layers]
        peaks.plot(x, [layer["max"] for layer in layers], marker="o", label="max |h|")
        peaks.plot(x, [layer["median"] for layer in layers], marker=".", label="median |h|")
        peaks.set(xlabel="layer", ylabel="residual stream |h|", yscale="log")
        scores = heads.imshow(
            [layer["sink_score"] for layer in layers], aspect="auto", vmin=0, vmax=1, cmap="magma"
        )
        heads.set(xlabel="head", ylabel="layer", title="first-token score (Gu et al.)")
        figure.colorbar(scores, ax=heads)
        found = [(layer["layer"], layer["down_proj"]) for layer in layers if layer["down_proj"]]
        spikes.plot(
            [i for i, _ in found], [d["input"] for _, d in found], marker="o", label="max |input|"
        )
        spikes.plot(
            [i for i, _ in found], [d["output"] for _, d in found], marker="s", label="max |output|"
        )
        best = _figure(table, cell, "super_weight")
        if best is not None:
            spikes.axvline(
                best[0], color="gray", linestyle=":", label=f"super weight {tuple(best)}"
            )
        spikes.set(xlabel="layer", ylabel="MLP output projection", yscale="log")
        for axes in (peaks, spikes):
            axes.grid(alpha=0.3)
            axes.legend(fontsize="small")
            axes.xaxis.get_major_locator().set_params(integer=True)
        figure.suptitle(f"{recipe.name}: {cell.checkpoint.name}, unquantized")
        written.append(save_figure(figure, folder / f"outliers-{cell.checkpoint.name}.png"))
    return written


def _layers(table: ResultsTable, cell: Cell) -> list[dict[str, Any]]:
    record = table.finished(cell)
    details = record.details if record is not None else None
    return ((details.diagnostics if details is not None else None) or {}).get("layers", [])


def _figure(table: ResultsTable, cell: Cell, key: str) -> Any:
    """A finished cell's diagnostics figure (a number or a list); None if absent."""
    record = table.finished(cell)
    figures = record.metrics.diagnostics if record is not None else None
    return (figures or {}).get(key)


def _curve(layers: list[dict[str, Any]], key: str) -> list[float]:
    """One value per layer: the figure itself, or its mean over heads for per-head lists."""
    values = [layer.get(key) for layer in layers]
    if any(v is None for v in values):
        return []
    return [sum(v) / len(v) if isinstance(v, list) else v for v in values]


def _shown(table: ResultsTable, cell: Cell, key: str, pattern: str) -> str:
    """The value; 'missing' without a result, '–' where the model has no such figure."""
    if table.finished(cell) is None:
        return MISSING
    value = _figure(table, cell, key)
    if value is None:
        return "–"
    return pattern.format(*value) if isinstance(value, list) else pattern.format(value)
