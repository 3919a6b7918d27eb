"""What a recipe says of a checkpoint, and what its result key holds of its content (no torch:
a recipe is validated without importing the model libraries, except where a `random:` config
must be built to be checked)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qbench.config import Seed, StrictModel
from qbench.errors import QBenchError

_ABSENT_IF_NONE = Field(default=None, exclude_if=lambda value: value is None)


class CheckpointIdentity(BaseModel):
    """What a checkpoint's result key holds of its content; stored in every record.

    train: the training-config digest (`train:`); random: the digest of a random checkpoint's
    resolved config, seed, planted channel, tokenizer corpus and library versions (`random:`);
    hf / revision / commit: the hub id, the revision the recipe names and the commit it
    resolved to (`hf:`); files: the sha256 of each file that determines the model or its
    tokenizer (`path:`; see IDENTITY_FILES).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: str | None = _ABSENT_IF_NONE
    random: str | None = _ABSENT_IF_NONE
    hf: str | None = _ABSENT_IF_NONE
    revision: str | None = _ABSENT_IF_NONE
    commit: str | None = _ABSENT_IF_NONE
    files: dict[str, str] | None = _ABSENT_IF_NONE


class MassiveChannel(StrictModel):
    """One residual channel scaled up in the input embedding (a planted massive activation)."""

    dim: int = Field(ge=0)
    scale: float


class RandomSpec(BaseModel):
    """A random checkpoint: a config file and/or a model_type, config fields inline, a seed.

    Keys other than the four below are config fields of the model type, checked against its
    transformers config class (an unknown field is an error with a "did you mean").
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    config: str | None = None  # a config.json, relative to the working directory
    model_type: str | None = None  # default: the config file's
    seed: Seed = 0
    massive_channel: MassiveChannel | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The config fields given inline."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _checked(self) -> RandomSpec:
        """Without a config file everything is known now: build the config (no weights)."""
        from qbench.checkpoints.random import config_class, random_config  # transformers

        if self.model_type is not None:
            config_class(self.model_type)
        if self.config is None:
            try:
                random_config(self)
            except QBenchError as error:
                raise ValueError(str(error)) from None
        return self
