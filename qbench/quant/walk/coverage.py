"""What a quantizer rounded, counted from the model's modules: coverage by target kind.

`coverage` walks the inventory taken before the quantizer ran (so a target's path names it
even after a transform wrapped it) and asks each module what it holds
(`qbench.quant.linear.rounding`). It counts weight elements per kind: rounded weights, weights
whose inputs are fake-quantized, and the total, and says why each kind it did not target stays
in float. `check_complete` turns a targeted weight left in float into an error, so no record
claims a precision its model does not have.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qbench.errors import QBenchError
from qbench.quant.walk.linear import rounding
from qbench.quant.walk.select import selected

LEFT_IN_FLOAT = {
    "lm_head": "lm_head: false (the default)",
    "router": "routers: false (the default: MoE routers stay in float)",
    "embeddings": "embeddings: false (the default)",
}


def coverage(model: nn.Module, before: dict[str, tuple[str, int]], config: Any) -> dict[str, Any]:
    """{kind: {"weights": [rounded, total], "activations": [rounded, total]}} over the target
    kinds and the input embedding table; "float": {kind: why} for kinds not targeted;
    "ignored": {"patterns": label, "modules": count, kind: weight elements} for targets of a
    targeted kind that the quantizer's `targets:` / `ignore:` patterns leave in float (they
    count in the totals, so the rounded shares show them).

    `before`: `Inventory.sizes()` taken before the quantizer ran; `config`: the cell's
    QuantizerConfig.
    """
    targeted = config.targeted_kinds()
    counts: dict[str, dict[str, list[int]]] = {}
    ignored: dict[str, int] = {}  # kind -> weight elements the patterns leave in float
    left_out = 0  # modules the patterns leave in float
    for name, (kind, numel) in before.items():
        held = rounding(model.get_submodule(name))
        entry = counts.setdefault(kind, {"weights": [0, 0], "activations": [0, 0]})
        for role, label in zip(("weights", "activations"), held or (None, None), strict=True):
            entry[role][0] += numel if label else 0
            entry[role][1] += numel
        if kind in targeted and not selected(name, config.targets, config.ignore):
            ignored[kind] = ignored.get(kind, 0) + numel
            left_out += 1
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None:
        size, held = embed.weight.numel(), getattr(embed, "qbench_rounding", None)
        counts["embeddings"] = {"weights": [size if held else 0, size]}
    present = set(counts)
    floats = {k: why for k, why in LEFT_IN_FLOAT.items() if k in present and k not in targeted}
    if config.embeddings:
        floats.pop("embeddings", None)
    report = {"kinds": counts, "float": floats, "targeted": sorted(targeted & present)}
    if ignored:
        report["ignored"] = {"patterns": config.patterns_label(), "modules": left_out, **ignored}
    return report


def check_complete(report: dict[str, Any], config: Any, checkpoint: str) -> None:
    """QBenchError when a targeted kind has weights (or, with activations:, inputs) in float
    beyond those its `targets:` / `ignore:` patterns leave out."""
    wanted = [
        ("weights", config.linear_bits()[0] < 16),
        ("activations", config.linear_bits()[1] < 16),
    ]
    kinds = [*report["targeted"], *(["embeddings"] if config.embeddings else [])]
    left_out = report.get("ignored", {})
    gaps = []
    for kind in kinds:
        for role, asked in wanted:
            rounded, total = report["kinds"][kind].get(role, [0, 0])
            total -= left_out.get(kind, 0)
            if asked and total and rounded < total:
                gaps.append(f"{kind} {role} {100 * rounded / total:.0f}% of {total:,}")
    if gaps:
        raise QBenchError(
            f"{config.name} left targeted weights in float on '{checkpoint}': {'; '.join(gaps)} "
            "rounded; its precision label would be false"
        )


def coverage_label(report: dict[str, Any] | None) -> str:
    """The leaderboard's summary, e.g. 'W 100% A 100% of 6.1M; float: lm_head, router'
    (share of the targeted weight elements rounded, and of those whose inputs are)."""
    if not report:
        return ""
    kinds = [report["kinds"][k] for k in report["targeted"] if k in report["kinds"]]
    parts = []
    total = sum(k["weights"][1] for k in kinds)
    for role, letter in (("weights", "W"), ("activations", "A")):
        rounded = sum(k.get(role, [0, 0])[0] for k in kinds)
        if rounded:
            parts.append(f"{letter} {100 * rounded / total:.0f}%")
    text = " ".join(parts or ["none"]) + f" of {_count(total)}"
    if ignored := report.get("ignored"):
        weights = sum(v for k, v in ignored.items() if k not in ("patterns", "modules"))
        text += f"; left out by {ignored['patterns']}: {ignored['modules']} ({_count(weights)})"
    return text + (f"; float: {', '.join(sorted(report['float']))}" if report["float"] else "")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
