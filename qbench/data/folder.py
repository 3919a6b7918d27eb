"""Text corpora from a folder: every *.txt file below it, with a fixed train/valid split.

Files are read in sorted path order. Each file gives one train row (its text minus the last
1/20 of its paragraphs) and one valid row (those last paragraphs), so every document adds to
both splits and the split is the same on every machine. Project Gutenberg files lose their
license header and footer (the text between the `*** START OF ...` and `*** END OF ...`
markers is kept); other files are read as they are.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from qbench.errors import QBenchError
from qbench.files import read_regular_file, regular_file_problem

SPLITS = ("train", "valid")
TEXT_FILE_LIMIT = 1 << 30  # bytes per text file: more is not a document to tokenize whole
VALID_FRACTION = 20  # the last 1/20 of each file's paragraphs is held out

_START = re.compile(r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^*]*\*\*\*", re.I)
_END = re.compile(r"\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.I)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def text_files(folder: Path) -> list[Path]:
    """The *.txt files below `folder`, sorted (a directory named *.txt is walked, not read);
    a clear error when there are none, or when one is not a regular file (a FIFO, a device,
    a broken symlink) or is larger than TEXT_FILE_LIMIT."""
    if not folder.is_dir():
        raise QBenchError(f"no such folder '{folder}' (relative paths start at {Path.cwd()})")
    files = sorted(path for path in folder.rglob("*.txt") if not path.is_dir())
    if not files:
        raise QBenchError(f"folder '{folder}' holds no .txt files")
    for path in files:
        if problem := regular_file_problem(path, TEXT_FILE_LIMIT):
            raise QBenchError(
                f"'{path}' in folder '{folder}': {problem}; text folders hold regular .txt files"
            )
    return files


def read_document(path: Path) -> str:
    """A file's text: UTF-8 (BOM dropped), else cp1252; LF newlines; Gutenberg boilerplate cut."""
    return strip_gutenberg(decode_file(path, fallback="cp1252")).strip()


def decode_file(path: Path, fallback: str | None = None) -> str:
    """A file's text as UTF-8 (a BOM dropped), else in the `fallback` encoding, with LF
    newlines. Without a fallback, bytes that are not UTF-8 are a QBenchError naming the file,
    the byte and its offset; so is a path that is not a regular file of at most
    TEXT_FILE_LIMIT bytes."""
    raw = read_regular_file(path, TEXT_FILE_LIMIT)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if fallback is None:
            raise QBenchError(
                f"'{path}' is not UTF-8 (byte 0x{raw[error.start]:02x} at offset "
                f"{error.start}); convert it to UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
            ) from None
        text = raw.decode(fallback)
    return text.replace("\r\n", "\n")


def strip_gutenberg(text: str) -> str:
    """The body between the first START marker and the first END marker after it, if any."""
    start = _START.search(text)
    if start is None:
        return text
    body = text[start.end() :]
    end = _END.search(body)
    return body[: end.start()] if end else body


def split_document(text: str) -> dict[str, str]:
    """{'train': head, 'valid': tail}, the tail being the last 1/20 of the paragraphs."""
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    held_out = max(1, len(paragraphs) // VALID_FRACTION) if len(paragraphs) > 1 else 0
    cut = len(paragraphs) - held_out
    return {"train": "\n\n".join(paragraphs[:cut]), "valid": "\n\n".join(paragraphs[cut:])}


@functools.cache
def folder_rows(folder: Path, split: str) -> list[str]:
    """One row per file for `split` ('train' or 'valid'); files too short to split go to train."""
    if split not in SPLITS:
        raise QBenchError(f"a text folder has splits {', '.join(SPLITS)}, not '{split}'")
    rows = [split_document(read_document(path))[split] for path in text_files(folder)]
    return [row for row in rows if row]
