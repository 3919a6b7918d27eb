"""lm-eval's request cache, storing JSON: nothing in a results folder is unpickled.

lm-eval's `CachingLM` keeps each request's answer in a `SqliteDict`, which pickles its
values, so a cache file planted in a results folder would run code when a request is looked
up. `JsonCachingLM` is that CachingLM with the SqliteDict encoding values as JSON instead
(sqlitedict's own `encode=` / `decode=` hooks). lm-eval's answers are floats
(loglikelihood_rolling), (float, bool) pairs (loglikelihood) and strings (generate_until), so
JSON keeps them exactly; pairs come back as tuples. Each entry is bound to its cell: stored
as {"cell": the cell's key, "answer": ...}, so a cache of another cell (copied, or left by an
earlier model under the same file name) is not read. A cache file that is not such a
database of this cell's answers (a planted, damaged or foreign one, or one of an older qbench
that pickled) is deleted before use, with a warning, and its requests are recomputed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from lm_eval.api.model import LM, CachingLM

from qbench.errors import describe, warn

Answer = float | bool | str | tuple[float, bool]


def encode(value: Answer, cell: str) -> str:
    """An lm-eval answer of cell `cell` (its key) as JSON text."""
    return json.dumps({"cell": cell, "answer": value})


def decode(text: str | bytes, cell: str) -> Answer:
    """The lm-eval answer of cell `cell` from JSON text; ValueError for anything else,
    another cell's answer included."""
    entry = json.loads(text)
    if not isinstance(entry, dict) or set(entry) != {"cell", "answer"}:
        raise ValueError(f"not an answer bound to a cell: {str(entry)[:80]}")
    if entry["cell"] != cell:
        raise ValueError(f"an answer of another cell ({str(entry['cell'])[:16]}...)")
    value = entry["answer"]
    if isinstance(value, list) and len(value) == 2:
        value = tuple(value)
        if isinstance(value[0], int | float) and isinstance(value[1], bool):
            return value
    elif isinstance(value, int | float | str):  # bool is an int
        return value
    raise ValueError(f"not an lm-eval answer: {str(value)[:80]}")


class JsonCachingLM(CachingLM):
    """lm-eval's CachingLM over `cache_db` (a SQLite file), with values stored as JSON bound
    to the cell whose key is `cell`."""

    def __init__(self, lm: LM, cache_db: str, cell: str) -> None:
        from sqlitedict import SqliteDict

        discard_unreadable(Path(cache_db), cell)
        super().__init__(lm, cache_db)  # opens lm-eval's pickling SqliteDict; reads nothing
        self.dbdict.close()
        self.dbdict = SqliteDict(
            cache_db,
            autocommit=True,
            encode=functools.partial(encode, cell=cell),
            decode=functools.partial(decode, cell=cell),
        )
        lm.set_cache_hook(self.get_cache_hook())  # the hook writes to this dbdict


def discard_unreadable(path: Path, cell: str) -> None:
    """Delete the cache file at `path` unless it is a regular SQLite file of JSON answers of
    cell `cell`."""
    if not os.path.lexists(path):
        return
    problem = "a symlink" if path.is_symlink() else _problem(path, cell)
    if problem is not None:
        warn(f"{path}: request cache discarded ({problem}); its requests are recomputed")
        path.unlink()


def _problem(path: Path, cell: str) -> str | None:
    from sqlitedict import SqliteDict

    try:
        with SqliteDict(str(path), flag="r", decode=functools.partial(decode, cell=cell)) as cache:
            for _ in cache.values():
                pass
    except Exception as error:  # sqlite3.DatabaseError, ValueError, ...
        return describe(error)
    return None
