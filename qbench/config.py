"""Base class for every typed config: unknown keys are errors with a "did you mean"."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qbench.registry import did_you_mean

# torch.manual_seed's range: a seed outside it fails at load, not in every cell.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class StrictModel(BaseModel):
    """A frozen pydantic model that names unknown keys and suggests the closest field; floats
    must be finite (`.inf` and `.nan` are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    raise ValueError(
                        f"unknown field '{key}'{did_you_mean(str(key), known)}; "
                        f"allowed: {', '.join(known)}"
                    )
        return data


# Names become file names and table cells: letters, digits, '.', '_', '-' (matched whole).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100  # characters; a result file name holds a checkpoint and a quantizer name
# Counts (tokens, windows, documents, steps) fit the 32-bit sizes the libraries take.
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]


def check_name(name: str | None) -> str | None:
    """`name` unchanged where valid (None: a name left to its default); ValueError if not."""
    if name is None:
        return None
    if len(name) > NAME_MAX or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name!r} must be at most {NAME_MAX} letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (it names files and table cells)"
        )
    return name


def reject_duplicates(names: list[str], what: str, fix: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise ValueError(f"{what}: duplicate name(s) {sorted(seen)}: {fix}")
