"""Evaluation text from outside qbench: a user's own file or folder, or a hub dataset.

- `path_documents(path)`: a UTF-8 file is one document; a folder gives one document per
  `*.txt` file below it, in sorted path order. Bytes are decoded strictly (a BOM is dropped,
  CRLF becomes LF: folder.decode_file); nothing else is changed.
- `hub_documents(dataset, config, split, column)`: one document per row of a Hugging Face
  dataset split (`datasets.load_dataset`), the string in `column`.

Every failure is a QBenchError of one line naming the path or the dataset fields and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from qbench.data.folder import decode_file, text_files
from qbench.errors import QBenchError


def resolve_path(path: str) -> Path:
    """`path` with `~` and `$VARIABLES` expanded, relative to the working directory."""
    expanded = Path(os.path.expandvars(path)).expanduser()
    if "$" in str(expanded):
        raise QBenchError(f"'{path}': the environment variable in this path is not set")
    return expanded


def path_documents(path: str) -> list[str]:
    """The documents of a file (one) or of a folder (each *.txt file below it, sorted)."""
    target = resolve_path(path)
    if not target.exists():
        raise QBenchError(f"no such file or folder '{path}' (relative paths start at {Path.cwd()})")
    documents = [decode_file(f) for f in (text_files(target) if target.is_dir() else [target])]
    if not any(document.strip() for document in documents):
        raise QBenchError(f"'{path}' holds no text (only empty or blank files)")
    return documents


def hub_documents(
    dataset: str,
    config: str | None,
    split: str,
    column: str,
    data_files: dict[str, str] | None = None,
) -> list[str]:
    """The strings in `column` of `dataset`'s `split`, through datasets.load_dataset."""
    named = f"dataset '{dataset}'" + (f", config '{config}'" if config else "")
    named += f", split '{split}'"
    try:
        import datasets

        rows = datasets.load_dataset(dataset, config, split=split, data_files=data_files)
    except Exception as error:  # no network, no cache, a wrong name: one line either way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise QBenchError(
            f"{named} could not be loaded ({type(error).__name__}: {reason[:200]}); check "
            "dataset, config and split, or, offline, use `data: text, path: FILE` with a "
            "local copy"
        ) from None
    if column not in rows.column_names:
        raise QBenchError(
            f"{named} has no column '{column}'; its columns: {', '.join(rows.column_names)}; "
            "name the text column with text_column:"
        )
    values = rows[column]
    if not all(isinstance(value, str) for value in values):
        raise QBenchError(f"{named}: column '{column}' does not hold strings in every row")
    if not any(value.strip() for value in values):
        raise QBenchError(f"{named}: column '{column}' holds no text")
    return values
