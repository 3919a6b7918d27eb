"""The steps a quantizer is made of: float transforms, then one rounding step.

A quantizer (qbench.quant.quantizer.QuantizerConfig) is an ordered list of transforms
(`Transform`: smoothquant, awq, rotation) followed by one rounding step (`Rounding`: rtn,
gptq, bitsandbytes, quanto), then optionally the KV cache, in the spirit of llm-compressor's
recipes (an ordered list of typed modifiers, validated as a whole). Each step is a strict
config, data only and free of torch (recipes validate without it), that registers itself
under its name where it is defined (`register_transform` / `register_rounding`, with the
`method:` shorthand it stands for). Its work is done by `apply` / `round`, which receive one
`StepContext` (qbench.quant.context): the model, tokenizer, quantizer, seed, the transforms
applied before, the statistics shared by the cells of a checkpoint and the cell's notes. The
arithmetic lives in qbench.quant.methods (qbench's own methods) and qbench.quant.backends
(quantization libraries), imported when a step runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, TypeVar

from qbench.config import StrictModel
from qbench.registry import Registry

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory


class Transform(StrictModel):
    """A change of the float model before rounding (a quantizer's "transformed" stage)."""

    transform: str

    def apply(self, context: StepContext) -> None:
        """Change `context.model` in place (after the transforms `context.before`)."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Versions of the packages its result depends on beyond `library_versions()`."""
        return {}

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        """Why this step cannot be part of `quantizer` (read at load time), or None."""
        return None

    def is_lossless(self) -> bool:
        """Whether the float model's function is unchanged (the runner checks it against the
        fp cell); a transform that clips weights (AWQ's clip search) is not."""
        return True


class Rounding(StrictModel):
    """The rounding step: what turns the (transformed) float targets into quantized ones.

    `library`: the step hands the targets to a quantization library's modules and takes that
    library's own fields instead of the quantizer's `weights:` / `activations:`.
    `diagnosable`: outlier diagnostics can read the rounded model (not where a library keeps its
    weights packed in its own storage).
    """

    method: str
    library: ClassVar[bool] = False
    diagnosable: ClassVar[bool] = True

    def round(self, context: StepContext) -> None:
        """Round the quantizer's targets of `context.model` in place."""
        raise NotImplementedError

    def linear_bits(self, quantizer: QuantizerConfig) -> tuple[int, int]:
        """(weight bits, activation bits) of the rounded targets; 16 for float."""
        w = quantizer.weights.bits if quantizer.weights else 16
        a = quantizer.activations.bits if quantizer.activations else 16
        return w, a

    def formats_label(self, quantizer: QuantizerConfig) -> str:
        """What the targets get, e.g. 'int4 g32 / int8 token'."""
        w = quantizer.weights.label() if quantizer.weights else "fp"
        a = quantizer.activations.label() if quantizer.activations else "fp"
        return f"{w} / {a}"

    def versions(self) -> dict[str, str]:
        """Versions of the packages its results depend on beyond `library_versions()`."""
        return {}

    def problem_with(self, quantizer: QuantizerConfig) -> str | None:
        """Why this step cannot be part of `quantizer` (read at load time), or None."""
        return None

    def width_error(self, in_features: int) -> tuple[str, str, str] | None:
        """(field, problem, fix) when the step's own fields cannot round a target of input
        width `in_features`; the plan checks `weights:` / `activations:` formats apart."""
        return None

    def refusal(self, found: Inventory, quantizer: QuantizerConfig) -> str | None:
        """Why the step cannot round this model's targets (None: it can)."""
        return None

    def tokens_share_scales(self) -> str | None:
        """Why the step's own arithmetic spans several tokens of a sequence, or None (see
        `QuantizerConfig.tokens_share_scales`)."""
        return None


TRANSFORMS: Registry[type[Transform]] = Registry("transform")
ROUNDINGS: Registry[type[Rounding]] = Registry("rounding method")
# `method:` shorthand -> (transform names, rounding name); gptq's `rotate: true` adds rotation
SHORTHANDS: dict[str, tuple[tuple[str, ...], str]] = {}
T = TypeVar("T", bound=type)


def register_transform(name: str, shorthand: bool = True) -> Callable[[T], T]:
    """Class decorator: register a Transform under `name` (its `transform:` literal); with
    `shorthand`, `method: <name>` in a recipe stands for this transform, then rtn."""

    def add(step: T) -> T:
        TRANSFORMS.register(name)(step)
        if shorthand:
            SHORTHANDS[name] = ((name,), "rtn")
        return step

    return add


def register_rounding(name: str) -> Callable[[T], T]:
    """Class decorator: register a Rounding under `name` (its `method:` literal), which is
    also the shorthand for that rounding alone."""

    def add(step: T) -> T:
        ROUNDINGS.register(name)(step)
        SHORTHANDS[name] = ((), name)
        return step

    return add


def transforms_key(before: tuple[Transform, ...]) -> str:
    """What the transforms applied so far are, for keying statistics of the changed model."""
    return json.dumps([t.model_dump() for t in before], sort_keys=True)
