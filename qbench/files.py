"""Files in folders that other people and processes may also write to (results/, caches).

- **Atomic writes**: the text goes to a temporary file beside the target, is flushed, and is
  renamed over the target, so a reader (or a killed writer) never sees a partial file. The
  temporary file is created with O_EXCL (never through a planted symlink) and mode 0o666, so
  the process umask applies as for any file `open()` creates (`tempfile.mkstemp` would make
  it 0o600). Its writer holds an flock on it until the rename, which is how
  `remove_stale_temporaries` tells a live writer's file from a dead one's.
- **Reads without following symlinks**: a file planted as a symlink in a shared folder is
  refused (`ELOOP`), never read through.
- **One-line errors**: a target that cannot be written (a directory in its place, no
  permission, a full disk) is a QBenchError naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from qbench.errors import QBenchError

TEMPORARY_SUFFIX = ".tmp"
STALE_AFTER_S = 60.0  # a temporary file this old whose writer holds no lock is left-over


def write_text_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Write `text` (UTF-8) to `path` atomically; QBenchError naming `path` if it cannot be."""
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: Path, data: Any, mode: int = 0o666) -> None:
    """`data` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", mode)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to a locked temporary file beside `path`, then rename it into place; the
    file is created with `mode` masked by the umask."""
    make_directory(path.parent)
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as error:
        raise _unwritable(path, error) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        with os.fdopen(descriptor, "wb", closefd=False) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise _unwritable(path, error) from None
    finally:
        os.close(descriptor)
        if os.path.lexists(temporary):
            os.unlink(temporary)


def make_directory(folder: Path) -> None:
    """`folder` and its parents, or a QBenchError naming it (e.g. a file in its place)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(folder, error) from None


def _unwritable(path: Path, error: OSError) -> QBenchError:
    if error.errno == errno.EISDIR:
        reason = "a directory is in its place; remove or rename it"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        reason = "a file is in the place of one of its folders; remove or rename it"
    else:
        reason = f"{error.strerror or error}; check the folder's permissions and free space"
    return QBenchError(f"{path}: cannot write: {reason}")


def read_text_nofollow(path: Path, limit: int) -> str:
    """The UTF-8 text of the regular file `path`, at most `limit` bytes.

    Raises FileNotFoundError when absent, and ValueError (with the reason) when `path` is a
    symlink, not a regular file, longer than `limit` or not UTF-8.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError("a symlink (not followed)") from None
        if error.errno == errno.ENOENT:
            raise
        raise ValueError(error.strerror or str(error)) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ValueError("not a regular file")
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return utf8_text(data)


def regular_file_problem(path: Path, limit: int) -> str | None:
    """Why `path` (symlinks followed) cannot be read as a data file: not a regular file (a
    FIFO or device would block or never end), or larger than `limit` bytes; None if it can."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return error.strerror or str(error)
    if not stat.S_ISREG(status.st_mode):
        return f"{_file_kind(status.st_mode)}, not a regular file"
    if status.st_size > limit:
        return f"{status.st_size / 2**20:.0f} MiB, larger than the {limit / 2**20:.0f} MiB limit"
    return None


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path` (symlinks followed), at most `limit`; a
    QBenchError naming the path when it is absent, not a regular file (a FIFO, a device, a
    directory), unreadable or larger than `limit` (checked on the opened file too, so a file
    swapped for a FIFO after the check still cannot block)."""
    if problem := regular_file_problem(path, limit):
        raise QBenchError(f"'{path}': {problem}")
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise QBenchError(f"'{path}': cannot read: {error.strerror or error}") from None
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise QBenchError(f"'{path}': {_file_kind(mode)}, not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise QBenchError(f"'{path}': larger than the {limit / 2**20:.0f} MiB limit")
    return data


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def utf8_text(data: bytes) -> str:
    """`data` decoded as UTF-8; ValueError naming the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = f"byte {data[error.start]:#04x} at offset {error.start}"
        raise ValueError(f"not UTF-8 text ({bad})") from None


def remove_if_unlocked(path: Path, older_than_s: float = 0.0) -> bool:
    """Delete `path` if it is older than `older_than_s` seconds and no process holds an flock
    on it (unlinking it while holding the lock ourselves, as a releasing holder does), or if
    it is a symlink (never one of ours); return whether it was deleted."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.ELOOP:
            return False
        path.unlink(missing_ok=True)
        return True
    try:
        if time.time() - os.fstat(descriptor).st_mtime < older_than_s:
            return False
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.lstat(path).st_ino != os.fstat(descriptor).st_ino:  # replaced meanwhile
            return False
        path.unlink()
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files in `folder` that dead writers left (unlocked and older than
    STALE_AFTER_S); return how many."""
    return sum(
        remove_if_unlocked(path, STALE_AFTER_S) for path in folder.glob(f".*{TEMPORARY_SUFFIX}")
    )


def save_figure(figure: Any, path: Path, dpi: int = 100) -> Path:
    """Render a matplotlib Figure as PNG and write it atomically (savefig itself would follow a
    symlink planted at `path`); return `path`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())
    return path
