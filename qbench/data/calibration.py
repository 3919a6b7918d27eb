"""Calibration text for methods that look at activations (SmoothQuant, GPTQ)."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.data.sources import TEXT_SOURCES, data_dir, load_text
from qbench.errors import QBenchError


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
        splits = TEXT_SOURCES.get(self.data).splits
        if self.split not in splits:
            raise ValueError(f"split '{self.split}' is not one of {self.data}'s: {splits}")
        return self


def calibration_ids(tokenizer: PreTrainedTokenizerBase, spec: CalibrationSpec) -> torch.Tensor:
    """[sequences, seq_len] token windows at random offsets (torch's global RNG), as GPTQ."""
    ids = tokenizer(load_text(spec.data, spec.split), return_tensors="pt", verbose=False)
    ids = ids.input_ids[0]
    if ids.numel() <= spec.seq_len:
        raise QBenchError(
            f"calibration text {spec.data}/{spec.split} has {ids.numel()} tokens, "
            f"not more than seq_len {spec.seq_len}"
        )
    starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.sequences,))
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
