"""What a recipe's `eval:` asks for: perplexity texts, lm-eval tasks and their options, the
outlier diagnostics (no torch)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from qbench.config import Count, StrictModel, check_name, reject_duplicates
from qbench.data.external import hub_documents, path_documents, resolve_path
from qbench.data.sources import (
    TEXT_SOURCES,
    check_split,
    default_split,
    hub_text,
    path_text,
    source_documents,
    source_text,
)
from qbench.data.synthetic import SPLITS as TASK_SPLITS
from qbench.data.synthetic import TaskSource
from qbench.errors import QBenchError

TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._()-]*")


class DiagnosticsSpec(StrictModel):
    """The probe: `samples` windows of `seq_len` tokens of the first perplexity text, cut from
    its stream (`windows: stream`) or each the start of a document (`windows: document`, the
    tokenizer's BOS first where it has one unless `bos: false`)."""

    samples: int = Field(default=4, ge=1)
    seq_len: int = Field(default=128, ge=2)
    windows: Literal["stream", "document"] = "stream"
    bos: bool = True

    def identity(self) -> dict[str, Any]:
        """The fields that determine the figures; windows and bos only where not the default,
        so the keys of recipes written before them stay as they were."""
        new = {"windows": "stream", "bos": True}
        return self.model_dump(exclude={k for k, v in new.items() if getattr(self, k) == v})


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

    _name = field_validator("name")(check_name)

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

    def documents(self) -> list[str]:
        """The documents `text()` joins, each whole (WikiText-2: its articles); a task's
        data has none (its windows are its sequences)."""
        if self.data == TASK_DATA:
            raise QBenchError(
                "data: task has no documents: its windows are its sequences, each with BOS "
                "first; use diagnostics windows: stream"
            )
        if self.data == "text":
            return path_documents(self.path)[: self.max_documents]
        if self.data == "hub":
            column = self.text_column or "text"
            return hub_documents(self.dataset, self.config, self.split, column)[
                : self.max_documents
            ]
        return source_documents(self.data, self.split, self.max_documents)

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
        from qbench.eval.task_index import check_task_name  # lm-eval's index only when needed

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
        reject_duplicates([p.column for p in self.perplexity], "perplexity", "give each a name:")
        reject_duplicates([t.name for t in self.tasks], "tasks", "list each task once")
        return self
