"""The common ground of rounding steps that hand linears to a quantization library's modules
(their arithmetic: qbench.quant.backends)."""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, ClassVar

from qbench.quant.steps.base import Rounding
from qbench.quant.walk.select import quantized_targets

if TYPE_CHECKING:
    from qbench.quant.quantizer import QuantizerConfig
    from qbench.quant.walk.inventory import Inventory


class LibraryRounding(Rounding):
    """A library's quantized modules replace the target linears (lm_head only when asked).

    The library's own fields say how (its formats, not qbench's `weights:` / `activations:`
    fake-quant specs, which the quantizer then refuses, with the field to use instead).
    """

    PACKAGE: ClassVar[str]  # the library's distribution name, e.g. "bitsandbytes"
    OWN_FIELDS: ClassVar[str]  # e.g. "scheme: int8 | nf4 | fp4", named in errors
    library: ClassVar[bool] = True
    diagnosable: ClassVar[bool] = False

    def versions(self) -> dict[str, str]:
        return {self.PACKAGE: version(self.PACKAGE)}

    def refusal(self, found: Inventory, quantizer: QuantizerConfig) -> str | None:
        """Why the library cannot round this model: it replaces nn.Linear layers only."""
        from torch import nn

        targets = quantized_targets(found, quantizer)
        others = {n: t for n, t in targets.items() if not isinstance(t.module, nn.Linear)}
        if not others:
            return None
        share = sum(t.numel for t in others.values()) / sum(t.numel for t in targets.values())
        kinds = ", ".join(sorted({t.kind for t in others.values()}))
        return (
            f"{self.method} replaces nn.Linear layers only: {len(others)} targets ({kinds}, "
            f"{share:.0%} of the targeted weights, e.g. {next(iter(others))}) are not linears "
            "and would stay in float; use rtn or gptq for this checkpoint"
        )
