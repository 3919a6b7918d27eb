"""What a recipe's `eval:` asks for beyond perplexity and tasks (no torch)."""

from __future__ import annotations

from pydantic import Field

from qbench.config import StrictModel


class DiagnosticsSpec(StrictModel):
    """The probe: the first `samples` windows of `seq_len` tokens of the eval text."""

    samples: int = Field(default=4, ge=1)
    seq_len: int = Field(default=128, ge=2)
