"""The common ground of methods that hand linears to a quantization library's own modules."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, ClassVar

from pydantic import model_validator

from qbench.quant.method import QuantizerConfig


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

    @model_validator(mode="after")
    def _quantizes_something(self) -> LibraryConfig:
        """The library's fields always quantize (replaces the base's weights/activations check)."""
        return self
