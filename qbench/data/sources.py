"""Text sources for perplexity and training: name -> rows of a split.

A split's text is `"\\n\\n".join(rows)`, the GPTQ convention that QuaRot, SpinQuant,
SmoothQuant and llmc use for WikiText-2.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qbench.data.folder import SPLITS, folder_rows, text_files
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


def check_split(source: str, split: str) -> None:
    """ValueError (for a pydantic validator) when `split` is not one of `source`'s splits."""
    splits = TEXT_SOURCES.get(source).splits
    if split not in splits:
        raise ValueError(f"split '{split}' is not one of {source}'s splits: {', '.join(splits)}")


def load_text(source: str, split: str) -> str:
    """The text of one split of a source, rows joined with a blank line."""
    return _cached_text(source, split, data_dir())


@functools.cache
def _cached_text(source: str, split: str, root: Path | None) -> str:
    """Read once per data folder: plan and runner both need the text."""
    return "\n\n".join(text_source(source).rows(split))


def text_source(name: str) -> TextSource:
    """A registered source, or a folder of .txt files named by a path (with a '/')."""
    if name in TEXT_SOURCES or "/" not in name:
        try:
            return TEXT_SOURCES.get(name)
        except KeyError as error:
            raise QBenchError(
                f"{error.args[0]}; or give a folder of .txt files as a path, e.g. ./texts/"
            ) from None
    folder = Path(os.path.expandvars(name)).expanduser()
    if "$" in str(folder):
        raise QBenchError(f"'{name}': the environment variable in this path is not set")
    text_files(folder)  # a clear error now rather than at training time
    return TextSource(
        name, SPLITS, lambda split: folder_rows(folder.resolve(), split), f"*.txt under {folder}"
    )


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


@_add(
    "corpus",
    SPLITS,
    "the shared public-domain corpus, $QBENCH_DATA_DIR/corpus (falls back to embedded)",
)
def corpus_rows(split: str) -> list[str]:
    """The shared training corpus (Gutenberg books, Tiny Shakespeare) as a text folder.

    Without a data folder this is the embedded corpus, with a warning; cache keys hold the
    text's fingerprint, so checkpoints trained on either never mix.
    """
    root = data_dir()
    folder = root / "corpus" if root else None
    if folder is not None and folder.is_dir():
        return folder_rows(folder.resolve(), split)
    where = folder or "$QBENCH_DATA_DIR/corpus (QBENCH_DATA_DIR is unset)"
    warnings.warn(
        f"corpus: no shared corpus at {where}; using the embedded corpus (CPython's pydoc "
        "topics) instead",
        stacklevel=2,
    )
    return embedded_rows(split)


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
