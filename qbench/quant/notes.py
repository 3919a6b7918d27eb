"""Notes a method leaves on the cell it runs for (e.g. experts GPTQ rounded to nearest).

The runner opens a list per cell (`collecting`); `note` appends to it, and the cell's record
keeps the list, so what a method did differently from its label is written beside the result.
Outside a cell, notes are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "qbench_notes", default=None
)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Within the block, `note` appends to the yielded list."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(text: str) -> None:
    """Record `text` on the current cell (once), if a cell is collecting."""
    notes = _NOTES.get()
    if notes is not None and text not in notes:
        notes.append(text)
