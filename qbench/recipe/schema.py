"""The recipe's schema: checkpoints x quantizers, evaluated as `eval` says, with the gate's
thresholds, the Ray resources and the report's intervals. Sections live beside what they
configure (qbench.checkpoints.spec, qbench.eval.specs, qbench.quant.quantizer)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from qbench.checkpoints.catalog import PRESETS
from qbench.checkpoints.spec import CheckpointSpec
from qbench.config import Seed, StrictModel, check_name, reject_duplicates
from qbench.data.synthetic import TaskSource
from qbench.eval.specs import TASK_DATA, EvalSpec
from qbench.quant.quantizer import QuantizerConfig
from qbench.registry import did_you_mean


class BootstrapSpec(StrictModel):
    """How intervals are drawn: resamples, the generator's seed, the confidence level."""

    iterations: int = Field(default=1000, ge=100, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)


class GateSpec(StrictModel):
    """Regression thresholds: minimum recovery per metric (e.g. perplexity.wikitext2: 0.95)."""

    cadence: str = "smoke"
    # what must reach the threshold: the recovery's estimate, or its interval's lower bound
    # (a drop must be ruled out) or upper bound (only a drop the data show fails)
    bound: Literal["point", "lower", "upper"] = "point"
    min_recovery: dict[str, float] = Field(default_factory=dict)
    quantizers: dict[str, dict[str, float]] = Field(default_factory=dict)
    reference: str | None = None
    tolerance: float = Field(default=0.05, gt=0)

    _cadence = field_validator("cadence")(check_name)

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
    """How the leaderboard draws its intervals, which group every group is compared with
    (`baseline`: a checkpoint group's name, or a checkpoint's outside any group), and `notes`:
    findings the recipe's author states beside the numbers (markdown, a section "Notes" at the
    end of the leaderboard; at most 20 of at most 2,000 characters each)."""

    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    baseline: str | None = None
    notes: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=list, max_length=20
    )


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

    _name = field_validator("name")(check_name)

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

    def cell_quantizers(self) -> list[tuple[int, QuantizerConfig]]:
        """Every quantizer with its index in `quantizers`, each followed by its breakdown's
        parts (`breakdown: true`): the quantized cells of each checkpoint, in run order."""
        return [
            (i, cell)
            for i, quantizer in enumerate(self.quantizers)
            for cell in [quantizer, *(part for _, part in quantizer.breakdown_parts())]
        ]

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        reject_duplicates([c.name for c in self.checkpoints], "checkpoints", "rename one")
        cells = self.cell_quantizers()
        for i, quantizer in cells:
            try:
                check_name(quantizer.name)
            except ValueError as error:
                raise ValueError(f"quantizers[{i}].name: {error}") from None
        names = [q.name for _, q in cells]
        if "fp" in names:
            raise ValueError("quantizers: name 'fp' is reserved for the unquantized reference")
        reject_duplicates(names, "quantizers", "rename one (a breakdown adds <name>.weights, ...)")
        if self.gate is not None:
            self._check_gate([q.name for q in self.quantizers])
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
        if probed.data == TASK_DATA and diagnostics and diagnostics.windows == "document":
            raise ValueError(
                "eval.diagnostics.windows: document, but they probe the task data of "
                "eval.perplexity[0], whose windows are its sequences, each with BOS first: "
                "leave it out (stream)"
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
