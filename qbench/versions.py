"""Versions of the libraries that determine a result."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("qbench", "torch", "transformers", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found
