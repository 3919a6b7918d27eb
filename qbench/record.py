"""A cell's result record, and the table of a plan's records that every report reads.

One pydantic model, `Record`, in the spirit of lm-eval's `lm_eval/result_schema.py`: built
here (`Record.ok`, `Record.failed`), written and validated on read by qbench.store, read by
the leaderboard, the gate and the seed and task tables through `ResultsTable`.

A record is one JSON file, `results/<recipe>/runs/<checkpoint>--<quantizer>--<key[:16]>.json`:

    recipe            the recipe's name
    key               the cell's result key (64 hex digits; qbench.plan)
    status            "ok" (metrics, details, stages), "failed" (error) or "refused" (error:
                      the quantizer cannot run on this checkpoint; refused_at "plan", decided
                      from config and skeleton before any model work, or "run", once the
                      model was traced; qbench_code: the digest of the qbench code that
                      refused it, which a "run" refusal stands on)
    checkpoint        {name, spec (the recipe entry), identity (what the key holds of its
                      content: train digest, hub commit or file sha256s; see
                      qbench.checkpoints.load.CheckpointIdentity)}
    quantizer         {name ("fp" for the unquantized cell), config (its recipe entry, or null)}
    stage             "fp" or "quantized"
    precision         e.g. "W4A8", "W4A4KV4"; the checkpoint's dtype for fp cells
    seed              the recipe's seed
    metrics           (ok) perplexity: {column: token perplexity, finite};
                      tasks: {task: {metric, value, stderr, higher_is_better}} (with tasks);
                      zero_shot_average (with tasks); diagnostics: {figure: value} (with
                      eval.diagnostics)
    details           (ok) perplexity: {column: {perplexity, mean_nll, windows,
                      predicted_tokens, text_tokens, window_nll (summed NLL per window),
                      window_tokens, windows_sha}}; tasks: {task: lm-eval run, with
                      doc_scores (the headline metric per document)}; diagnostics: per layer
                      and per linear
    stages            (ok) {"transformed": {perplexity: {column: value}}} for methods with a
                      float transform (smoothing, rotation); {} otherwise
    coverage          (quantized) what the quantizer rounded, counted from the model's modules
                      (qbench.quant.coverage): kinds: {kind: {weights: [rounded, total],
                      activations: [rounded, total]}} in weight elements per target kind
                      (attention, mlp, experts, router, norm, lm_head, other, embeddings);
                      targeted: the kinds it rounds; float: {kind: why it stays in float};
                      null for fp cells
    notes             what a method did beyond its label (e.g. experts no calibration token
                      reached, rounded to nearest; linears without a norm, not smoothed)
    error             (failed) {type, message, traceback (last 40 lines)}
    device, fast_quant, quantize_s   (ok) where it ran, QBENCH_FAST_QUANT, seconds to quantize
    versions          library versions the result depends on
    worker            {host, pid} of the process that computed it
    wall_time_s       seconds, load excluded
    finished_at       ISO 8601, UTC

Metric paths (the gate's metric names) are `perplexity.<column>`, `tasks.<task>` (the task's
headline value), `diagnostics.<figure>` and `zero_shot_average`; a path splits at its first
dot only, so a column named `wiki.v2` is `perplexity.wiki.v2`.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qbench.checkpoints.spec import CheckpointIdentity
from qbench.errors import RefusedError, describe, one_line
from qbench.versions import code_digest, library_versions

if TYPE_CHECKING:
    from qbench.plan import Cell
    from qbench.recipe import Recipe

OK, FAILED, REFUSED, MISSING = "ok", "failed", "refused", "missing"
TRACEBACK_LINES = 40  # the tail of a failed cell's traceback kept in its record
METRIC_GROUPS = ("perplexity", "tasks", "diagnostics")  # metric paths <group>.<name>

Key = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
_IDENTIFYING = ("key", "recipe", "checkpoint", "quantizer")  # must match the record's file
_absent_if_none = Field(default=None, exclude_if=lambda value: value is None)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckpointEntry(_Schema):
    name: str
    spec: dict[str, Any]
    identity: CheckpointIdentity | None = None  # absent in records from before it was stored


class QuantizerEntry(_Schema):
    name: str
    config: dict[str, Any] | None


class TaskScore(_Schema):
    """A task's headline metric (acc_norm or acc as lm-eval's tables show it)."""

    metric: str | None
    value: float | None
    stderr: float | None = None
    higher_is_better: bool = True


class Metrics(_Schema):
    perplexity: dict[str, Finite]
    tasks: dict[str, TaskScore] | None = _absent_if_none
    zero_shot_average: float | None = _absent_if_none
    diagnostics: dict[str, int | float | list[int] | None] | None = _absent_if_none


class Details(_Schema):
    perplexity: dict[str, dict[str, Any]]  # PerplexityRun.as_dict(): window_nll lists included
    tasks: dict[str, dict[str, Any]] | None = _absent_if_none
    diagnostics: dict[str, Any] | None = _absent_if_none


class ErrorEntry(_Schema):
    type: str
    message: str
    traceback: str


class Worker(_Schema):
    host: str
    pid: int


class Record(_Schema):
    """One cell's result (see the module docstring for every key)."""

    recipe: str
    key: Key
    checkpoint: CheckpointEntry
    quantizer: QuantizerEntry
    stage: Literal["fp", "quantized"]
    precision: str
    seed: int
    status: Literal["ok", "failed", "refused"] = OK  # records before statuses: ok ones
    metrics: Metrics | None = _absent_if_none
    details: Details | None = _absent_if_none
    stages: dict[str, dict[str, dict[str, float]]] | None = _absent_if_none
    coverage: dict[str, Any] | None = None
    notes: list[str] = Field(default_factory=list)
    error: ErrorEntry | None = _absent_if_none
    refused_at: Literal["plan", "run"] | None = _absent_if_none
    qbench_code: str | None = _absent_if_none  # code_digest() of a refusal's qbench
    device: str | None = _absent_if_none
    fast_quant: str | None = _absent_if_none
    quantize_s: float | None = _absent_if_none
    versions: dict[str, str]
    worker: Worker
    wall_time_s: float
    finished_at: str

    @model_validator(mode="after")
    def _sections_match_status(self) -> Record:
        if self.status == OK and (self.metrics is None or self.error is not None):
            raise ValueError("an ok record has metrics and no error")
        if self.status != OK and (self.error is None or self.metrics is not None):
            raise ValueError(f"a {self.status} record has an error and no metrics")
        if (self.status == REFUSED) != (self.refused_at is not None):
            raise ValueError("a refused record (and only one) says where it was refused_at")
        return self

    # ------------------------------------------------------------ building

    @classmethod
    def ok(cls, cell: Cell, recipe: Recipe, wall_time_s: float, **sections: Any) -> Record:
        """A finished cell's record; `sections`: metrics, details, stages, coverage, device,
        fast_quant, quantize_s (validated like a record read from disk)."""
        return cls.model_validate(
            {**_header(cell, recipe), "status": OK, **sections, **_footer(cell, wall_time_s)}
        )

    @classmethod
    def failed(cls, cell: Cell, recipe: Recipe, error: BaseException, wall_time_s: float) -> Record:
        """A failed cell's record: the error's type, message and traceback tail; no metrics.
        A RefusedError raised while the cell ran makes a `refused` record (refused_at run)."""
        if isinstance(error, RefusedError):
            return cls.refused(cell, recipe, str(error), "run", _error_entry(error), wall_time_s)
        entry = _error_entry(error)
        footer = _footer(cell, wall_time_s)
        return cls.model_validate(
            {**_header(cell, recipe), "status": FAILED, "error": entry, **footer}
        )

    @classmethod
    def refused(
        cls,
        cell: Cell,
        recipe: Recipe,
        reason: str,
        at: Literal["plan", "run"] = "plan",
        entry: dict[str, str] | None = None,
        wall_time_s: float = 0.0,
    ) -> Record:
        """A refused cell's record: why the quantizer cannot run here, where it was decided
        (`at`), and the digest of the qbench code that decided it; no metrics."""
        entry = entry or {"type": "RefusedError", "message": reason, "traceback": ""}
        return cls.model_validate(
            {
                **_header(cell, recipe),
                "status": REFUSED,
                "error": entry,
                "refused_at": at,
                "qbench_code": code_digest(),
                **_footer(cell, wall_time_s),
            }
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON layout (sections of the other status absent)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, text: str, cell: Cell) -> Record:
        """The record `text` holds, if it is a valid one of `cell` (its key, recipe, checkpoint
        and quantizer); ValueError saying what is wrong otherwise."""
        if not text.strip():
            raise ValueError("empty")
        try:
            record = cls.model_validate_json(text)
        except ValidationError as error:
            raise ValueError(f"not a valid record: {describe(error)}") from None
        found = (record.key, record.recipe, record.checkpoint.name, record.quantizer.name)
        expected = (cell.key, cell.recipe, cell.checkpoint.name, cell.quantizer_name)
        for field, have, want in zip(_IDENTIFYING, found, expected, strict=True):
            if have != want:
                raise ValueError(f"its {field} is '{have}', not this cell's '{want}'")
        return record

    # ------------------------------------------------------------ reading

    @property
    def finished(self) -> bool:
        return self.status == OK

    @property
    def stands(self) -> bool:
        """Whether a rerun keeps this record: a finished one, or a refusal found while the
        cell ran by the same qbench code (a plan-time refusal is decided again by every plan)."""
        if self.status == REFUSED:
            return self.refused_at == "run" and self.qbench_code == code_digest()
        return self.finished

    def error_line(self) -> str:
        """'Type: first line of the message' of a failed record."""
        error = self.error or ErrorEntry(type="Error", message="", traceback="")
        return one_line(error.type, error.message)

    def metric_entry(self, metric: str) -> float | TaskScore | None:
        """The value at a metric path (a TaskScore for tasks.<name>); None if absent."""
        if self.metrics is None:
            return None
        group, _, name = metric.partition(".")
        if group in METRIC_GROUPS and name:
            entries = getattr(self.metrics, group) or {}
            value = entries.get(name)
        else:
            value = getattr(self.metrics, metric, None) if metric in Metrics.model_fields else None
        return value if isinstance(value, TaskScore | int | float) else None

    def metric(self, metric: str) -> float | None:
        """The number at a metric path (a task's headline value); None if absent."""
        entry = self.metric_entry(metric)
        if isinstance(entry, TaskScore):
            entry = entry.value
        return None if entry is None or isinstance(entry, bool) else float(entry)


def _error_entry(error: BaseException) -> dict[str, str]:
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "\n".join(lines.splitlines()[-TRACEBACK_LINES:]),
    }


def _header(cell: Cell, recipe: Recipe) -> dict[str, Any]:
    return {
        "recipe": recipe.name,
        "key": cell.key,
        "checkpoint": {
            "name": cell.checkpoint.name,
            "spec": cell.checkpoint.model_dump(mode="json"),
            "identity": cell.identity,
        },
        "quantizer": {
            "name": cell.quantizer_name,
            "config": cell.quantizer.model_dump(mode="json") if cell.quantizer else None,
        },
        "stage": cell.stage,
        "precision": cell.precision,
        "seed": recipe.seed,
    }


def _footer(cell: Cell, wall_time_s: float) -> dict[str, Any]:
    from qbench.checkpoints.gguf import gguf_versions

    gguf = gguf_versions() if cell.checkpoint.is_gguf else {}
    return {
        "versions": library_versions()
        | gguf
        | (cell.quantizer.versions() if cell.quantizer else {}),
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "wall_time_s": wall_time_s,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class ResultsTable:
    """The records of a plan's cells: state, fp cell, metric lookup.

    `records` maps a cell's key to its (validated) record; a cell without one is missing.
    """

    def __init__(self, cells: list[Cell], records: Mapping[str, Record]) -> None:
        self.cells = cells
        self._records = {c.key: records[c.key] for c in cells if c.key in records}

    def record(self, cell: Cell) -> Record | None:
        """The cell's record, finished or failed; None if it has none."""
        return self._records.get(cell.key)

    def finished(self, cell: Cell) -> Record | None:
        """The cell's record if it finished (failed ones count as missing in aggregates)."""
        record = self.record(cell)
        return record if record is not None and record.finished else None

    def state(self, cell: Cell) -> str:
        """'ok', 'failed', 'refused' or 'missing'."""
        record = self.record(cell)
        return MISSING if record is None else record.status

    def fp(self, cell: Cell) -> Cell | None:
        """The unquantized cell of `cell`'s checkpoint."""
        return next(
            (
                c
                for c in self.cells
                if c.quantizer is None and c.checkpoint.name == cell.checkpoint.name
            ),
            None,
        )

    def find(self, checkpoint: str, quantizer: str) -> Cell | None:
        """The cell of a checkpoint name and quantizer name ('fp' for unquantized)."""
        return next(
            (
                c
                for c in self.cells
                if c.checkpoint.name == checkpoint and c.quantizer_name == quantizer
            ),
            None,
        )

    def value(self, cell: Cell | None, metric: str) -> float | None:
        """A finished cell's number at a metric path; None if missing, failed or absent."""
        record = self.finished(cell) if cell is not None else None
        return record.metric(metric) if record is not None else None

    def finished_count(self) -> int:
        return sum(self.finished(c) is not None for c in self.cells)

    def failed_cells(self) -> list[Cell]:
        return [c for c in self.cells if self.state(c) == FAILED]

    def refused_cells(self) -> list[Cell]:
        return [c for c in self.cells if self.state(c) == REFUSED]

    def lower_is_better(self, metric: str) -> bool:
        """Perplexity is; a task is as lm-eval's entry says (lambada's perplexity: lower);
        anything else is not."""
        group = metric.partition(".")[0]
        if group == "perplexity":
            return True
        for cell in self.cells:
            record = self.finished(cell)
            entry = record.metric_entry(metric) if record is not None else None
            if isinstance(entry, TaskScore):
                return not entry.higher_is_better
        return False
