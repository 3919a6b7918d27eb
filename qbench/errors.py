"""Errors that qbench reports to the user as one clear line (no traceback)."""

import errno
import sys


class QBenchError(Exception):
    """Bad input or a missing resource; the message says what and what to do."""


class RefusedError(QBenchError):
    """A quantizer cannot run on a checkpoint (a plan-time refusal, or one found once the
    model is traced): the cell is recorded as `refused`, not failed, with this reason."""


ONE_LINE_MAX = 300  # characters of a foreign message kept in one line


def one_line(kind: str, message: str) -> str:
    """'kind: message' on one line (the message's lines joined, at most ONE_LINE_MAX
    characters), or `kind` alone for an empty message."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if len(text) > ONE_LINE_MAX:
        text = text[: ONE_LINE_MAX - 1] + "…"
    return f"{kind}: {text}" if text else kind


def describe(error: BaseException) -> str:
    """An exception as one line: 'TypeName: its message'; a pydantic ValidationError as
    'field.path: problem' of its first error (and how many more)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError) and error.errors():
        errors = error.errors()
        where = ".".join(str(part) for part in errors[0]["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = errors[0]["msg"].removeprefix("Value error, ")
        problem = f"{where}: {message}" if where else message
        return one_line(problem, "") + more
    return one_line(type(error).__name__, str(error))


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_STORAGE_WORDS = ("no space left", "os error 28", "disk quota", "database or disk is full")


def storage_problem(error: BaseException) -> bool:
    """Whether `error` says a disk is full or read-only (an OSError's errno, or the words of
    libraries that wrap it: safetensors, sqlite), wherever it was raised."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return True
    return any(words in str(error).lower() for words in _STORAGE_WORDS)


def warn(message: str) -> None:
    """One line on stderr for something qbench recovered from (the run goes on)."""
    print(f"qbench: warning: {message}", file=sys.stderr, flush=True)
