"""Errors that qbench reports to the user as one clear line (no traceback)."""


class QBenchError(Exception):
    """Bad input or a missing resource; the message says what and what to do."""
