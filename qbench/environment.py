"""What the environment tells qbench: its cache folder and whether the Hugging Face hub is off
(the data folder is qbench.data.sources.data_dir)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QBENCH_CACHE_DIR (default ~/.cache/qbench): built checkpoints, file digests, pristine
    weights."""
    return Path(os.environ.get("QBENCH_CACHE_DIR", "~/.cache/qbench")).expanduser()


def offline() -> bool:
    """True when the environment forbids the Hugging Face hub."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)
