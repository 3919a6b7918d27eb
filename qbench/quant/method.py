"""The base of every quantization method's config, and the method registry."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.quant.kvcache import quantize_kv_cache
from qbench.quant.spec import ActivationQuant, KVQuant, WeightQuant, fake_quant
from qbench.registry import Registry


class QuantizerConfig(StrictModel):
    """One named quantizer of a recipe.

    Subclasses set `method`, implement `quantize_linears` and may override `transform`.
    `kv` quantizes the KV cache, whatever the method.
    """

    # Whether outlier diagnostics can read the quantized model (not where a library keeps
    # its weights packed in its own storage).
    diagnosable: ClassVar[bool] = True

    name: str
    method: str
    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None
    kv: KVQuant | None = None
    lm_head: bool = False
    embeddings: bool = False

    @model_validator(mode="after")
    def _quantizes_something(self) -> QuantizerConfig:
        if self.weights is None and self.activations is None and self.kv is None:
            raise ValueError("set weights:, activations: and/or kv: (the fp reference is implicit)")
        if self.embeddings and self.weights is None:
            raise ValueError("embeddings: true needs weights: (embeddings have no activations)")
        return self

    def precision(self) -> str:
        """The label of leaderboards, e.g. 'W4A8', 'W4A4KV4' (16 for what stays in float)."""
        w, a = self.linear_bits()
        return f"W{w}A{a}" + (f"KV{self.kv.bits}" if self.kv else "")

    def linear_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the quantized linears; 16 for float."""
        w = self.weights.bits if self.weights else 16
        a = self.activations.bits if self.activations else 16
        return w, a

    def label(self) -> str:
        """The leaderboard's description, e.g. 'rtn: int4 g32 / int8 token / kv int4 token'."""
        return self.linear_label() + (f" / kv {self.kv.label()}" if self.kv else "")

    def linear_label(self) -> str:
        """What the linears get, e.g. 'rtn: int4 g32 / int8 token'."""
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
    def quantizes_linears(self) -> bool:
        """Whether the method rounds linears (not a KV-cache-only quantizer)."""
        return self.weights is not None or self.activations is not None

    @property
    def has_transform(self) -> bool:
        """Whether the method changes the float model before rounding (a "transformed" stage)."""
        return type(self).transform is not QuantizerConfig.transform

    def transform(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Change `model` in place without changing its function in float (smooth, rotate)."""

    def quantize(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Round the (transformed) `model` in place: its linears, the input embedding (RTN of
        `weights`) when `embeddings: true`, then the KV cache if asked.

        With `lm_head: true` or `embeddings: true` lm_head and the embedding get different
        weights, so they are untied first (`untie_word_embeddings`).
        """
        if self.lm_head or self.embeddings:
            untie_word_embeddings(model)
        if self.quantizes_linears:
            self.quantize_linears(model, tokenizer)
        if self.embeddings:
            embed = model.get_input_embeddings()
            embed.weight = nn.Parameter(fake_quant(embed.weight.detach(), self.weights), False)
        if self.kv is not None:
            quantize_kv_cache(model, self.kv)

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Round the linears as the method says."""
        raise NotImplementedError

    def tokens_share_scales(self) -> str | None:
        """Why a dynamic scale of this quantizer spans several tokens of a sequence, or None.

        Such a scale would also see the padding lm-eval appends to the shorter requests of a
        batch, so the cell's tasks run one request per call (qbench.eval.tasks).
        """
        if self.activations is not None and self.activations.granularity == "tensor":
            return "activations: granularity tensor takes one dynamic scale per sequence"
        return None

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


def untie_word_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight and tell transformers not to tie it again.

    `tie_weights()` (which lm-eval's HFLM calls on the model it wraps) ties lm_head to the input
    embedding wherever the config's `tie_word_embeddings` is true; it is set false on the config
    and on its text config (which composite models read).
    """
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
