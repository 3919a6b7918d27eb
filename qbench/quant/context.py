"""What every step of a quantizer receives: one `StepContext`.

The runner (or `quantize_`) makes one per quantized cell and passes it to each transform and
to the rounding step, in order, each time with `before` set to the transforms already applied
(`after`). It carries everything a step may depend on, so that a step is a function of its
context alone: no global RNG (random draws come from `generator`, seeded by `seed`;
calibration windows are a function of the seed and the text), no global state (statistics the
cells of one checkpoint share live in `shared`, the runner's store for that checkpoint;
what a step did beyond its label goes to `notes`, which the cell's record keeps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.data.calibration import CalibrationSpec
from qbench.data.sources import load_text
from qbench.errors import QBenchError
from qbench.quant.steps.base import transforms_key

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.steps.base import Transform

T = TypeVar("T")


@dataclass
class StepContext:
    """The model a step changes in place and everything it may read.

    model: the (possibly transformed) model; quantizer: the whole quantizer the step belongs to
    (its formats, which targets it rounds); tokenizer: the checkpoint's (None where no step
    calibrates); seed: the cell's seed; before: the transforms applied so far; shared: a store
    the cells of one checkpoint share (see `statistic`); notes: the cell's notes (`note`);
    generator: random draws of the steps (seeded with `seed` once per quantizer run).
    """

    model: nn.Module
    quantizer: QuantizerConfig
    tokenizer: PreTrainedTokenizerBase | None = None
    seed: int = 0
    before: tuple[Transform, ...] = ()
    shared: dict[Hashable, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def after(self, before: tuple[Transform, ...]) -> StepContext:
        """The same context for the step that follows the transforms `before` (one generator,
        store and notes list throughout)."""
        return dataclasses.replace(self, before=before)

    def note(self, text: str) -> None:
        """Record `text` (once) on the cell: what a step did beyond what its label says."""
        if text not in self.notes:
            self.notes.append(text)

    def statistic(self, key: Hashable, compute: Callable[[], T]) -> T:
        """compute(), memoized in `shared` under `key`, the transforms before and the seed.

        Only for values determined by the checkpoint's weights as the transforms `before` left
        them, the seed and `key` (e.g. SmoothQuant's activation ranges of the fp model): the
        cells of one checkpoint then compute them once.
        """
        return self._memo((key, transforms_key(self.before), self.seed), compute)

    def calibration_ids(self, spec: CalibrationSpec, step: str) -> torch.Tensor:
        """[sequences, seq_len] token windows of `spec`'s text at random offsets, as GPTQ
        draws them, from a generator seeded with the context's seed (so they depend on the
        seed and the text only, and the cells of a checkpoint share them).

        Raises QBenchError naming `step` without a tokenizer, or when the text is not longer
        than seq_len.
        """
        if self.tokenizer is None:
            raise QBenchError(f"{step} calibrates on text: pass the checkpoint's tokenizer")
        key = ("calibration_ids", spec.model_dump_json(exclude={"batch_size"}), self.seed)
        return self._memo(key, lambda: sample_windows(self.tokenizer, spec, self.seed))

    def _memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]


def sample_windows(
    tokenizer: PreTrainedTokenizerBase, spec: CalibrationSpec, seed: int
) -> torch.Tensor:
    """[spec.sequences, spec.seq_len] windows of the tokenized text, offsets drawn uniformly
    from a generator seeded with `seed`."""
    ids = tokenizer(load_text(spec.data, spec.split), return_tensors="pt", verbose=False)
    ids = ids.input_ids[0]
    if ids.numel() <= spec.seq_len:
        raise QBenchError(
            f"calibration text {spec.data}/{spec.split} has {ids.numel()} tokens, "
            f"not more than seq_len {spec.seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.sequences,), generator=generator)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
