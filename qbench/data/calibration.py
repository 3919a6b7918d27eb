"""Calibration text for methods that look at activations (SmoothQuant, GPTQ), and the
memo through which the cells of one checkpoint share what they compute from it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch
from pydantic import Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.data.sources import TEXT_SOURCES, check_split, data_dir, load_text
from qbench.errors import QBenchError

T = TypeVar("T")
_SHARED: contextvars.ContextVar[dict[Hashable, Any] | None] = contextvars.ContextVar(
    "qbench_shared_statistics", default=None
)


@contextlib.contextmanager
def sharing_statistics(store: dict[Hashable, Any]) -> Iterator[None]:
    """Within the block, `shared_statistic` memoizes into `store`: the runner opens one store
    per loaded checkpoint, so its cells compute calibration ids and fp statistics once."""
    token = _SHARED.set(store)
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared_statistic(key: Hashable, compute: Callable[[], T]) -> T:
    """compute(), or its value memoized under `key` in the open store (if any).

    Only for values determined by the checkpoint's unmodified weights and `key`: the
    calibration ids, or statistics of the fp model taken before a method changes it.
    """
    store = _SHARED.get()
    if store is None:
        return compute()
    if key not in store:
        store[key] = compute()
    return store[key]


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


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase | None, spec: CalibrationSpec, step: str = "calibration"
) -> torch.Tensor:
    """[sequences, seq_len] token windows at random offsets, as GPTQ.

    The offsets come from a generator seeded with torch.initial_seed() (the runner seeds
    every cell with the recipe's seed), so they do not depend on what drew random numbers
    before (a rotation), and cells sharing a checkpoint share the windows. QBenchError naming
    `step` (the method calibrating) without a tokenizer.
    """
    if tokenizer is None:
        raise QBenchError(f"{step} calibrates on text: pass the checkpoint's tokenizer")
    key = ("calibration_ids", spec.model_dump_json(exclude={"batch_size"}), torch.initial_seed())
    return shared_statistic(key, lambda: _sample_windows(tokenizer, spec))


def _sample_windows(tokenizer: PreTrainedTokenizerBase, spec: CalibrationSpec) -> torch.Tensor:
    ids = tokenizer(load_text(spec.data, spec.split), return_tensors="pt", verbose=False)
    ids = ids.input_ids[0]
    if ids.numel() <= spec.seq_len:
        raise QBenchError(
            f"calibration text {spec.data}/{spec.split} has {ids.numel()} tokens, "
            f"not more than seq_len {spec.seq_len}"
        )
    generator = torch.Generator().manual_seed(torch.initial_seed())
    starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.sequences,), generator=generator)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
