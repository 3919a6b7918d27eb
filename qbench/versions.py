"""Versions of the libraries that determine a result, and of qbench's own code."""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("qbench", "torch", "transformers", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


@functools.cache
def code_digest() -> str:
    """sha256 (16 hex digits) of qbench's own source: every .py and .yaml file of the package,
    by relative path. A refusal decided by this code stands until the code changes."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".yaml") and path.is_file():
            digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
