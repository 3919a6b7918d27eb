"""A quantizer: an ordered list of float transforms, one rounding step, and the KV cache.

    - name: sq-gptq-w8a8
      transforms: [{transform: smoothquant, alpha: 0.8}]   # or [smoothquant]
      rounding: {method: gptq, damp: 0.01}                  # or rounding: gptq
      weights: {bits: 8}
      activations: {bits: 8}

`method:` is shorthand for the common pipelines (`SHORTHANDS`), its fields given beside it as
before: `method: rotation` is the rotation transform then rtn, `method: gptq, rotate: true` is
rotation then gptq, `method: awq` is awq then rtn, `method: smoothquant, alpha: 0.8` is
smoothquant then rtn. A shorthand's fields go to the step that owns them; the quantizer keeps
the shorthand's name for its labels. The list is validated as a whole at load time: one
transform of a kind, at most one channel-scaling transform (smoothquant, awq), and none after
a rotation (it would re-introduce the per-channel scales the rotation spreads out), gptq's int
weights, awq's weights, a library's own fields instead of `weights:` / `activations:`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from qbench.config import StrictModel
from qbench.data.calibration import CalibrationSpec
from qbench.quant.formats.spec import ActivationQuant, KVQuant, WeightQuant
from qbench.quant.steps import ROUNDINGS, SHORTHANDS, TRANSFORMS
from qbench.quant.walk.select import KINDS, pattern_problem, quantized_targets
from qbench.registry import Registry, did_you_mean

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from qbench.quant.walk.inventory import Inventory

AnyTransform = Annotated[
    functools.reduce(operator.or_, (TRANSFORMS.get(n) for n in TRANSFORMS)),
    Field(discriminator="transform"),
]
AnyRounding = Annotated[
    functools.reduce(operator.or_, (ROUNDINGS.get(n) for n in ROUNDINGS)),
    Field(discriminator="method"),
]

SCALING = ("smoothquant", "awq")  # transforms that move per-channel scales into the weights
COMMON = (
    "name", "method", "weights", "activations", "kv", "lm_head", "embeddings", "routers",
    "targets", "ignore",
)  # fmt: skip


class QuantizerConfig(StrictModel):
    """One named quantizer of a recipe: transforms, rounding, formats, what it targets.

    `kv` quantizes the KV cache after the rounding, whatever the steps. lm_head and MoE
    routers stay in float unless `lm_head: true` / `routers: true`; `embeddings: true` rounds
    the input embedding table with `weights:`. `targets:` / `ignore:` narrow the targets by
    module path (qbench.quant.walk.select: `re:<regex>` or a glob): only targets matching one
    of `targets` (default: all), and none of `ignore`, are rounded; the rest stay in float,
    and the coverage and labels say so. `name` defaults to the steps ('smoothquant+gptq').
    """

    name: str = ""
    method: str | None = None  # the shorthand it was written with (labels), if any
    transforms: list[SerializeAsAny[AnyTransform]] = Field(default_factory=list)
    rounding: SerializeAsAny[AnyRounding]
    weights: WeightQuant | None = None
    activations: ActivationQuant | None = None
    kv: KVQuant | None = None
    lm_head: bool = False
    embeddings: bool = False
    routers: bool = False
    targets: list[str] | None = Field(default=None, min_length=1)
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        """`method: m` and m's fields -> transforms and rounding (see SHORTHANDS)."""
        if not isinstance(data, dict) or ("rounding" in data and "method" not in data):
            return data
        method, known = data.get("method"), ", ".join(SHORTHANDS)
        if not isinstance(method, str):
            problem = "is missing" if method is None else f"must be a name, not {method!r}"
            raise ValueError(
                f"method: {problem}; known: {known}; or give rounding: (and transforms:)"
            )
        if method not in SHORTHANDS:
            hint = did_you_mean(method, list(SHORTHANDS))
            raise ValueError(f"unknown quantization method '{method}'{hint}; known: {known}")
        if "transforms" in data or "rounding" in data:
            raise ValueError("give method: (a shorthand) or transforms: / rounding:, not both")
        names, rounding = SHORTHANDS[method]
        if method == "gptq" and data.get("rotate") is True:
            names = ("rotation",)
        steps = [TRANSFORMS.get(n) for n in names] + [ROUNDINGS.get(rounding)]
        owned = {f for step in steps for f in step.model_fields} - {"transform", "method"}
        known = [*COMMON, *sorted(owned), *(["rotate"] if method == "gptq" else [])]
        for key in data:
            if key not in known:
                raise ValueError(
                    f"unknown field '{key}' for method {method}{did_you_mean(str(key), known)}; "
                    f"allowed: {', '.join(known)}"
                )

        def fields_of(step: type) -> dict[str, Any]:
            return {k: v for k, v in data.items() if k in step.model_fields and k not in COMMON}

        expanded = {k: v for k, v in data.items() if k in COMMON}
        expanded["transforms"] = [{"transform": n, **fields_of(TRANSFORMS.get(n))} for n in names]
        expanded["rounding"] = {"method": rounding, **fields_of(ROUNDINGS.get(rounding))}
        return expanded

    @field_validator("transforms", mode="before")
    @classmethod
    def _transform_names(cls, value: Any) -> Any:
        """`smoothquant` is short for `{transform: smoothquant}`; names are known ones."""
        if not isinstance(value, list):
            return value
        steps = [{"transform": v} if isinstance(v, str) else v for v in value]
        for step in steps:
            _known_step(step, "transform", TRANSFORMS)
        return steps

    @field_validator("rounding", mode="before")
    @classmethod
    def _rounding_name(cls, value: Any) -> Any:
        """`gptq` is short for `{method: gptq}`; the name is a known one."""
        step = {"method": value} if isinstance(value, str) else value
        _known_step(step, "method", ROUNDINGS)
        return step

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or ():
            if problem := pattern_problem(pattern):
                raise ValueError(problem)
        return patterns

    @model_validator(mode="wrap")
    @classmethod
    def _default_name(cls, data: Any, handler: Any) -> QuantizerConfig:
        """An unnamed quantizer is named after its steps ('rtn', 'smoothquant+gptq')."""
        config = handler(data)
        return config if config.name else config.model_copy(update={"name": config.steps()})

    @model_validator(mode="after")
    def _valid_pipeline(self) -> QuantizerConfig:
        specs = (self.weights, self.activations, self.kv)
        if all(spec is None for spec in specs) and not self.rounding.library:
            raise ValueError("set weights:, activations: and/or kv: (the fp reference is implicit)")
        if problem := pipeline_problem(self):
            raise ValueError(problem)
        if self.embeddings and self.weights is None:
            raise ValueError("embeddings: true needs weights: (embeddings have no activations)")
        return self

    # ------------------------------------------------------------ labels

    def steps(self) -> str:
        """The shorthand it was written with where that says it all ('rotation'), else the
        steps in order ('smoothquant+gptq', 'rotation+gptq')."""
        names = tuple(t.transform for t in self.transforms)
        if self.method is not None and SHORTHANDS[self.method] == (names, self.rounding.method):
            return self.method
        return "+".join([*names, self.rounding.method])

    def precision(self) -> str:
        """The label of leaderboards, e.g. 'W4A8', 'W4A4KV4' (16 for what stays in float)."""
        w, a = self.linear_bits()
        return f"W{w}A{a}" + (f"KV{self.kv.bits}" if self.kv else "")

    def linear_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the rounded targets; 16 for float."""
        return self.rounding.linear_bits(self)

    def label(self) -> str:
        """The leaderboard's description, e.g. 'rtn: int4 g32 / int8 token / kv int4 head',
        with what the patterns leave out ('...; ignore: re:.*down_proj')."""
        text = self.linear_label() + (f" / kv {self.kv.label()}" if self.kv else "")
        return text + (f"; {self.patterns_label()}" if self.patterns_label() else "")

    def patterns_label(self) -> str:
        """The `targets:` / `ignore:` patterns, e.g. 'ignore: re:.*down_proj' ('' if none)."""
        parts = [f"targets: {', '.join(self.targets)}"] if self.targets else []
        parts += [f"ignore: {', '.join(self.ignore)}"] if self.ignore else []
        return "; ".join(parts)

    def linear_label(self) -> str:
        """What the targets get, e.g. 'smoothquant+gptq: int8 channel / int8 token'."""
        return f"{self.steps()}: {self.rounding.formats_label(self)}"

    # ------------------------------------------------------------ what it does

    def targeted_kinds(self) -> set[str]:
        """The target kinds (qbench.quant.inventory) this quantizer rounds: every linear-like
        weight but lm_head and MoE routers, which stay in float unless asked for."""
        kinds = set(KINDS) - {"lm_head", "router"}
        kinds |= {"lm_head"} if self.lm_head else set()
        return kinds | ({"router"} if self.routers else set())

    @property
    def quantizes_linears(self) -> bool:
        """Whether it rounds targets (not a KV-cache-only quantizer)."""
        return self.rounding.library or self.weights is not None or self.activations is not None

    @property
    def has_transform(self) -> bool:
        """Whether it changes the float model before rounding (a "transformed" stage)."""
        return bool(self.transforms)

    @property
    def lossless(self) -> bool:
        """Whether its transforms leave the float model's function unchanged."""
        return all(t.is_lossless() for t in self.transforms)

    @property
    def diagnosable(self) -> bool:
        return self.rounding.diagnosable

    def calibrations(self) -> list[tuple[str, CalibrationSpec]]:
        """(field path, spec) of every step's calibration text, in pipeline order, e.g.
        ('transforms[0].calibration', ...), ('rounding.calibration', ...)."""
        steps = [(f"transforms[{i}]", t) for i, t in enumerate(self.transforms)]
        found = []
        for where, step in [*steps, ("rounding", self.rounding)]:
            spec = getattr(step, "calibration", None)
            if isinstance(spec, CalibrationSpec):
                found.append((f"{where}.calibration", spec))
        return found

    def versions(self) -> dict[str, str]:
        """Versions of the packages its results depend on beyond `library_versions()`."""
        found = dict(self.rounding.versions())
        for transform in self.transforms:
            found |= transform.versions()
        return found

    def width_error(self, in_features: int) -> tuple[str, str, str] | None:
        return self.rounding.width_error(in_features)

    def tokens_share_scales(self) -> str | None:
        """Why a dynamic scale of this quantizer spans several tokens of a sequence, or None
        (its tasks then run one request per call: qbench.eval.tasks)."""
        if self.activations is not None and self.activations.granularity == "tensor":
            return "activations: granularity tensor takes one dynamic scale per sequence"
        return self.rounding.tokens_share_scales()

    def refusal(self, found: Inventory) -> str | None:
        """Why this quantizer cannot do what it claims on a model with inventory `found`
        (None: it can). Read at plan time on the checkpoint's skeleton (no weights)."""
        if self.quantizes_linears and found.unsupported:
            name, why = next(iter(found.unsupported.items()))
            return (
                f"{len(found.unsupported)} modules hold weights qbench cannot round ({name}: {why})"
            )
        if self.quantizes_linears and not quantized_targets(found, self):
            kinds = ", ".join(sorted(self.targeted_kinds()))
            return f"the model has no weights of the kinds it rounds ({kinds}): nothing to quantize"
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
        return self.rounding.refusal(found, self)

    def apply(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        seed: int = 0,
        shared: dict[Hashable, Any] | None = None,
        notes: list[str] | None = None,
        on_transformed: Callable[[nn.Module], None] | None = None,
    ) -> dict:
        """Quantize `model` in place: the transforms in order, then `on_transformed(model)`
        (the runner evaluates the transformed float stage there), then the rounding, the
        embedding table (`embeddings: true`) and the KV cache (qbench.quant.pipeline.run).

        Calibrating steps need the tokenizer; `seed` fixes their windows and random draws;
        `shared`: a store the cells of one checkpoint share (statistics of the fp model);
        `notes`: collects what the steps did beyond their labels. Returns the coverage report
        (qbench.quant.walk.coverage). Raises QBenchError before any change where the quantizer
        cannot run on the model (as the planner would refuse it), where the model is already
        quantized, and after it where a targeted weight stayed in float.
        """
        from qbench.quant.pipeline import run

        return run(self, model, tokenizer, seed, shared, notes, on_transformed)


def _known_step(step: Any, key: str, registry: Registry) -> None:
    """ValueError naming the registered steps (did you mean) for an unknown step name."""
    if isinstance(step, dict) and key in step:
        name = step[key]
        if not isinstance(name, str) or name not in registry:
            hint = did_you_mean(str(name), registry.names())
            raise ValueError(
                f"unknown {registry.kind} {name!r}{hint}; known: {', '.join(registry.names())}"
            )


def pipeline_problem(quantizer: QuantizerConfig) -> str | None:
    """Why the steps do not make one quantizer (see the module docstring), or None."""
    kinds = [t.transform for t in quantizer.transforms]
    if repeated := sorted({k for k in kinds if kinds.count(k) > 1}):
        return f"transforms: {', '.join(repeated)} listed twice: one of each kind"
    scaling = [k for k in kinds if k in SCALING]
    if len(scaling) > 1:
        return f"transforms: {' and '.join(scaling)} both scale channels: keep one"
    if "rotation" in kinds and scaling and kinds.index(scaling[0]) > kinds.index("rotation"):
        return (
            f"transforms: {scaling[0]} after rotation would re-introduce the per-channel scales "
            "the rotation spreads out: put it before the rotation"
        )
    rounding = quantizer.rounding
    if rounding.library and (quantizer.weights or quantizer.activations):
        key = "weights" if quantizer.weights else "activations"
        return f"{rounding.method} takes {rounding.OWN_FIELDS}, not {key}: (remove {key})"
    if rounding.library and quantizer.embeddings:
        return f"{rounding.method} quantizes linear layers only: remove embeddings"
    for step in [*quantizer.transforms, rounding]:
        if problem := step.problem_with(quantizer):
            return problem
    if scaling and not quantizer.quantizes_linears:
        return (
            f"transforms: {scaling[0]} scales channels for rounded weights and activations, and "
            "this quantizer rounds neither: add weights: / activations:, or drop it"
        )
    return None
