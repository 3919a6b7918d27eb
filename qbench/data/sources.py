"""Text sources for perplexity and training: name -> rows (documents or lines) of a split.

A split's text is its rows joined with the source's separator: a blank line
(`"\\n\\n".join(rows)`, the GPTQ convention that QuaRot, SpinQuant, SmoothQuant and llmc use
for WikiText-2) for every source but `c4`, which follows GPTQ's and QuaRot's C4 evaluation
(`get_c4` in GPTQ's datautils.py, `get_c4_new` in QuaRot's data_utils.py): the first 1100
documents of allenai/c4's `en/c4-validation.00000-of-00008.json.gz` joined with a single space,
tokenized once, of which the first 256 windows of seq_len tokens are scored.

Text from a user's file or folder, or from a hub dataset by id, comes through `path_text` and
`hub_text` (documents joined with a blank line; qbench.data.external reads them).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.data.external import hub_documents, path_documents, resolve_path
from qbench.data.folder import SPLITS, decode_file, folder_rows, text_files
from qbench.errors import QBenchError
from qbench.registry import Registry

BLANK_LINE = "\n\n"  # how documents are joined, unless a source's convention says otherwise


@dataclass(frozen=True)
class TextSource:
    """A named corpus with fixed splits; `rows(split)` returns its documents or lines.

    `separator` joins the rows; `documents` and `windows` are the source's evaluation
    convention (the first N rows; the first N perplexity windows), None meaning all;
    `origin(split)` says what the split is read from here (a file, a sample, the hub);
    `articles` groups rows into documents where a row is not one (WikiText-2's lines).
    """

    name: str
    splits: tuple[str, ...]
    rows: Callable[[str], list[str]]
    description: str
    separator: str = BLANK_LINE
    documents: int | None = None
    windows: int | None = None
    origin: Callable[[str], str] | None = None
    articles: Callable[[list[str]], list[list[str]]] | None = None  # rows -> documents' rows

    def describe(self, split: str) -> str:
        """Where `split` comes from in this environment."""
        return self.origin(split) if self.origin else self.description


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


def default_split(source: str) -> str | None:
    """'test' where the source has it, else its only split; None when that is ambiguous."""
    splits = TEXT_SOURCES.get(source).splits
    return "test" if "test" in splits else splits[0] if len(splits) == 1 else None


def check_split(source: str, split: str) -> None:
    """ValueError (for a pydantic validator) when `split` is not one of `source`'s splits."""
    splits = TEXT_SOURCES.get(source).splits
    if split not in splits:
        raise ValueError(f"split '{split}' is not one of {source}'s splits: {', '.join(splits)}")


def load_text(source: str, split: str) -> str:
    """The text of one split of a source, as its convention says (c4: the first 1100
    documents joined with a space; the others: every row, joined with a blank line)."""
    return source_text(source, split, text_source(source).documents)


def source_text(source: str, split: str, max_documents: int | None) -> str:
    """The first `max_documents` rows (None: all) of a split, joined with the source's
    separator."""
    return _cached_text(source, split, max_documents, data_dir())


@functools.cache
def _cached_text(source: str, split: str, max_documents: int | None, root: Path | None) -> str:
    """Read once per data folder: plan and runner both need the text."""
    found = text_source(source)
    return found.separator.join(found.rows(split)[:max_documents])


def source_documents(source: str, split: str, max_documents: int | None) -> list[str]:
    """The documents of the text `source_text` joins: its first `max_documents` rows, grouped
    into documents where the source's rows are lines (each group joined with the separator)."""
    found = text_source(source)
    rows = found.rows(split)[:max_documents]
    if found.articles is None:
        return rows
    return [found.separator.join(article) for article in found.articles(rows)]


def path_text(path: str, max_documents: int | None = None) -> str:
    """A user's file (one document) or folder (each *.txt file below it, sorted), the first
    `max_documents` documents joined with a blank line."""
    return _cached_path_text(str(resolve_path(path).resolve()), max_documents)


@functools.cache
def _cached_path_text(path: str, max_documents: int | None) -> str:
    return BLANK_LINE.join(path_documents(path)[:max_documents])


@functools.cache
def hub_text(
    dataset: str, config: str | None, split: str, column: str, max_documents: int | None = None
) -> str:
    """A hub dataset's split: the first `max_documents` strings of `column`, joined with a
    blank line. Read once per process: plan (the text's fingerprint) and runner share it."""
    return BLANK_LINE.join(hub_documents(dataset, config, split, column)[:max_documents])


def text_source(name: str) -> TextSource:
    """A registered source, or a folder of .txt files named by a path (with a '/')."""
    if name in TEXT_SOURCES or "/" not in name:
        try:
            return TEXT_SOURCES.get(name)
        except KeyError as error:
            raise QBenchError(
                f"{error.args[0]}; or give a folder of .txt files as a path, e.g. ./texts/"
            ) from None
    folder = resolve_path(name)
    text_files(folder)  # a clear error now rather than at training time
    return TextSource(
        name, SPLITS, lambda split: folder_rows(folder.resolve(), split), f"*.txt under {folder}"
    )


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _add(name: str, splits: tuple[str, ...], description: str, **convention: Any):
    def register(rows: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
        TEXT_SOURCES.register(name)(TextSource(name, splits, rows, description, **convention))
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


_WIKITEXT_TITLE = re.compile(r" = [^=].* = ")  # " = Robert Boulter = "; sections are " = = ... "


def wikitext_articles(rows: list[str]) -> list[list[str]]:
    """WikiText-2 rows grouped into articles: each starts at a top-level title line."""
    articles: list[list[str]] = []
    for row in rows:
        if _WIKITEXT_TITLE.fullmatch(row.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(row)
    return articles


@_add(
    "wikitext2",
    ("test", "valid"),
    "WikiText-2 raw, GPTQ-style rows",
    articles=wikitext_articles,
)
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


C4_SHARD = "c4-validation.00000-of-00008.json.gz"  # the file GPTQ's and QuaRot's get_c4 read
C4_SAMPLE = "c4.utf8"  # a sample, one document per line (../shared/data/c4)


def _c4_local() -> Path | None:
    """$QBENCH_DATA_DIR/c4/ GPTQ's validation shard, else a sample file, else None."""
    root = data_dir()
    folder = root / "c4" if root else None
    for name in (C4_SHARD, C4_SAMPLE):
        if folder is not None and (folder / name).is_file():
            return folder / name
    return None


def c4_origin(split: str) -> str:
    """What `c4` reads here: GPTQ's validation shard, a sample (not comparable), or the hub."""
    local = _c4_local()
    if local is None:
        return f"allenai/c4 en/{C4_SHARD} from the hub (GPTQ's and QuaRot's file)"
    where = f"$QBENCH_DATA_DIR/c4/{local.name}"
    if local.name == C4_SHARD:
        return f"allenai/c4 en/{C4_SHARD} (GPTQ's and QuaRot's file) at {where}"
    return (
        f"a {len(c4_rows(split))}-document sample of C4 (en) web documents at {where}: NOT "
        "C4's validation set, so not comparable with papers' C4 numbers"
    )


@_add(
    "c4",
    ("validation",),
    "C4 (en) validation, GPTQ/QuaRot convention: $QBENCH_DATA_DIR/c4/, else the hub",
    separator=" ",
    documents=1100,
    windows=256,
    origin=c4_origin,
)
def c4_rows(split: str) -> list[str]:
    """C4 (en) validation documents, in file order.

    Read from $QBENCH_DATA_DIR/c4/: GPTQ's shard `c4-validation.00000-of-00008.json.gz`
    (JSON lines, the `text` field) when present, else `c4.utf8` (a sample, one document per
    line); else from the hub, the same shard of allenai/c4 as GPTQ's datautils loads it.
    """
    local = _c4_local()
    if local is not None and local.name == C4_SHARD:
        with gzip.open(local, "rt", encoding="utf-8") as lines:
            return [json.loads(line)["text"] for line in lines if line.strip()]
    if local is not None:
        return [line for line in decode_file(local).split("\n") if line.strip()]
    try:
        return hub_documents("allenai/c4", None, split, "text", {split: f"en/{C4_SHARD}"})
    except QBenchError as error:
        root = data_dir()
        where = root / "c4" if root else "$QBENCH_DATA_DIR/c4/ (QBENCH_DATA_DIR is unset)"
        raise QBenchError(
            f"c4 '{split}': no {C4_SHARD} or {C4_SAMPLE} in {where}, and the hub failed "
            f"({error}); put GPTQ's C4 validation shard (or a sample, one document per line, "
            f"as {C4_SAMPLE}) there"
        ) from None
