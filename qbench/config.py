"""Base class for every typed config: unknown keys are errors with a "did you mean"."""

from __future__ import annotations

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
