"""Text sources for perplexity and training: name -> rows of a split.

A split's text is `"\\n\\n".join(rows)`, the GPTQ convention that QuaRot, SpinQuant,
SmoothQuant and llmc use for WikiText-2.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import QBenchError
from qbench.registry import Registry


@dataclass(frozen=True)
class TextSource:
    """A named corpus with fixed splits; `rows(split)` returns its documents or lines."""

    name: str
    splits: tuple[str, ...]
    rows: Callable[[str], list[str]]
    description: str


TEXT_SOURCES: Registry[TextSource] = Registry("text source")


def data_dir() -> Path | None:
    """$QBENCH_DATA_DIR, else ../shared/data beside the working directory or the repo."""
    if os.environ.get("QBENCH_DATA_DIR"):
        return Path(os.environ["QBENCH_DATA_DIR"]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / "../shared/data", repo / "../shared/data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def load_text(source: str, split: str) -> str:
    """The text of one split of a source, rows joined with a blank line."""
    return _cached_text(source, split, data_dir())


@functools.cache
def _cached_text(source: str, split: str, root: Path | None) -> str:
    """Read once per data folder: plan and runner both need the text."""
    return "\n\n".join(TEXT_SOURCES.get(source).rows(split))


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _add(name: str, splits: tuple[str, ...], description: str):
    def register(rows: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
        TEXT_SOURCES.register(name)(TextSource(name, splits, rows, description))
        return rows

    return register


def _embedded_split(topic: str) -> str:
    bucket = int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "valid"}.get(bucket, "train")


@_add("embedded", ("train", "valid", "test"), "CPython's pydoc topics (English docs), by topic")
def embedded_rows(split: str) -> list[str]:
    """CPython's documentation topics, split ~80/10/10 by a hash of the topic name."""
    from pydoc_data.topics import topics

    return [topics[t].strip() for t in sorted(topics) if _embedded_split(t) == split]


@_add("wikitext2", ("test", "valid"), "WikiText-2 raw, GPTQ-style rows")
def wikitext2_rows(split: str) -> list[str]:
    """WikiText-2 raw rows: lines with their trailing newline, blank lines as ""."""
    root = data_dir()
    path = root / "wikitext-2-raw" / f"wiki.{split}.raw" if root else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8", newline="\n") as lines:
            return [line if line.strip() else "" for line in lines]
    return _wikitext2_from_hub(split, path)


def _wikitext2_from_hub(split: str, looked_at: Path | None) -> list[str]:
    hub_split = "validation" if split == "valid" else split
    try:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])
    except Exception as error:  # no network, no cache: say where we looked
        where = looked_at or "$QBENCH_DATA_DIR/wikitext-2-raw/ (QBENCH_DATA_DIR is unset)"
        raise QBenchError(
            f"wikitext2 '{split}': no local file at {where}, and the hub failed "
            f"({type(error).__name__}); set QBENCH_DATA_DIR to a folder holding "
            "wikitext-2-raw/wiki.test.raw"
        ) from error
