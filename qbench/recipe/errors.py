"""Recipe errors: one line per problem, naming the file and the field path as the recipe
wrote it (`quantizers[2].weights.bits`, a shorthand's fields beside its `method:`)."""

from __future__ import annotations

from typing import Any

from qbench.errors import QBenchError
from qbench.quant.steps import ROUNDINGS, TRANSFORMS


class RecipeError(QBenchError):
    """A recipe that cannot run; the message names the file and the field."""


def field_path(loc: tuple[Any, ...]) -> str:
    """('quantizers', 2, 'rounding', 'gptq', 'damp') -> 'quantizers[2].rounding.damp' (the
    step names pydantic inserts for the tagged unions dropped)."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _union_tag(loc, i):
            text += f".{part}" if text else str(part)
    return text


def _union_tag(loc: tuple[Any, ...], i: int) -> bool:
    previous = loc[i - 1] if i else None
    if previous == "rounding":
        return loc[i] in ROUNDINGS
    return (
        isinstance(previous, int) and i > 1 and loc[i - 2] == "transforms" and loc[i] in TRANSFORMS
    )


def _shorthand(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """A quantizer written with `method:` names its fields where the user wrote them:
    ('quantizers', 0, 'rounding', 'bitsandbytes', 'threshold') -> ('quantizers', 0,
    'threshold')."""
    if len(loc) < 3 or loc[0] != "quantizers" or not isinstance(loc[1], int):
        return loc
    entries = data.get("quantizers") if isinstance(data, dict) else None
    entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
    if not isinstance(entry, dict) or "method" not in entry:
        return loc
    if loc[2] == "rounding":
        return loc[:2] + loc[4:]
    if loc[2] == "transforms":
        return loc[:2] + loc[5:]
    return loc


def describe_error(error: dict[str, Any], data: Any = None) -> str:
    where = field_path(_shorthand(error["loc"], data))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] == "union_tag_not_found":  # a step without its name field
        key = error["ctx"]["discriminator"].strip("'")
        names = ", ".join(TRANSFORMS if key == "transform" else ROUNDINGS)
        message = f"give the step's name as {key}: (one of {names})"
    return f"{where}: {message}" if where else message  # top-level messages name their field


def causes(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors less a missing field beside another error of the same mapping (a bad
    `format:` leaves `bits:` unset: one line, the cause)."""
    wrong = {e["loc"][:-1] for e in errors if e["type"] != "missing"}
    return [e for e in errors if e["type"] != "missing" or e["loc"][:-1] not in wrong]
