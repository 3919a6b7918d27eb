"""lm-eval's request cache, storing JSON: nothing in a results folder is unpickled.

lm-eval's `CachingLM` keeps each request's answer in a `SqliteDict`, which pickles its
values, so a cache file planted in a results folder would run code when a request is looked
up. `JsonCachingLM` is that CachingLM with the SqliteDict encoding values as JSON instead
(sqlitedict's own `encode=` / `decode=` hooks). lm-eval's answers are floats
(loglikelihood_rolling), (float, bool) pairs (loglikelihood) and strings (generate_until), so
JSON keeps them exactly; pairs come back as tuples. A cache file that is not such a database
(a planted or damaged one, or one of an older qbench that pickled) is deleted before use,
with a warning, and its requests are recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lm_eval.api.model import LM, CachingLM

from qbench.errors import describe, warn

Answer = float | bool | str | tuple[float, bool]


def encode(value: Answer) -> str:
    """An lm-eval answer as JSON text."""
    return json.dumps(value)


def decode(text: str | bytes) -> Answer:
    """An lm-eval answer from JSON text; ValueError for anything else."""
    value = json.loads(text)
    if isinstance(value, list) and len(value) == 2:
        value = tuple(value)
        if isinstance(value[0], int | float) and isinstance(value[1], bool):
            return value
    elif isinstance(value, int | float | str):  # bool is an int
        return value
    raise ValueError(f"not an lm-eval answer: {str(value)[:80]}")


class JsonCachingLM(CachingLM):
    """lm-eval's CachingLM over `cache_db` (a SQLite file), with values stored as JSON."""

    def __init__(self, lm: LM, cache_db: str) -> None:
        from sqlitedict import SqliteDict

        discard_unreadable(Path(cache_db))
        super().__init__(lm, cache_db)  # opens lm-eval's pickling SqliteDict; reads nothing
        self.dbdict.close()
        self.dbdict = SqliteDict(cache_db, autocommit=True, encode=encode, decode=decode)
        lm.set_cache_hook(self.get_cache_hook())  # the hook writes to this dbdict


def discard_unreadable(path: Path) -> None:
    """Delete the cache file at `path` unless it is a regular SQLite file of JSON answers."""
    if not os.path.lexists(path):
        return
    problem = "a symlink" if path.is_symlink() else _problem(path)
    if problem is not None:
        warn(f"{path}: request cache discarded ({problem}); its requests are recomputed")
        path.unlink()


def _problem(path: Path) -> str | None:
    from sqlitedict import SqliteDict

    try:
        with SqliteDict(str(path), flag="r", decode=decode) as cache:
            for _ in cache.values():
                pass
    except Exception as error:  # sqlite3.DatabaseError, ValueError, ...
        return describe(error)
    return None
