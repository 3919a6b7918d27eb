"""The common ground of methods that hand linears to a quantization library's own modules."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, ClassVar

from pydantic import model_validator
from torch import nn

from qbench.errors import QBenchError
from qbench.quant.inventory import Inventory, inventory
from qbench.quant.method import QuantizerConfig, quantized_targets


class LibraryConfig(QuantizerConfig):
    """A library's quantized modules replace the target linears (lm_head only when asked).

    The library's own fields say how (its formats, not qbench's `weights:` / `activations:`
    fake-quant specs), so those and `embeddings:` are rejected with the field to use instead.
    """

    PACKAGE: ClassVar[str]  # the library's distribution name, e.g. "bitsandbytes"
    OWN_FIELDS: ClassVar[str]  # e.g. "scheme: int8 | nf4 | fp4", named in errors
    diagnosable: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _library_fields_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        for key in ("weights", "activations"):
            if key in data:
                raise ValueError(f"{method} takes {cls.OWN_FIELDS}, not {key}: (remove {key})")
        if data.get("embeddings"):
            raise ValueError(f"{method} quantizes linear layers only: remove embeddings")
        return data

    @property
    def quantizes_linears(self) -> bool:
        return True

    def versions(self) -> dict[str, str]:
        return {self.PACKAGE: version(self.PACKAGE)}

    def refusal(self, found: Inventory) -> str | None:
        """Why the library cannot round this model: it replaces nn.Linear layers only."""
        targets = quantized_targets(found, self)
        others = {n: t for n, t in targets.items() if not isinstance(t.module, nn.Linear)}
        if not others:
            return super().refusal(found)
        share = sum(t.numel for t in others.values()) / sum(t.numel for t in targets.values())
        kinds = ", ".join(sorted({t.kind for t in others.values()}))
        return (
            f"{self.method} replaces nn.Linear layers only: {len(others)} targets ({kinds}, "
            f"{share:.0%} of the targeted weights, e.g. {next(iter(others))}) are not linears "
            "and would stay in float; use rtn or gptq for this checkpoint"
        )

    def library_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The targets, all nn.Linear (QBenchError otherwise: see `refusal`)."""
        found = inventory(model)
        if problem := self.refusal(found):
            raise QBenchError(problem)
        return {name: t.module for name, t in quantized_targets(found, self).items()}

    @model_validator(mode="after")
    def _quantizes_something(self) -> LibraryConfig:
        """The library's fields always quantize (replaces the base's weights/activations check)."""
        return self
