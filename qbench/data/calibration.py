"""Calibration text for methods that look at activations (SmoothQuant, AWQ, GPTQ): which
windows of which text (`CalibrationSpec`). The windows themselves are drawn by the step's
context (qbench.quant.context.StepContext.calibration_ids), from its seed.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from qbench.config import StrictModel
from qbench.data.sources import TEXT_SOURCES, check_split, data_dir


def default_calibration_data() -> str:
    """wikitext2 when its validation file is present locally, else the embedded corpus."""
    root = data_dir()
    local = root is not None and (root / "wikitext-2-raw" / "wiki.valid.raw").is_file()
    return "wikitext2" if local else "embedded"


class CalibrationSpec(StrictModel):
    """`sequences` random windows of `seq_len` tokens from one split of a text source."""

    data: str = Field(default_factory=default_calibration_data)
    split: str = "valid"
    sequences: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=2)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("data")
    @classmethod
    def _known_data(cls, data: str) -> str:
        try:
            TEXT_SOURCES.get(data)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        return data

    @model_validator(mode="after")
    def _known_split(self) -> CalibrationSpec:
        check_split(self.data, self.split)
        return self
