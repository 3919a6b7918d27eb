"""The recipe: a YAML file validated into typed models at load time.

Every error names the file and the field path, e.g.
`recipes/x.yaml: quantizers[2].weights.bits: must be between 2 and 8`.
"""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from qbench.checkpoints.model import variant_options
from qbench.checkpoints.random import RandomSpec
from qbench.checkpoints.train import PRESETS
from qbench.config import StrictModel
from qbench.data.sources import TEXT_SOURCES, check_split, text_source
from qbench.errors import QBenchError
from qbench.eval.diagnostics import DiagnosticsSpec
from qbench.quant import METHODS
from qbench.registry import did_you_mean

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecipeError(QBenchError):
    """A recipe that cannot run; the message names the file and the field."""


def _check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"'{name}' must be letters, digits, '.', '_' or '-' (it names files)")
    return name


def _in_registry(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    return name


class TrainSpec(StrictModel):
    """A checkpoint trained here, cached by a hash of its full config."""

    preset: str = "tiny"
    variant: str = "baseline"
    corpus: str = "embedded"
    seed: int = 0
    steps: int | None = Field(default=None, ge=1)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        return _in_registry(PRESETS, preset)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        variant_options(variant)  # raises ValueError naming the known variants
        return variant

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, corpus: str) -> str:
        """A registered text source with a train split, or a folder of .txt files."""
        try:
            source = text_source(corpus)
        except QBenchError as error:
            raise ValueError(str(error)) from None
        if "train" not in source.splits:
            raise ValueError(f"'{corpus}' has no train split; use a corpus with one")
        return corpus


SOURCES = ("hf", "path", "train", "random")


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: Any) -> Any:
    """A strategy name, or module name -> GPU index, "cuda[:i]", "cpu" or "disk"."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        hint = did_you_mean(device_map, list(DEVICE_MAP_STRATEGIES))
        raise ValueError(
            f"'{device_map}' is no device_map strategy{hint}; use "
            f"{', '.join(DEVICE_MAP_STRATEGIES)} or a mapping of module names to devices"
        )
    for module, where in device_map.items() if isinstance(device_map, dict) else ():
        gpu = isinstance(where, int) and not isinstance(where, bool) and where >= 0
        named = isinstance(where, str) and re.fullmatch(r"cpu|disk|cuda(:\d+)?", where)
        if not (gpu or named):
            raise ValueError(
                f"'{module}': {where!r} is not a device; use a GPU index (0, 1, ...), "
                "cuda:<i>, cpu or disk"
            )
    return device_map


class CheckpointSpec(StrictModel):
    """One model: a hub id, a local HF directory, trained here, or random (exactly one).

    `seeds: [0, 1, 2]` (train: and random: only) stands for one checkpoint per seed, named
    `<name>@<seed>` and grouped under `<name>`; leaderboards aggregate a group over its
    members. `group:` puts checkpoints given one by one into a group.
    `dtype: auto` is the checkpoint's own (config.json's dtype / torch_dtype), resolved at plan
    time. `device_map` (accelerate, through transformers) spreads the model over GPUs and
    offloads to "cpu" / "disk" (`offload_folder`); inputs go to the first module's device.
    """

    name: str
    hf: str | None = None
    revision: str | None = None
    path: str | None = None
    train: TrainSpec | None = None
    random: RandomSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device_map: Annotated[str | dict[str, int | str] | None, BeforeValidator(_check_device_map)] = (
        None
    )
    offload_folder: str | None = None
    trust_remote_code: bool = False
    group: str | None = None
    seeds: list[int] | None = Field(default=None, min_length=1)

    _name = field_validator("name")(_check_name)

    @property
    def source_field(self) -> str:
        """Which of hf / path / train / random this checkpoint comes from."""
        return next(k for k in SOURCES if getattr(self, k) is not None)

    @property
    def seeded(self) -> TrainSpec | RandomSpec | None:
        """The part of the spec that takes a seed (train: or random:), if any."""
        return self.train if self.train is not None else self.random

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointSpec:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of hf:, path:, train:, random: (got {given or 'none'})"
            )
        if self.revision is not None and self.hf is None:
            raise ValueError("revision: applies to hf: checkpoints only")
        if self.seeds is not None:
            if self.seeded is None:
                raise ValueError(
                    "seeds: applies to train: and random: checkpoints; group others with group:"
                )
            if "seed" in self.seeded.model_fields_set:
                raise ValueError(f"give seeds: or {self.source_field}.seed, not both")
            if len(set(self.seeds)) < len(self.seeds):
                raise ValueError(f"seeds: {self.seeds} lists a seed twice")
        return self

    @model_validator(mode="after")
    def _offload_folder(self) -> CheckpointSpec:
        to_disk = isinstance(self.device_map, dict) and "disk" in self.device_map.values()
        if to_disk and self.offload_folder is None:
            raise ValueError("device_map offloads to disk: give offload_folder: <directory>")
        if self.offload_folder is not None and self.device_map is None:
            raise ValueError("offload_folder: applies with a device_map only")
        return self

    def expand(self) -> list[CheckpointSpec]:
        """This checkpoint, or one per seed of `seeds` (named name@seed, grouped by name)."""
        if self.seeds is None:
            return [self]
        return [
            self.model_copy(
                update={
                    "name": f"{self.name}@{seed}",
                    "group": self.group or self.name,
                    "seeds": None,
                    self.source_field: self.seeded.model_copy(update={"seed": seed}),
                }
            )
            for seed in self.seeds
        ]


class PerplexitySpec(StrictModel):
    """GPTQ-style token perplexity on one split of a text source."""

    data: str
    split: str = "test"
    seq_len: int = Field(default=2048, ge=2)
    batch_size: int = Field(default=8, ge=1)
    max_windows: int | None = Field(default=None, ge=1)
    name: str | None = None

    @field_validator("data")
    @classmethod
    def _known_data(cls, data: str) -> str:
        return _in_registry(TEXT_SOURCES, data)

    @model_validator(mode="after")
    def _known_split(self) -> PerplexitySpec:
        check_split(self.data, self.split)
        return self

    @property
    def column(self) -> str:
        """The key under metrics.perplexity and the leaderboard column."""
        return self.name or self.data


def _diagnostics_switch(value: Any) -> Any:
    """`diagnostics: true` means the default settings; false means none."""
    if isinstance(value, bool):
        return {} if value else None
    return value


class TaskSpec(StrictModel):
    """One downstream task run through lm-eval; limit / num_fewshot override task_options."""

    name: str
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        from qbench.eval.tasks import check_task_name  # lm-eval's index only when needed

        return check_task_name(name)


def _task_from_name(value: Any) -> Any:
    """`piqa` is short for `{name: piqa}`."""
    return {"name": value} if isinstance(value, str) else value


class TaskOptions(StrictModel):
    """How lm-eval runs every task: batch size, documents per task, few-shot, stderr."""

    batch_size: int = Field(default=16, ge=1)
    limit: int | None = Field(default=None, ge=1)  # first N documents of each task; None: all
    num_fewshot: int = Field(default=0, ge=0)
    bootstrap_iters: int = Field(default=1000, ge=0)  # for non-mean metrics; 0: no stderr
    log_samples: bool = False  # per-document records to results/<recipe>/samples/


class EvalSpec(StrictModel):
    perplexity: list[PerplexitySpec] = Field(min_length=1)
    tasks: list[Annotated[TaskSpec, BeforeValidator(_task_from_name)]] = Field(default_factory=list)
    task_options: TaskOptions = Field(default_factory=TaskOptions)
    diagnostics: Annotated[DiagnosticsSpec | None, BeforeValidator(_diagnostics_switch)] = None

    @model_validator(mode="after")
    def _unique_columns(self) -> EvalSpec:
        _reject_duplicates([p.column for p in self.perplexity], "perplexity", "give each a name:")
        _reject_duplicates([t.name for t in self.tasks], "tasks", "list each task once")
        return self


def _known_method(data: Any) -> Any:
    if isinstance(data, dict):
        _in_registry(METHODS, data.get("method", "(missing)"))
    return data


Quantizer = Annotated[
    functools.reduce(operator.or_, (METHODS.get(m) for m in METHODS)),
    Field(discriminator="method"),
    BeforeValidator(_known_method),
]


class GateSpec(StrictModel):
    """Regression thresholds: minimum recovery per metric (e.g. perplexity.wikitext2: 0.95)."""

    cadence: str = "smoke"
    min_recovery: dict[str, float] = Field(default_factory=dict)
    quantizers: dict[str, dict[str, float]] = Field(default_factory=dict)
    reference: str | None = None
    tolerance: float = Field(default=0.05, gt=0)

    @model_validator(mode="after")
    def _positive_thresholds(self) -> GateSpec:
        for thresholds in [self.min_recovery, *self.quantizers.values()]:
            for metric, value in thresholds.items():
                if not value > 0:
                    raise ValueError(f"threshold of {metric} must be positive, got {value}")
        return self


class ResourcesSpec(StrictModel):
    """What one cell reserves on a Ray cluster (`qbench sweep --executor ray`)."""

    gpus_per_cell: float = Field(default=0, ge=0)
    cpus_per_cell: float = Field(default=1, gt=0)

    @field_validator("gpus_per_cell")
    @classmethod
    def _whole_or_fraction(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{gpus}: give a fraction of one GPU (e.g. 0.5) or whole GPUs")
        return gpus


class Recipe(StrictModel):
    """Checkpoints x quantizers, evaluated as `eval` says."""

    name: str
    seed: int = 0
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    quantizers: list[Quantizer] = Field(default_factory=list)
    eval: EvalSpec
    gate: GateSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    _name = field_validator("name")(_check_name)

    @field_validator("checkpoints")
    @classmethod
    def _expand_seeds(cls, checkpoints: list[CheckpointSpec]) -> list[CheckpointSpec]:
        return [member for spec in checkpoints for member in spec.expand()]

    def metric_names(self) -> list[str]:
        """The metrics every cell reports, as group.name paths (the gate's metric names)."""
        names = [f"perplexity.{spec.column}" for spec in self.eval.perplexity]
        names += [f"tasks.{task.name}" for task in self.eval.tasks]
        return names + (["zero_shot_average"] if self.eval.tasks else [])

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        _reject_duplicates([c.name for c in self.checkpoints], "checkpoints", "rename one")
        names = [q.name for q in self.quantizers]
        if "fp" in names:
            raise ValueError("quantizers: name 'fp' is reserved for the unquantized reference")
        _reject_duplicates([_check_name(n) for n in names], "quantizers", "rename one")
        if self.gate is not None:
            self._check_gate(names)
        return self

    @model_validator(mode="after")
    def _diagnosable(self) -> Recipe:
        for i, quantizer in enumerate(self.quantizers if self.eval.diagnostics is not None else []):
            if not quantizer.diagnosable:
                raise ValueError(
                    f"eval.diagnostics: quantizers[{i}] '{quantizer.name}' ({quantizer.method}) "
                    "keeps its weights packed in the library's own storage, which the "
                    "diagnostics do not read; remove eval.diagnostics or that quantizer"
                )
        return self

    def _check_gate(self, quantizers: list[str]) -> None:
        known = self.metric_names()
        for name in self.gate.quantizers:
            if name not in quantizers:
                hint = did_you_mean(name, quantizers)
                raise ValueError(f"gate.quantizers: no quantizer '{name}'{hint}")
        for thresholds in [self.gate.min_recovery, *self.gate.quantizers.values()]:
            for metric in thresholds:
                if metric not in known:
                    raise ValueError(
                        f"gate: unknown metric '{metric}'{did_you_mean(metric, known)}; "
                        f"this recipe's metrics: {', '.join(known)}"
                    )


def _reject_duplicates(names: list[str], what: str, fix: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise ValueError(f"{what}: duplicate name(s) {sorted(seen)}: {fix}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        merge = "tag:yaml.org,2002:merge"  # `<<: *anchor` may be overridden by explicit keys
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value if k.tag != merge]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", node.start_mark
                )
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the file and field."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name:, checkpoints:, eval:")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError("\n".join(f"{path}: {_describe(e)}" for e in error.errors())) from None


def field_path(loc: tuple[Any, ...]) -> str:
    """('quantizers', 2, 'rtn', 'weights') -> 'quantizers[2].weights' (union tags dropped)."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif not (i and isinstance(loc[i - 1], int) and part in METHODS):
            text += f".{part}" if text else str(part)
    return text


def _describe(error: dict[str, Any]) -> str:
    where = field_path(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required field is missing"
    return f"{where}: {message}" if where else message  # top-level messages name their field
