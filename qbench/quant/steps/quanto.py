"""The optimum-quanto step: its QLinear with int8 / int4 / int2 weights and int8 / fp8 activations.

- Weights: qint8 symmetric per output channel (scale absmax / 127); qint4 / qint2 affine per
  group of `group` input columns: scale (max - min) / (2^b - 1) and a float shift -min, so
  x -> round((x - min) / scale) * scale + min (no integer zero point). Without `group`,
  quanto picks 128, else 96, 64 or 32 where one divides the layer's input width (and the width
  exceeds 128), else one group per output channel.
- Activations: every target linear's input is quantized with one static scale per tensor
  (absmax / qmax), calibrated by quanto's `Calibration` over the `calibration` text (the
  scales' running average, momentum 0.9); outputs are quantized too where the next operation
  consumes quantized tensors (quanto's "streamline"), which in these decoders is nowhere.

The layers are frozen after calibration: the weights are stored quantized and dequantized
on the fly. qint4 / qint2 on CPU use quanto's C++ unpacking extension, compiled on first use
(`make install` builds it once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from qbench.data.calibration import CalibrationSpec
from qbench.quant.steps.base import register_rounding
from qbench.quant.steps.library import LibraryRounding

if TYPE_CHECKING:
    from qbench.quant.context import StepContext
    from qbench.quant.quantizer import QuantizerConfig

WEIGHT_BITS = {"qint2": 2, "qint4": 4, "qint8": 8}
ACTIVATION_LABELS = {"qint8": "int8", "qfloat8_e4m3fn": "fp8_e4m3", "qfloat8_e5m2": "fp8_e5m2"}


@register_rounding("quanto")
class Quanto(LibraryRounding):
    """optimum.quanto's quantize -> (Calibration) -> freeze on the target linears."""

    PACKAGE: ClassVar[str] = "optimum-quanto"
    OWN_FIELDS: ClassVar[str] = "weight_qtype: qint8 | qint4 | qint2 and activation_qtype:"

    method: Literal["quanto"] = "quanto"
    weight_qtype: Literal["qint8", "qint4", "qint2"]
    activation_qtype: Literal["qint8", "qfloat8_e4m3fn", "qfloat8_e5m2"] | None = None
    group: int | None = Field(default=None, ge=1)  # qint4 / qint2; None: quanto's choice
    calibration: CalibrationSpec | None = None  # with activation_qtype; defaults filled in

    @model_validator(mode="before")
    @classmethod
    def _calibrate_activations(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("activation_qtype") and "calibration" not in data:
            return {**data, "calibration": {}}
        return data

    @model_validator(mode="after")
    def _fields_apply(self) -> Quanto:
        if self.group is not None and self.weight_qtype == "qint8":
            raise ValueError("group applies to qint4 / qint2 (qint8 is per channel): remove group")
        if self.activation_qtype is None and self.calibration is not None:
            raise ValueError("calibration sets activation scales: add activation_qtype or remove")
        return self

    def linear_bits(self, quantizer: QuantizerConfig) -> tuple[int, int]:
        return WEIGHT_BITS[self.weight_qtype], 16 if self.activation_qtype is None else 8

    def formats_label(self, quantizer: QuantizerConfig) -> str:
        weights = {"qint8": "int8 channel"}.get(
            self.weight_qtype, f"{self.weight_qtype[1:]} asym g{self.group or '(auto)'}"
        )
        activations = "fp"
        if self.activation_qtype is not None:
            activations = f"{ACTIVATION_LABELS[self.activation_qtype]} static tensor"
        return f"{weights} / {activations}"

    def width_error(self, in_features: int) -> tuple[str, str, str] | None:
        if self.group is not None and in_features % self.group:
            return (
                "group",
                f"group {self.group} does not divide the input width {in_features}",
                f"use a group size that divides {in_features}, or leave group unset "
                "(quanto's choice: 128, 96, 64 or 32 where one divides, else per channel)",
            )
        return None

    def round(self, context: StepContext) -> None:
        from qbench.quant.backends.quanto import quantize_linears

        quantize_linears(context, self)
