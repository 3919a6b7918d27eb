"""The base of every quantization method's config, and the method registry."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from qbench.config import StrictModel
from qbench.quant.coverage import check_complete, coverage
from qbench.quant.inventory import KINDS, Inventory, Target, inventory
from qbench.quant.kvcache import quantize_kv_cache
from qbench.quant.spec import ActivationQuant, KVQuant, WeightQuant
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
    routers: bool = False

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

    def targeted_kinds(self) -> set[str]:
        """The target kinds (qbench.quant.inventory) this quantizer rounds: every linear-like
        weight but lm_head and MoE routers, which stay in float unless asked for."""
        kinds = set(KINDS) - {"lm_head", "router"}
        return (
            kinds
            | ({"lm_head"} if self.lm_head else set())
            | ({"router"} if self.routers else set())
        )

    def refusal(self, found: Inventory) -> str | None:
        """Why this quantizer cannot do what it claims on a model with inventory `found`
        (None: it can). Read at plan time on the checkpoint's skeleton (no weights)."""
        if self.quantizes_linears and found.unsupported:
            name, why = next(iter(found.unsupported.items()))
            return (
                f"{len(found.unsupported)} modules hold weights qbench cannot round ({name}: {why})"
            )
        if (
            self.activations is not None
            and self.activations.granularity == "tensor"
            and found.of_kind("experts", "router")
        ):
            return (
                "activations granularity tensor on expert inputs (and a mixture-of-experts "
                "block's router input, which flattens the batch) would share one scale among "
                "the tokens of a whole batch: use token or group"
            )
        return None

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

    def quantize(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        before: dict[str, tuple[str, int]] | None = None,
    ) -> dict:
        """Round the (transformed) `model` in place: its targets, then the KV cache if asked.

        Returns the coverage report (qbench.quant.coverage) counted against `before`, the
        `Inventory.sizes()` taken before the transform (default: taken now); raises
        QBenchError when a targeted weight stayed in float. With `lm_head: true` or
        `embeddings: true` lm_head and the embedding get different weights, so they are untied
        first (`untie_word_embeddings`).
        """
        before = before or inventory(model).sizes()
        if self.lm_head or self.embeddings:
            untie_word_embeddings(model)
        if self.quantizes_linears:
            self.quantize_linears(model, tokenizer)
        if self.kv is not None:
            quantize_kv_cache(model, self.kv)
        report = coverage(model, before, self)
        name = getattr(getattr(model, "config", None), "name_or_path", "") or "the model"
        check_complete(report, self, name)
        return report

    def quantize_linears(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Round the targets (and embeddings) as the method says."""
        raise NotImplementedError

    def tokens_share_scales(self) -> str | None:
        """Why a dynamic scale of this quantizer spans several tokens of a sequence, or None.

        Such a scale would also see the padding lm-eval appends to the shorter requests of a
        batch, so the cell's tasks run one request per call (qbench.eval.tasks).
        """
        if self.activations is not None and self.activations.granularity == "tensor":
            return "activations: granularity tensor takes one dynamic scale per sequence"
        return None

    def apply(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
        """Transform, then quantize `model` in place; calibrating methods need the tokenizer.
        Returns the coverage report (see `quantize`)."""
        before = inventory(model).sizes()
        self.transform(model, tokenizer)
        return self.quantize(model, tokenizer, before)


METHODS: Registry[type[QuantizerConfig]] = Registry("quantization method")


def quantized_targets(found: Inventory, config: QuantizerConfig) -> dict[str, Target]:
    """The targets of `found` that `config` rounds (see `QuantizerConfig.targeted_kinds`)."""
    kinds = config.targeted_kinds()
    return {name: t for name, t in found.targets.items() if t.kind in kinds}


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
