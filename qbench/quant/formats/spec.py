"""What to quantize a tensor to: format, bits, granularity, clipping; and `fake_quant`.

Granularity names the set of elements that share one scale, on a tensor whose last
dimension is the reduction (input) dimension of a linear layer:
- tensor: the whole tensor;
- channel: one output row of a weight;
- token: one row of activations (one token's hidden vector);
- group: `group` contiguous elements along the last dimension, within a row;
- head: one token's key or value vector of one attention head (KV cache).

For activations, "tensor" is one scale per sequence: every dimension but the last two of
an activation [..., tokens, features] is a batch dimension, so a sequence's scale never sees
another sequence of its batch, and the metrics do not depend on the batch size (a weight,
2-D, is one sequence: one scale). Padding inside a sequence still enters its scale: see
`QuantizerConfig.tokens_share_scales`.

Block formats fix their own blocks along the last dimension (mxfp4: 32 elements with a
power-of-two scale; nvfp4: 16 elements with an FP8 scale). For nvfp4 the granularity is the
scope of its second, FP32 scale (weights: tensor; activations: token, i.e. dynamic per-token
block scales); mxfp4 has no second scale and takes no granularity.

`scale_rule` names a convention where the field has two: int (symmetric) "qmax" (default) or
"half-range" (see qbench.quant.integer); mxfp4 "floor" (default, OCP MX) or "even" (see
qbench.quant.fp). `clip_search_norm`: the exponent p of the clip search's sum |error|^p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import field_validator, model_validator

from qbench.config import StrictModel
from qbench.registry import Registry

CLIP_SEARCH_NORM = 2.4  # the clip search's default exponent p (GPTQ's and QuaRot's)
MX_BLOCK, NV_BLOCK = 32, 16  # elements per block scale: OCP MX, NVIDIA NVFP4


@dataclass(frozen=True)
class Format:
    """A number format's shape: `bits` (None when the spec chooses it: int) and `block`, the
    elements sharing one fixed-size block scale (MX, NV), else None (one scale per granularity
    unit, shrunk by `clip`). Its arithmetic is qbench.quant.formats.fake's."""

    bits: int | None
    block: int | None


FORMATS: Registry[Format] = Registry("number format")
for _name, _format in {
    "int": Format(None, None),
    "fp8_e4m3": Format(8, None),
    "fp8_e5m2": Format(8, None),
    "fp4_e2m1": Format(4, None),
    "mxfp4": Format(4, MX_BLOCK),
    "nvfp4": Format(4, NV_BLOCK),
}.items():
    FORMATS.register(_name)(_format)

# The conventions `scale_rule` chooses between, per format; the first is the default.
SCALE_RULES = {"int": ("qmax", "half-range"), "mxfp4": ("floor", "even")}


class TensorQuant(StrictModel):
    """Fake-quantization settings shared by weights and activations."""

    format: str = "int"
    bits: int
    symmetric: bool = True
    granularity: str
    group: int | None = None
    clip: float = 1.0
    clip_search: bool = False
    clip_search_norm: float = CLIP_SEARCH_NORM
    scale_rule: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_scale_rule(cls, data: Any) -> Any:
        """The format's default convention, written out so that records name it."""
        if not isinstance(data, dict) or "scale_rule" in data:
            return data
        name = data.get("format", "int")
        symmetric = data.get("symmetric", cls.model_fields["symmetric"].default)
        known = isinstance(name, str) and name in SCALE_RULES  # else the field's own error
        if known and (name != "int" or symmetric is True):
            return {**data, "scale_rule": SCALE_RULES[name][0]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _group_implies_granularity(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("group") is not None and "granularity" not in data:
            return {**data, "granularity": "group"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _format_implies_bits(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("format", "int") not in FORMATS:
            return data
        name = data.get("format", "int")
        bits = FORMATS.get(name).bits
        if bits is None:
            return data
        if data.get("bits", bits) != bits:
            raise ValueError(f"bits: {data['bits']} contradicts format {name} ({bits} bits)")
        return {**data, "bits": bits}

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        try:
            FORMATS.get(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        return name

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int) -> int:
        if not 2 <= bits <= 8:
            raise ValueError("must be between 2 and 8")
        return bits

    @field_validator("clip")
    @classmethod
    def _clip_in_range(cls, clip: float) -> float:
        if not 0 < clip <= 1:
            raise ValueError("must be in (0, 1]: the fraction of the range kept")
        return clip

    @field_validator("clip_search_norm")
    @classmethod
    def _norm_positive(cls, norm: float) -> float:
        if not 0 < norm <= 16:
            raise ValueError("must be in (0, 16]: the exponent p of sum |error|^p (GPTQ: 2.4)")
        return norm

    @field_validator("group")
    @classmethod
    def _group_positive(cls, group: int | None) -> int | None:
        if group is not None and group < 1:
            raise ValueError("must be a positive number of elements")
        return group

    @model_validator(mode="after")
    def _group_matches_granularity(self) -> TensorQuant:
        if self.granularity == "group" and self.group is None:
            raise ValueError("granularity 'group' needs a group size: add group: <elements>")
        if self.granularity != "group" and self.group is not None:
            raise ValueError(f"group is set but granularity is '{self.granularity}'")
        return self

    @model_validator(mode="after")
    def _format_options(self) -> TensorQuant:
        block = FORMATS.get(self.format).block
        problems = {
            f"{self.format} is symmetric: remove symmetric: false": self.format != "int"
            and not self.symmetric,
            "clip_search applies to int only": self.clip_search and self.format != "int",
            "clip_search picks the clip of each row: remove clip": self.clip_search
            and self.clip < 1,
            f"{self.format} fixes its blocks at {block} elements: remove group": block is not None
            and self.group is not None,
            f"{self.format} scales from each block's max: remove clip": block is not None
            and self.clip < 1,
            "mxfp4 has only block scales: remove granularity": self.format == "mxfp4"
            and "granularity" in self.model_fields_set,
        }
        for problem, present in problems.items():
            if present:
                raise ValueError(problem)
        if "clip_search_norm" in self.model_fields_set and not self.clip_search:
            raise ValueError("clip_search_norm applies with clip_search: true: add it or remove")
        return self

    @model_validator(mode="after")
    def _scale_rule_of_format(self) -> TensorQuant:
        rules = SCALE_RULES.get(self.format, ()) if self.symmetric else ()
        if self.scale_rule is None and not rules:
            return self
        if self.format == "int" and not self.symmetric:
            raise ValueError(
                "scale_rule applies to symmetric int (an asymmetric grid spans min..max): remove"
            )
        if not rules:
            raise ValueError(f"{self.format} has one scale rule: remove scale_rule")
        if self.scale_rule not in rules:
            raise ValueError(
                f"unknown scale_rule {self.scale_rule!r} for {self.format}: "
                f"use {' or '.join(rules)} (default {rules[0]})"
            )
        return self

    @property
    def block(self) -> int | None:
        """Contiguous elements along the last dimension that share a scale, if fixed."""
        return self.group or FORMATS.get(self.format).block

    def label(self) -> str:
        """Short human label, e.g. 'int4 g32 asym'."""
        parts = [f"int{self.bits}" if self.format == "int" else self.format]
        if self.format != "mxfp4":
            parts.append(f"g{self.group}" if self.group else self.granularity)
        if not self.symmetric:
            parts.append("asym")
        if self.clip < 1:
            parts.append(f"clip{self.clip:g}")
        if self.clip_search:
            norm = (
                f" p{self.clip_search_norm:g}" if self.clip_search_norm != CLIP_SEARCH_NORM else ""
            )
            parts.append("clip-search" + norm)
        if self.scale_rule is not None and self.scale_rule != SCALE_RULES[self.format][0]:
            parts.append(self.scale_rule)
        return " ".join(parts)


class WeightQuant(TensorQuant):
    """Weights: quantized once; per output channel by default."""

    granularity: Literal["tensor", "channel", "group"] = "channel"

    @model_validator(mode="before")
    @classmethod
    def _nvfp4_scale_per_tensor(cls, data: Any) -> Any:
        """NVFP4 weights take one FP32 scale per tensor, as the format specifies."""
        if isinstance(data, dict) and data.get("format") == "nvfp4":
            return {"granularity": "group" if "group" in data else "tensor", **data}
        return data


class ActivationQuant(TensorQuant):
    """Activations: quantized dynamically at every call; per token by default."""

    granularity: Literal["tensor", "token", "group"] = "token"
    clip_search: Literal[False] = False  # a search at every call: weights only


class KVQuant(TensorQuant):
    """The KV cache: keys (after RoPE) and values, rounded dynamically at every call.

    One scale and zero point per token and head by default, or per `group` elements within a
    head; asymmetric by default (QuaRot's KV4: asymmetric, group 128 = Llama's head_dim, clip
    0.95). Formats other than int are symmetric, as for weights and activations.
    """

    granularity: Literal["head", "group"] = "head"
    symmetric: bool = False
    clip_search: Literal[False] = False  # a search at every call: weights only

    @model_validator(mode="before")
    @classmethod
    def _float_formats_symmetric(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format", "int") != "int":
            return {"symmetric": True, **data}
        return data


def divides_error(spec: TensorQuant, in_features: int) -> tuple[str, str, str] | None:
    """(field, problem, fix) when `spec` cannot quantize an input of width `in_features`."""
    if spec.group is not None and in_features % spec.group:
        return (
            "group",
            f"group {spec.group} does not divide the input width {in_features}",
            f"use a group size that divides {in_features}, or granularity: channel, or leave "
            "such layers out with the quantizer's ignore: [<module path or re:pattern>]",
        )
    if spec.block is not None and in_features % spec.block:
        return (
            "format",
            f"{spec.format}'s {spec.block}-element blocks do not divide the input width "
            f"{in_features}",
            "use a format without fixed blocks (int, fp8_e4m3, fp4_e2m1), or leave such layers "
            "out with the quantizer's ignore: [<module path or re:pattern>]",
        )
    return None
