"""The steps a quantizer is made of: float transforms, then one rounding step.

A quantizer (qbench.quant.quantizer.QuantizerConfig) is an ordered list of transforms
(`Transform`: smoothquant, awq, rotation) followed by one rounding step (`Rounding`: rtn,
gptq, bitsandbytes, quanto), then optionally the KV cache, in the spirit of llm-compressor's
recipes (an ordered list of typed modifiers, validated as a whole). Each step is a strict
config registered once under its name; it receives the whole quantizer (its weight and
activation formats, which targets it rounds) and the transforms applied before it, which key
the statistics it shares with other cells of the checkpoint.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.quant.inventory import Inventory, Target
from qbench.registry import Registry

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig


class Transform(StrictModel):
    """A change of the float model before rounding (a quantizer's "transformed" stage)."""

    transform: str

    def apply(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        quantizer: QuantizerConfig,
        before: tuple[Transform, ...],
    ) -> None:
        """Change `model` in place (after the transforms `before`)."""
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

    def round(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        quantizer: QuantizerConfig,
        before: tuple[Transform, ...],
    ) -> None:
        """Round the quantizer's targets of `model` in place."""
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


TRANSFORMS: Registry[type[Transform]] = Registry("transform")
ROUNDINGS: Registry[type[Rounding]] = Registry("rounding method")


def quantized_targets(found: Inventory, quantizer: QuantizerConfig) -> dict[str, Target]:
    """The targets of `found` that `quantizer` rounds (see `QuantizerConfig.targeted_kinds`)."""
    kinds = quantizer.targeted_kinds()
    return {name: t for name, t in found.targets.items() if t.kind in kinds}


def transforms_key(before: tuple[Transform, ...]) -> str:
    """What the transforms applied so far are, for keying statistics of the changed model."""
    return json.dumps([t.model_dump() for t in before], sort_keys=True)
