"""The recipe: a YAML file validated into typed models at load time.

Every error names the file and the field path, e.g.
`recipes/x.yaml: quantizers[2].weights.bits: must be between 2 and 8`.

The file is read with a bounded YAML loader (yaml's safe loader, with libyaml where built):
at most MAX_RECIPE_BYTES, MAX_DEPTH levels of nesting, MAX_NODES nodes (an alias or merge key
counts as the nodes it stands for, so a "billion laughs" or merge-key bomb is refused before
it is built), MAX_ALIASES aliases and MAX_MERGE_KEYS merge keys; a key given twice in one
mapping is an error (checked in linear time).
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from qbench.checkpoints.model import variant_options
from qbench.checkpoints.random import RandomSpec
from qbench.checkpoints.train import PRESETS
from qbench.config import Seed, StrictModel
from qbench.data.external import resolve_path
from qbench.data.sources import (
    TEXT_SOURCES,
    check_split,
    default_split,
    hub_text,
    path_text,
    source_text,
    text_source,
)
from qbench.data.synthetic import SPLITS as TASK_SPLITS
from qbench.data.synthetic import TaskField, TaskSource
from qbench.errors import QBenchError
from qbench.eval.diagnostics import DiagnosticsSpec
from qbench.files import utf8_text
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.steps import ROUNDINGS, TRANSFORMS
from qbench.registry import did_you_mean
from qbench.report.bootstrap import BootstrapSpec

# Names become file names and table cells: letters, digits, '.', '_', '-' (matched whole).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100  # characters; a result file name holds a checkpoint and a quantizer name
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._()-]*")
REVISION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")

MAX_RECIPE_BYTES = 256 << 10
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_ALIASES = 256
MAX_MERGE_KEYS = 256

# Counts (tokens, windows, documents, steps) fit the 32-bit sizes the libraries take.
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]


class RecipeError(QBenchError):
    """A recipe that cannot run; the message names the file and the field."""


def _check_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name!r} must be at most {NAME_MAX} letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (it names files and table cells)"
        )
    return name


def _in_registry(registry: Any, name: str) -> str:
    try:
        registry.get(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    return name


class TrainSpec(StrictModel):
    """A checkpoint trained here, cached by a hash of its full config: on the text of
    `corpus`, or with `task:` on a synthetic task over it (qbench.data.synthetic; `task:
    bigram-backcopy` or `task: {name: bigram-backcopy, vocabulary: ..., vocab_size: ...,
    triggers: ...}`), whose sequences are the preset's seq_len long."""

    preset: str = "tiny"
    variant: str = "baseline"
    corpus: str = "embedded"
    seed: Seed = 0
    steps: Count | None = None
    task: TaskField | None = None

    def task_source(self) -> TaskSource | None:
        """The task's held-out data as perplexity data (None without a task)."""
        if self.task is None:
            return None
        return TaskSource(self.task, self.corpus, PRESETS.get(self.preset).seq_len)

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
    trust_remote_code: StrictBool = False  # only a YAML true runs a checkpoint's own code
    group: str | None = None
    seeds: list[Seed] | None = Field(default=None, min_length=1)

    _name = field_validator("name", "group")(_check_name)

    @field_validator("revision")
    @classmethod
    def _safe_revision(cls, revision: str) -> str:
        if not REVISION_PATTERN.fullmatch(revision) or ".." in revision:
            raise ValueError(f"{revision!r} is not a branch, tag or commit name")
        return revision

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
    """GPTQ-style token perplexity on one text: a source's split (`data: wikitext2`, `c4`,
    ...), a user's file or folder (`data: text, path: ...`), or a hub dataset (`data: hub,
    dataset: ..., config: ..., split: ..., text_column: ...`).

    Defaults come from the source's convention: `split` is 'test' where the source has one,
    else its only split; c4 reads its first 1100 documents (`max_documents`) and scores its
    first 256 windows (`max_windows`), as GPTQ and QuaRot do.

    `data: task, checkpoint: NAME` scores the held-out split (`valid`, default, or `test`) of
    the synthetic task checkpoint (or group) NAME is trained on; seq_len defaults to that
    checkpoint's, so each window is one sequence with BOS first (the recipe checks both).
    """

    data: str
    split: str | None = None
    checkpoint: str | None = None  # data: task
    path: str | None = None  # data: text
    dataset: str | None = None  # data: hub
    config: str | None = None  # data: hub
    text_column: str | None = None  # data: hub; default "text"
    max_documents: Count | None = None
    seq_len: Annotated[Count, Field(ge=2)] = 2048
    batch_size: Count = 8
    max_windows: Count | None = None
    name: str | None = None
    _task: TaskSource | None = PrivateAttr(default=None)  # data: task, set by the Recipe

    _name = field_validator("name")(_check_name)

    @model_validator(mode="before")
    @classmethod
    def _source_convention(cls, data: Any) -> Any:
        """Fill split, max_documents and max_windows from a registered source's convention."""
        if isinstance(data, dict) and data.get("data") == TASK_DATA:
            return {"split": TASK_SPLITS[0], **data}
        if not isinstance(data, dict) or data.get("data") not in TEXT_SOURCES:
            return data
        source = TEXT_SOURCES.get(data["data"])
        convention = {
            "split": default_split(source.name),
            "max_documents": source.documents,
            "max_windows": source.windows,
        }
        return {**{k: v for k, v in convention.items() if v is not None}, **data}

    @field_validator("data")
    @classmethod
    def _known_data(cls, data: str) -> str:
        if data in EXTERNAL_DATA:
            return data
        try:
            TEXT_SOURCES.get(data)
        except KeyError as error:
            raise ValueError(
                f"{error.args[0]}; or `text` (with path:), `hub` (with dataset:, split:) or "
                "`task` (with checkpoint:)"
            ) from None
        return data

    @model_validator(mode="after")
    def _fields_fit_the_data(self) -> PerplexitySpec:
        given = {f for f in _SOURCE_FIELDS if getattr(self, f) is not None}
        allowed = {
            "text": {"path"},
            "hub": {"split", "dataset", "config", "text_column"},
            TASK_DATA: {"split", "checkpoint"},
        }
        extra = sorted(given - allowed.get(self.data, {"split"}))
        if extra:
            raise ValueError(f"{extra[0]}: does not apply to data: {self.data}")
        if self.data == TASK_DATA and self.split not in TASK_SPLITS:
            raise ValueError(f"split '{self.split}': a task's splits are {', '.join(TASK_SPLITS)}")
        if self.data == TASK_DATA and self.max_documents is not None:
            raise ValueError("max_documents: does not apply to data: task (use max_windows)")
        if self.data not in EXTERNAL_DATA:
            if self.split is None:
                splits = ", ".join(TEXT_SOURCES.get(self.data).splits)
                raise ValueError(f"split: required with data: {self.data} (one of {splits})")
            check_split(self.data, self.split)
            return self
        missing = sorted(EXTERNAL_DATA[self.data] - given)
        if missing:
            field = missing[0]
            raise ValueError(f"{field}: required with data: {self.data} ({_NEEDS[field]})")
        return self

    @property
    def column(self) -> str:
        """The key under metrics.perplexity and the leaderboard column."""
        return self.name or self.data

    @property
    def source_field(self) -> str:
        """The field naming where the text comes from (for error messages)."""
        return {"text": "path", "hub": "dataset"}.get(self.data, "data")

    def identity(self) -> dict[str, Any]:
        """The fields that determine the numbers; path, dataset, config, text_column and
        max_documents only where set, so the keys of specs without them stay as they were."""
        return self.model_dump(exclude={f for f in _NEW_FIELDS if getattr(self, f) is None})

    def text(self) -> str:
        """The text to score (read once per process; the plan fingerprints it)."""
        if self.data == "text":
            return path_text(self.path, self.max_documents)
        if self.data == "hub":
            column = self.text_column or "text"
            return hub_text(self.dataset, self.config, self.split, column, self.max_documents)
        if self.data == TASK_DATA:
            return self.task_source.text(self.split)
        return source_text(self.data, self.split, self.max_documents)

    @property
    def task_source(self) -> TaskSource:
        """The task of `data: task` (resolved from its checkpoint when the recipe loads)."""
        if self._task is None:
            raise QBenchError(
                f"data: task, checkpoint: {self.checkpoint}: task data is a recipe checkpoint's "
                "task; score it through a recipe (qbench run), which resolves the checkpoint"
            )
        return self._task

    def query_types(self, ids: Any) -> dict[str, Any] | None:
        """The task's query-type masks of token windows `ids` [n, seq_len] (data: task), for
        the diagnostics' first-token mass per type; None for other data."""
        return self.task_source.task().query_types(ids) if self.data == TASK_DATA else None

    def describe(self) -> str:
        """Where the text comes from and how its documents are joined."""
        first = f"the first {self.max_documents} documents" if self.max_documents else "documents"
        if self.data == "text":
            kind = "a folder: each *.txt below it, sorted, one document"
            if not resolve_path(self.path).is_dir():
                kind = "a file: one document"
            return f"`{self.path}` ({kind}); {first} joined with a blank line"
        if self.data == TASK_DATA:
            return f"checkpoint {self.checkpoint}'s task: {self.task_source.describe(self.split)}"
        if self.data == "hub":
            config = f", config {self.config}" if self.config else ""
            return (
                f"hub dataset {self.dataset}{config}, split {self.split}, column "
                f"{self.text_column or 'text'}; {first} joined with a blank line"
            )
        source = TEXT_SOURCES.get(self.data)
        joined = "a single space" if source.separator == " " else "a blank line"
        origin = source.describe(self.split)
        return f"{self.data} {self.split} split ({origin}); {first} joined with {joined}"


TASK_DATA = "task"
# data: -> required fields
EXTERNAL_DATA = {"text": {"path"}, "hub": {"dataset", "split"}, TASK_DATA: {"checkpoint"}}
_SOURCE_FIELDS = ("split", "checkpoint", "path", "dataset", "config", "text_column")
_NEW_FIELDS = ("checkpoint", "path", "dataset", "config", "text_column", "max_documents")
_NEEDS = {
    "path": "a UTF-8 file, or a folder of .txt files",
    "dataset": "a Hugging Face dataset id, e.g. allenai/c4",
    "split": "the split's name, e.g. validation",
    "checkpoint": "the name of a checkpoint (or group) trained with train.task",
}


def _diagnostics_switch(value: Any) -> Any:
    """`diagnostics: true` means the default settings; false means none."""
    if isinstance(value, bool):
        return {} if value else None
    return value


class TaskSpec(StrictModel):
    """One downstream task run through lm-eval; limit / num_fewshot override task_options."""

    name: str
    limit: Count | None = None
    num_fewshot: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        from qbench.eval.tasks import check_task_name  # lm-eval's index only when needed

        if not TASK_NAME_PATTERN.fullmatch(name):  # lm-eval's names: these and parentheses
            raise ValueError(f"{name!r} is not a task name (letters, digits, '._()-')")
        return check_task_name(name)


def _task_from_name(value: Any) -> Any:
    """`piqa` is short for `{name: piqa}`."""
    return {"name": value} if isinstance(value, str) else value


class TaskOptions(StrictModel):
    """How lm-eval runs every task: batch size, documents per task, few-shot, stderr."""

    batch_size: Count = 16
    limit: Count | None = None  # first N documents of each task; None: all
    num_fewshot: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    bootstrap_iters: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1000  # 0: no stderr
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


class GateSpec(StrictModel):
    """Regression thresholds: minimum recovery per metric (e.g. perplexity.wikitext2: 0.95)."""

    cadence: str = "smoke"
    min_recovery: dict[str, float] = Field(default_factory=dict)
    quantizers: dict[str, dict[str, float]] = Field(default_factory=dict)
    reference: str | None = None
    tolerance: float = Field(default=0.05, gt=0)

    _cadence = field_validator("cadence")(_check_name)

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


class ReportSpec(StrictModel):
    """How the leaderboard draws its intervals, and which group every group is compared with
    (`baseline`: a checkpoint group's name, or a checkpoint's outside any group)."""

    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    baseline: str | None = None


class Recipe(StrictModel):
    """Checkpoints x quantizers, evaluated as `eval` says."""

    name: str
    seed: Seed = 0
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    quantizers: list[QuantizerConfig] = Field(default_factory=list)
    eval: EvalSpec
    gate: GateSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    _name = field_validator("name")(_check_name)

    @model_validator(mode="before")
    @classmethod
    def _task_windows(cls, data: Any) -> Any:
        """`data: task` windows default to its checkpoint's sequence length, and so do the
        diagnostics' windows when they probe it (checked after validation)."""
        return _task_window_defaults(data)

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
        for i, name in enumerate(names):
            try:
                _check_name(name)
            except ValueError as error:
                raise ValueError(f"quantizers[{i}].name: {error}") from None
        if "fp" in names:
            raise ValueError("quantizers: name 'fp' is reserved for the unquantized reference")
        _reject_duplicates(names, "quantizers", "rename one")
        if self.gate is not None:
            self._check_gate(names)
        return self

    @model_validator(mode="after")
    def _known_baseline(self) -> Recipe:
        baseline = self.report.baseline
        groups = list(dict.fromkeys(c.group or c.name for c in self.checkpoints))
        if baseline is not None and baseline not in groups:
            raise ValueError(
                f"report.baseline: no checkpoint group '{baseline}'"
                f"{did_you_mean(baseline, groups)}; groups: {', '.join(groups)}"
            )
        return self

    @model_validator(mode="after")
    def _task_data(self) -> Recipe:
        """Resolve each `data: task` to its checkpoint's task; every checkpoint must be trained
        on that task and corpus (its tokenizer reads the task's symbols), each window must be
        one sequence, and so must the diagnostics' when they probe it."""
        for i, spec in enumerate(self.eval.perplexity):
            if spec.data != TASK_DATA:
                continue
            where = f"eval.perplexity[{i}]"
            source = _named_task(self.checkpoints, spec.checkpoint, f"{where}.checkpoint")
            for j, checkpoint in enumerate(self.checkpoints):
                train = checkpoint.train
                if train is None or (train.task, train.corpus) != (source.spec, source.corpus):
                    raise ValueError(
                        f"checkpoints[{j}] '{checkpoint.name}': {where} scores the task data of "
                        f"'{spec.checkpoint}' ({source.spec.describe()} over {source.corpus}), "
                        "which only a checkpoint trained on that task and corpus reads; train it "
                        "so, or score other data"
                    )
            if spec.seq_len != source.seq_len:
                raise ValueError(
                    f"{where}.seq_len: {spec.seq_len}, but the task's sequences are "
                    f"{source.seq_len} tokens (checkpoint '{spec.checkpoint}''s preset): leave it "
                    f"out or give {source.seq_len}, so each window is one sequence with BOS first"
                )
            spec._task = source
        probed = self.eval.perplexity[0]
        diagnostics = self.eval.diagnostics
        if probed.data == TASK_DATA and diagnostics and diagnostics.seq_len != probed.seq_len:
            raise ValueError(
                f"eval.diagnostics.seq_len: {diagnostics.seq_len}, but they probe the task data "
                f"of eval.perplexity[0], whose sequences are {probed.seq_len} tokens: leave it out "
                f"or give {probed.seq_len}, so the first token of each window is BOS"
            )
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


def _named_task(checkpoints: list[CheckpointSpec], name: str, where: str) -> TaskSource:
    """The task of checkpoint (or group) `name`, as perplexity data."""
    named = [c for c in checkpoints if name in (c.name, c.group)]
    if not named:
        known = list(dict.fromkeys(n for c in checkpoints for n in (c.group, c.name) if n))
        raise ValueError(f"{where}: no checkpoint or group '{name}'{did_you_mean(name, known)}")
    source = named[0].train.task_source() if named[0].train is not None else None
    if source is None:
        raise ValueError(f"{where}: '{name}' is not trained on a task; give it train.task")
    return source


def _task_window_defaults(data: Any) -> Any:
    """The recipe's raw mapping with `seq_len` filled in for `data: task` entries (the named
    checkpoint's preset's) and for eval.diagnostics when it probes such an entry; malformed
    input is left as it is, for validation to report."""
    evaluation = data.get("eval") if isinstance(data, dict) else None
    entries = evaluation.get("perplexity") if isinstance(evaluation, dict) else None
    if not isinstance(entries, list) or not isinstance(data.get("checkpoints"), list):
        return data
    lengths = {}
    for checkpoint in data["checkpoints"]:
        train = checkpoint.get("train") if isinstance(checkpoint, dict) else None
        preset = train.get("preset", "tiny") if isinstance(train, dict) else None
        if isinstance(preset, str) and preset in PRESETS:
            for key in ("name", "group"):
                lengths.setdefault(checkpoint.get(key), PRESETS.get(preset).seq_len)
    filled = [
        {"seq_len": lengths[e.get("checkpoint")], **e}
        if isinstance(e, dict) and e.get("data") == TASK_DATA and e.get("checkpoint") in lengths
        else e
        for e in entries
    ]
    diagnostics = evaluation.get("diagnostics")
    diagnostics = {} if diagnostics is True else diagnostics
    first = filled[0] if filled else None
    probes_task = isinstance(first, dict) and first.get("data") == TASK_DATA
    if isinstance(diagnostics, dict) and probes_task and "seq_len" in first:
        diagnostics = {"seq_len": first["seq_len"], **diagnostics}
    update = {"perplexity": filled}
    if "diagnostics" in evaluation:
        update["diagnostics"] = diagnostics
    return {**data, "eval": {**evaluation, **update}}


def _reject_duplicates(names: list[str], what: str, fix: str) -> None:
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        raise ValueError(f"{what}: duplicate name(s) {sorted(seen)}: {fix}")


_LIBYAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where built
_MERGE = "tag:yaml.org,2002:merge"


class _RecipeLoader(_LIBYAML):
    """yaml's safe loader that rejects a key given twice in one mapping (explicit keys; a
    `<<: *anchor` merge may be overridden by them), in linear time."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping used as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                ) from None
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass
class _Open:
    """A collection being streamed: its anchor, the node count at its start, its kind."""

    anchor: str | None
    start: int
    mapping: bool
    items: int = 0


def _check_bounds(text: str) -> str | None:
    """The first limit the YAML exceeds (a one-line problem with its line), or None.

    Streams the parser's events (no tree is built, no recursion), so the check is linear in
    the text and stops at the first excess: an alias counts as the nodes of its anchor, which
    is what constructing it would expand to.
    """
    sizes: dict[str, int] = {}
    stack: list[_Open] = []
    nodes = aliases = merges = 0
    for event in yaml.parse(text, Loader=_LIBYAML):
        if not isinstance(event, yaml.NodeEvent | yaml.CollectionEndEvent):
            continue
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionEndEvent):
            closed = stack.pop()
            if closed.anchor is not None:
                sizes[closed.anchor] = nodes - closed.start
            continue
        parent = stack[-1] if stack else None
        is_key = parent is not None and parent.mapping and parent.items % 2 == 0
        if parent is not None:
            parent.items += 1
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            nodes += sizes.get(event.anchor, 1)
        else:
            nodes += 1
        if isinstance(event, yaml.ScalarEvent):
            merges += is_key and event.value == "<<" and event.implicit[0]
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            stack.append(_Open(event.anchor, nodes - 1, isinstance(event, yaml.MappingStartEvent)))
        for count, limit, what in (
            (len(stack), MAX_DEPTH, "nesting depth"),
            (nodes, MAX_NODES, "number of nodes (aliases and merges expanded)"),
            (aliases, MAX_ALIASES, "number of aliases"),
            (merges, MAX_MERGE_KEYS, "number of merge keys (<<)"),
        ):
            if count > limit:
                return f"line {line}: the {what} exceeds {limit}; a recipe needs far fewer"
    return None


def _read_recipe(path: Path) -> str:
    """The recipe file's text: a regular UTF-8 file of at most MAX_RECIPE_BYTES."""
    try:
        if path.is_dir():
            raise RecipeError(f"{path}: a directory, not a recipe file")
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
            raise RecipeError(f"{path}: not a regular file; give a recipe (.yaml) file")
        with path.open("rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    try:
        return utf8_text(data)
    except ValueError as error:
        raise RecipeError(f"{path}: {error}; save the recipe as UTF-8") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as one line: 'line L, column C: context: problem'."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f"{error.context}: " if error.context else ""
    return f"{where}{context}{error.problem}"


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the file and field."""
    path = Path(path)
    text = _read_recipe(path)
    try:
        problem = _check_bounds(text)
        if problem is not None:
            raise RecipeError(f"{path}: {problem}")
        data = yaml.load(text, Loader=_RecipeLoader)  # a safe loader
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name:, checkpoints:, eval:")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        problems = (_describe(e, data) for e in error.errors())
        raise RecipeError("\n".join(f"{path}: {p}" for p in problems)) from None


def field_path(loc: tuple[Any, ...]) -> str:
    """('quantizers', 2, 'rounding', 'gptq', 'damp') -> 'quantizers[2].rounding.damp' (the
    step names pydantic inserts for the tagged unions dropped)."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _union_tag(loc, i):
            text += f".{part}" if text else str(part)
    return text


def _union_tag(loc: tuple[Any, ...], i: int) -> bool:
    previous = loc[i - 1] if i else None
    if previous == "rounding":
        return loc[i] in ROUNDINGS
    return (
        isinstance(previous, int) and i > 1 and loc[i - 2] == "transforms" and loc[i] in TRANSFORMS
    )


def _shorthand(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """A quantizer written with `method:` names its fields where the user wrote them:
    ('quantizers', 0, 'rounding', 'bitsandbytes', 'threshold') -> ('quantizers', 0,
    'threshold')."""
    if len(loc) < 3 or loc[0] != "quantizers" or not isinstance(loc[1], int):
        return loc
    entries = data.get("quantizers") if isinstance(data, dict) else None
    entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
    if not isinstance(entry, dict) or "method" not in entry:
        return loc
    if loc[2] == "rounding":
        return loc[:2] + loc[4:]
    if loc[2] == "transforms":
        return loc[:2] + loc[5:]
    return loc


def _describe(error: dict[str, Any], data: Any = None) -> str:
    where = field_path(_shorthand(error["loc"], data))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] == "union_tag_not_found":  # a step without its name field
        key = error["ctx"]["discriminator"].strip("'")
        names = ", ".join(TRANSFORMS if key == "transform" else ROUNDINGS)
        message = f"give the step's name as {key}: (one of {names})"
    return f"{where}: {message}" if where else message  # top-level messages name their field
