"""Which definition a task name runs with here, and what its numbers depend on (no lm-eval
import unless its index must be built).

Task names resolve in this order:

1. `embedded_mc`: qbench's embedded task (no files, no network), see task_data.py.
2. A name with a local definition in task_defs/ (piqa, arc_easy, arc_challenge, winogrande,
   boolq, lambada_openai, hellaswag) whose release files are in the data folder
   ($QBENCH_DATA_DIR, else ../shared/data): that definition, which has lm-eval's own
   prompts, choices and metrics and reads the local files.
3. Any other lm-eval task name, or a local name whose files are missing while the hub can be
   reached: lm-eval's own definition, dataset from the hub. Offline (HF_HUB_OFFLINE or
   HF_DATASETS_OFFLINE set) a local name without its files is an error naming the files.

Other names are checked against lm-eval's index, built once (about 10 s) and saved in the
cache folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from qbench.data.sources import data_dir
from qbench.environment import cache_dir, offline
from qbench.errors import QBenchError
from qbench.eval.task_data import LOCAL_FILES, embedded_mc_docs, local_paths, missing_files
from qbench.files import read_text_nofollow, write_json_atomic
from qbench.registry import did_you_mean

TASK_DEFS = Path(__file__).resolve().parent / "task_defs"
EMBEDDED_TASKS = ("embedded_mc",)

Source = Literal["embedded", "local", "lm-eval"]


def local_task_names() -> list[str]:
    """Names that run without the hub (given their release files)."""
    return sorted([*EMBEDDED_TASKS, *LOCAL_FILES])


def lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def lm_eval_manager() -> Any:
    """lm-eval's full task index (all its YAMLs: ~10 s to build, so built once, lazily)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def local_manager() -> Any:
    """qbench's own task definitions only."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DEFS), include_defaults=False)


INDEX_LIMIT = 16 << 20  # bytes of the cached task index


def lm_eval_task_names() -> list[str]:
    """Every task, group and tag name lm-eval's index holds, from
    $QBENCH_CACHE_DIR/lm-eval-tasks-<version>.json when an earlier process saved it (no
    lm-eval import: building the index takes about 10 s), else built and saved."""
    path = cache_dir() / f"lm-eval-tasks-{lm_eval_version()}.json"
    try:
        names = json.loads(read_text_nofollow(path, INDEX_LIMIT))
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    except (OSError, ValueError):  # absent, unreadable or not such a list: rebuild it
        pass
    names = sorted(lm_eval_manager().all_tasks)
    write_json_atomic(path, names)
    return names


def check_task_name(name: str) -> str:
    """`name` if qbench or lm-eval knows it, else a ValueError listing the local tasks."""
    if name in EMBEDDED_TASKS or name in LOCAL_FILES:
        return name
    known = lm_eval_task_names()
    if name in known:
        return name
    hint = did_you_mean(name, [*local_task_names(), *known])
    raise ValueError(
        f"unknown task '{name}'{hint}; local tasks (no hub needed): "
        f"{', '.join(local_task_names())}; lm-eval {lm_eval_version()} knows no task, "
        "group or tag of that name either (`lm-eval ls tasks` lists them)"
    )


@dataclass(frozen=True)
class ResolvedTask:
    """Where a task's definition and documents come from in this environment."""

    name: str
    source: Source
    files: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.source == "embedded":
            return "qbench embedded corpus (test split)"
        if self.source == "local":
            return "lm-eval prompts on local release files " + ", ".join(
                Path(f).name for f in self.files
            )
        return f"lm-eval {lm_eval_version()} task, hub dataset"


def resolve_task(name: str) -> ResolvedTask:
    """Decide, without loading anything big, which definition `name` runs with here."""
    if name in EMBEDDED_TASKS:
        return ResolvedTask(name, "embedded")
    if name in LOCAL_FILES:
        missing = missing_files(name)
        if not missing:
            required, optional = local_paths(name)
            found = [*required, *(p for p in optional if p.is_file())]
            return ResolvedTask(name, "local", tuple(str(p) for p in found))
        if offline():
            note = LOCAL_FILES[name].note
            unset = " (QBENCH_DATA_DIR is unset and no ../shared/data was found)"
            raise QBenchError(
                f"task '{name}' has no data here: looked for "
                f"{', '.join(map(str, missing))}{unset if data_dir() is None else ''}, "
                "and the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); put "
                f"{note or 'the release files'} there, or go online to use lm-eval's dataset"
            )
    return ResolvedTask(name, "lm-eval")


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@functools.cache
def _embedded_digest() -> str:
    blob = json.dumps(embedded_mc_docs(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def effective_options(spec: Any, options: Any) -> tuple[int | None, int]:
    """(limit, num_fewshot) of one recipe task: its own, else the recipe's task_options."""
    limit = spec.limit if spec.limit is not None else options.limit
    fewshot = spec.num_fewshot if spec.num_fewshot is not None else options.num_fewshot
    return limit, fewshot


def task_identity(spec: Any, options: Any) -> dict[str, Any]:
    """What determines a task's numbers here: source, documents, options, lm-eval's version.

    Resolving is the plan-time check: a local task without its files offline raises here.
    """
    resolved = resolve_task(spec.name)
    data: dict[str, str] = {}
    if resolved.source == "local":
        for f in resolved.files:
            stat = os.stat(f)
            data[Path(f).name] = _file_digest(f, stat.st_size, stat.st_mtime_ns)
    elif resolved.source == "embedded":
        data["docs"] = _embedded_digest()
    return {
        "source": resolved.source,
        "data": data,
        "lm_eval": lm_eval_version(),
        **task_options_identity(spec, options),
    }


def task_options_identity(spec: Any, options: Any) -> dict[str, Any]:
    """The part of a task's identity that the recipe gives: name, limit, few-shot, batch size
    (padding can move the last digits), bootstrap iterations."""
    limit, fewshot = effective_options(spec, options)
    return {
        "name": spec.name,
        "limit": limit,
        "num_fewshot": fewshot,
        "batch_size": options.batch_size,
        "bootstrap_iters": options.bootstrap_iters,
    }
