"""The base of every quantization method's config, and the method registry."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.quant.spec import ActivationQuant, WeightQuant
from qbench.registry import Registry


class QuantizerConfig(StrictModel):
    """One named quantizer of a recipe. Subclasses set `method` and implement `apply`."""

    # Whether outlier diagnostics can read the quantized model (not where a library keeps
    # its weights packed in its own storage).
    diagnosable: ClassVar[bool] = True

    name: str
    method: str
    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None
    lm_head: bool = False
    embeddings: bool = False

    @model_validator(mode="after")
    def _quantizes_something(self) -> QuantizerConfig:
        if self.weights is None and self.activations is None:
            raise ValueError("set weights: and/or activations: (the fp reference is implicit)")
        if self.embeddings and self.weights is None:
            raise ValueError("embeddings: true needs weights: (embeddings have no activations)")
        return self

    def precision(self) -> str:
        """The W/A label of leaderboards, e.g. 'W4A8' (16 for what stays in float)."""
        w = self.weights.bits if self.weights else 16
        a = self.activations.bits if self.activations else 16
        return f"W{w}A{a}"

    def label(self) -> str:
        """The leaderboard's description, e.g. 'rtn: int4 g32 / int8 token'."""
        w = self.weights.label() if self.weights else "fp"
        a = self.activations.label() if self.activations else "fp"
        return f"{self.method}: {w} / {a}"

    def versions(self) -> dict[str, str]:
        """Versions of the packages its results depend on beyond `library_versions()`."""
        return {}

    def width_error(self, in_features: int) -> tuple[str, str, str] | None:
        """(field, problem, fix) when the method's own fields cannot quantize a target linear
        of input width `in_features`; plan checks `weights:` / `activations:` formats apart."""
        return None

    @property
    def has_transform(self) -> bool:
        """Whether the method changes the float model before rounding (a "transformed" stage)."""
        return type(self).transform is not QuantizerConfig.transform

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Change `model` in place without changing its function in float (smooth, rotate)."""

    def quantize(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Round the (transformed) `model` in place."""
        raise NotImplementedError

    def apply(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Transform, then quantize `model` in place; calibrating methods need the tokenizer."""
        self.transform(model, tokenizer)
        self.quantize(model, tokenizer)


METHODS: Registry[type[QuantizerConfig]] = Registry("quantization method")


def target_linears(model: nn.Module, config: QuantizerConfig) -> dict[str, nn.Linear]:
    """The linear layers `config` quantizes: all of them, lm_head only when asked."""
    lm_head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (config.lm_head or module is not lm_head)
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
