"""What SpinQuant's training did in the cells that trained (iterations, wall and CPU time, the
calibration loss of the random Hadamard start and of the learned rotations), from the notes
the step left in their records; cells that loaded kept rotations (a rerun, a breakdown's
parts) repeat the same training and are not listed again."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbench.record import ResultsTable

PREFIX = "spinquant: "


def learned_section(table: ResultsTable) -> list[str]:
    """Markdown: one line per finished cell that trained rotations; [] when none did."""
    lines = []
    for cell in table.cells:
        record = table.finished(cell)
        notes = [n[len(PREFIX) :] for n in (record.notes if record else []) if n.startswith(PREFIX)]
        trained = any(n.startswith("trained") for n in notes)
        if trained and not any(n.startswith("rotations loaded") for n in notes):
            lines.append(f"- {cell.checkpoint.name} / {cell.quantizer_name}: {'; '.join(notes)}")
    if not lines:
        return []
    return [
        "## Learned rotations",
        "",
        *lines,
        "",
        "Wall time on the machine that ran the cell (shared with other work: the CPU time is "
        "the steadier figure). The calibration loss is the training network's (rounded, "
        "straight-through) cross-entropy on the first iteration's windows, at the random "
        "Hadamard start and after the last step. Cells that loaded these rotations (a "
        "breakdown's parts, reruns) say so in their records. Through the rounded weights a "
        "learned rotation changes the model's function, fitted to the calibration text: "
        "where that text shares the evaluation's domain (as SpinQuant's WikiText-2 train and "
        "test do) and the model was trained on another, a rounded model can score below fp "
        "(×fp < 1) without being a better quantizer of it.",
        "",
    ]
