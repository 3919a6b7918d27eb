"""The results folder: one JSON record per cell, written atomically, and one claim per cell.

    results/<recipe>/runs/<checkpoint>--<quantizer>--<key[:16]>.json
    results/<recipe>/runs/.claims/<same name>.lock

A record has `status: ok` (with metrics) or `status: failed` (with the error, no metrics).
A record is written to a temporary file and renamed, so a killed process leaves no partial
record. A claim is an exclusive flock held while a process computes the cell: a second sweep
on the same folder skips the cell instead of computing it twice, and the kernel drops the
lock of a process that dies, so a dead sweep never blocks a cell.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from qbench.plan import Cell

OK, FAILED = "ok", "failed"

Result = dict[str, Any]


def result_path(results_root: Path, cell: Cell) -> Path:
    return results_root / cell.recipe / "runs" / cell.filename


def read_result(results_root: Path, cell: Cell) -> Result | None:
    """The cell's record (finished or failed), or None if it has none."""
    path = result_path(results_root, cell)
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(result: Result | None) -> bool:
    """A record with metrics (records from before statuses existed are finished ones)."""
    return result is not None and result.get("status", OK) == OK


def is_failed(result: Result | None) -> bool:
    return result is not None and result.get("status") == FAILED


def error_line(result: Result) -> str:
    """'Type: first line of the message' of a failed record."""
    error = result.get("error") or {}
    message = (error.get("message") or "").strip().splitlines()
    return f"{error.get('type', 'Error')}: {message[0] if message else ''}".rstrip(": ")


def write_json_atomic(path: Path, data: Result) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class Claim:
    """An exclusive flock on a cell's claim file, held until `release` (or process death)."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path, self._descriptor = path, descriptor

    def release(self) -> None:
        """Delete the claim file while still holding the lock, then unlock."""
        if self._descriptor < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def claim_path(results_root: Path, cell: Cell) -> Path:
    return results_root / cell.recipe / "runs" / ".claims" / f"{Path(cell.filename).stem}.lock"


def claim(results_root: Path, cell: Cell) -> Claim | None:
    """Claim `cell` for this process, or None while another live process holds it."""
    path = claim_path(results_root, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        # The holder may have released (and unlinked) the file between our open and flock:
        # then we hold a lock on a deleted file, and must try again on the path's new file.
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            return Claim(path, descriptor)
        os.close(descriptor)


def claim_holder(results_root: Path, cell: Cell) -> str:
    """Who holds the cell's claim ('host pid N'), as far as the claim file says."""
    try:
        return claim_path(results_root, cell).read_text().strip() or "another process"
    except FileNotFoundError:
        return "another process"
