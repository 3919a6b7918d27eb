"""Errors that qbench reports to the user as one clear line (no traceback)."""

import sys


class QBenchError(Exception):
    """Bad input or a missing resource; the message says what and what to do."""


def one_line(kind: str, message: str) -> str:
    """'kind: first line of message', or `kind` alone for an empty message."""
    lines = message.strip().splitlines()
    return f"{kind}: {lines[0].strip()}" if lines else kind


def describe(error: BaseException) -> str:
    """An exception as one line: 'TypeName: first line of its message'."""
    return one_line(type(error).__name__, str(error))


def warn(message: str) -> None:
    """One line on stderr for something qbench recovered from (the run goes on)."""
    print(f"qbench: warning: {message}", file=sys.stderr, flush=True)
