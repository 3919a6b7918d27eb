"""What SpinQuant's training did in the cells that trained (iterations, wall and CPU time, the
calibration loss of the random Hadamard start and of the learned rotations), from the notes
the step left in their records; each kept training once, however many cells loaded it (a
rerun, a breakdown's parts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbench.record import ResultsTable

PREFIX = "spinquant: "


def learned_section(table: ResultsTable) -> list[str]:
    """Markdown: one line per kept training (its learned/ file), from the first finished cell
    that trained or loaded it (a run that loaded rotations another run trained still lists
    that training, marked so); [] when no cell has one."""
    lines, listed = [], set()
    for cell in table.cells:
        record = table.finished(cell)
        notes = [n[len(PREFIX) :] for n in (record.notes if record else []) if n.startswith(PREFIX)]
        files = {word for n in notes for word in n.split() if word.startswith("learned/")}
        if not any(n.startswith("trained") for n in notes) or (files and files <= listed):
            continue
        listed |= files
        loaded = any(n.startswith("rotations loaded") for n in notes)
        where = " (rotations loaded: trained in an earlier run)" if loaded else ""
        lines.append(f"- {cell.checkpoint.name} / {cell.quantizer_name}{where}: {'; '.join(notes)}")
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
