"""Downstream tasks through lm-evaluation-harness, in process, on the cell's own model.

The cell's model (already quantized, already on its device) is wrapped in lm-eval's HFLM,
so no weights are reloaded or copied, and lm-eval's evaluator runs each task on it.

Task names resolve in this order:

1. `embedded_mc`: qbench's embedded task (no files, no network), see task_data.py.
2. A name with a local definition in task_defs/ (piqa, arc_easy, arc_challenge, winogrande,
   boolq, lambada_openai, hellaswag) whose release files are in the data folder
   ($QBENCH_DATA_DIR, else ../shared/data): that definition, which has lm-eval's own
   prompts, choices and metrics and reads the local files.
3. Any other lm-eval task name, or a local name whose files are missing while the hub can be
   reached: lm-eval's own definition, dataset from the hub. Offline (HF_HUB_OFFLINE or
   HF_DATASETS_OFFLINE set) a local name without its files is an error naming the files.

A request cache (lm-eval's CachingLM storing JSON, one sqlite file per cell; see
request_cache.py) makes an interrupted task run resume without recomputing the requests it
finished.

Batches: lm-eval pads the shorter requests of a batch on the right and calls the model
without an attention mask. A causal model's real tokens never see that padding, unless a
dynamic quantization scale spans several tokens of a sequence
(`QuantizerConfig.tokens_share_scales`): such a cell runs its tasks one request per call
(batch size 1, no padding), and each task's details say so (`batch_size`, `batch_size_reason`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from qbench.data.sources import data_dir
from qbench.environment import cache_dir, offline
from qbench.errors import QBenchError, warn
from qbench.eval.task_data import LOCAL_FILES, embedded_mc_docs, local_paths, missing_files
from qbench.files import read_text_nofollow, write_json_atomic, write_text_atomic
from qbench.registry import did_you_mean

TASK_DEFS = Path(__file__).resolve().parent / "task_defs"
EMBEDDED_TASKS = ("embedded_mc",)

# The metric lm-eval's published tables (and the quantization papers that quote them) use:
# length-normalized accuracy where choices differ in length, else accuracy.
HEADLINE_METRIC = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "embedded_mc": "acc_norm",
}

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
def _lm_eval_manager() -> Any:
    """lm-eval's full task index (all its YAMLs: ~10 s to build, so built once, lazily)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def _local_manager() -> Any:
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
    names = sorted(_lm_eval_manager().all_tasks)
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


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class TaskRun:
    """One task's outcome on one model."""

    name: str
    source: Source
    metric: str | None  # the headline metric, e.g. "acc_norm"
    value: float | None
    stderr: float | None
    higher_is_better: bool
    metrics: dict[str, float | None]  # every metric lm-eval reported (filter "none")
    samples: int  # documents evaluated
    total_samples: int  # documents in the split
    requests: int  # lm-eval requests (one per choice for multiple choice)
    cached_requests: int  # of them answered from the request cache
    limit: int | None
    num_fewshot: int
    eval_s: float
    batch_size: int  # requests per model call (lm-eval's batch size)
    batch_size_reason: str | None  # why it is not task_options.batch_size
    # The headline metric of each document, in doc_id order, where the task's value is their
    # mean (what a paired bootstrap resamples); None for other metrics (e.g. perplexity).
    doc_scores: list[float] | None = None
    # The accuracy of a uniform guess (mean over documents of 1 / choices) of a multiple-choice
    # task scored by acc / acc_norm; None for other tasks.
    chance: float | None = None

    def computed(self, count: int) -> TaskRun:
        """This run, saying that `count` of its requests reached the model."""
        return replace(self, cached_requests=max(0, self.requests - count))

    def headline(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "stderr": self.stderr,
                "higher_is_better": self.higher_is_better}  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def headline_metric(name: str, metrics: dict[str, Any]) -> str | None:
    """acc_norm where lm-eval's published tables use it, else acc, else the first metric."""
    for candidate in (HEADLINE_METRIC.get(name), "acc"):
        if candidate in metrics:
            return candidate
    return next(iter(metrics), None)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _parse(name: str, output: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, Any]]:
    """lm-eval's {"acc,none": .., "acc_stderr,none": ..} -> ({acc: ..}, {acc: stderr})."""
    entry = output["results"].get(name, {})
    metrics, stderrs = {}, {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if filter_name != "none" or metric == "alias":
            continue
        if metric.endswith("_stderr"):
            stderrs[metric.removesuffix("_stderr")] = _number(value)
        else:
            metrics[metric] = _number(value)
    return metrics, stderrs


@contextlib.contextmanager
def _lm_eval_quiet(progress: bool) -> Iterator[None]:
    """lm-eval at ERROR level (it warns per request on truncation), bars only with progress;
    qbench's own warnings written meanwhile still reach stderr."""
    saved = {"DISABLE_MULTIPROC": os.environ.get("DISABLE_MULTIPROC")}
    os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap in process: no fork of a model process
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if not progress:  # lm-eval's bars and prints ignore TQDM_DISABLE set this late
                stack.enter_context(contextlib.redirect_stderr(sink))
                stack.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        for line in sink.getvalue().splitlines():
            if line.startswith("qbench: warning:"):
                print(line, file=sys.stderr, flush=True)
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def request_cache_path(work_dir: Path, key: str) -> Path:
    """The cell's request cache (lm-eval appends `_rank0.db`)."""
    return work_dir / "cache" / f"lm-eval-{key[:32]}"


def request_cache_files(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(f"{prefix.name}_rank*.db"))


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[Any],
    options: Any,
    cache: Path | None = None,
    samples_dir: Path | None = None,
    progress: bool = True,
    one_request_per_call: str | None = None,
    cell_key: str = "",
) -> list[TaskRun]:
    """Run each task of `tasks` (recipe TaskSpecs) under `options` (TaskOptions) on `model`.

    lm-eval's `evaluator.evaluate` runs each task with the seeds and few-shot settings that
    `simple_evaluate` would give it (simple_evaluate itself also collects environment info
    through `pip freeze`, two seconds per call here). `cache` is the prefix of the cell's
    sqlite request cache (JSON values bound to `cell_key`, the cell's key; None: no cache);
    `samples_dir` receives one <task>.jsonl of lm-eval's per-document records when
    options.log_samples is on. Answers read from the cache get a warning line.
    `one_request_per_call`: the reason to run at batch size 1 instead of options.batch_size
    (a quantizer's `tokens_share_scales()`), recorded in each TaskRun.
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from qbench.checkpoints.dispatch import input_device
    from qbench.eval.request_cache import JsonCachingLM

    runs = []
    batch = (
        (1, f"{one_request_per_call}: no padding may enter it")
        if one_request_per_call
        else (options.batch_size, None)
    )
    with _lm_eval_quiet(progress):
        hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch[0])
        hflm._device = input_device(model)  # HFLM takes model.device: meta if dispatched/offloaded
        computed = _count_computed(hflm)
        lm = JsonCachingLM(hflm, f"{cache}_rank0.db", cell_key) if cache is not None else hflm
        try:
            for spec in tasks:
                resolved = resolve_task(spec.name)
                limit, fewshot = effective_options(spec, options)
                loaded = _load(spec.name, resolved, fewshot)
                start, computed_before = time.perf_counter(), computed[0]
                output = evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=limit,
                    bootstrap_iters=options.bootstrap_iters,
                    log_samples=True,  # per-document scores; files only with options.log_samples
                )
                elapsed = time.perf_counter() - start
                run = _task_run(spec.name, resolved, loaded, output, limit, fewshot, elapsed, batch)
                runs.append(run.computed(computed[0] - computed_before))
                if options.log_samples and samples_dir is not None:
                    _write_samples(samples_dir, output)
        finally:
            if isinstance(lm, JsonCachingLM):
                lm.dbdict.close()
    for run in runs:
        if run.cached_requests:
            warn(
                f"task {run.name}: {run.cached_requests} of {run.requests} requests answered "
                f"from the request cache {cache}_rank0.db (an interrupted run of this cell)"
            )
    return runs


def _load(name: str, resolved: ResolvedTask, fewshot: int) -> dict[str, Any]:
    """lm-eval's task objects for `name`, set up as simple_evaluate sets them up."""
    import random

    import numpy
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    manager = _lm_eval_manager() if resolved.source == "lm-eval" else _local_manager()
    try:
        loaded = manager.load([name])
    except Exception as error:  # the dataset could not be read or downloaded
        raise QBenchError(
            f"task '{name}' ({resolved.describe()}) failed to load: {type(error).__name__}: {error}"
        ) from error
    random.seed(DEFAULT_RANDOM_SEED)
    numpy.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") != 0:  # a task that fixes 0 shots keeps it
            task.set_config(key="num_fewshot", value=fewshot)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return loaded


def _count_computed(lm: Any) -> list[int]:
    """Count the requests that reach the model (the request cache answers the others)."""
    count = [0]

    def counted(method: Any) -> Any:
        @functools.wraps(method)
        def call(requests: list[Any], *args: Any, **kwargs: Any) -> Any:
            count[0] += len(requests)
            return method(requests, *args, **kwargs)

        return call

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, counted(getattr(lm, name)))
    return count


def _task_run(
    name: str,
    resolved: ResolvedTask,
    loaded: dict[str, Any],
    output: dict[str, Any],
    limit: int | None,
    fewshot: int,
    elapsed: float,
    batch: tuple[int, str | None],
) -> TaskRun:
    """`batch`: (batch size, the reason it is not task_options.batch_size, or None)."""
    metrics, stderrs = _parse(name, output)
    metric = headline_metric(name, metrics)
    value = metrics.get(metric) if metric else None
    better = output.get("higher_is_better", {}).get(name, {})
    counts = [output.get("n-samples", {}).get(t, {}) for t in loaded["tasks"]]
    return TaskRun(
        name=name,
        source=resolved.source,
        metric=metric,
        value=value,
        stderr=stderrs.get(metric) if metric else None,
        higher_is_better=bool(better.get(metric, True)) if metric else True,
        metrics={**metrics, **{f"{k}_stderr": v for k, v in stderrs.items()}},
        samples=sum(c.get("effective", 0) for c in counts),
        total_samples=sum(c.get("original", 0) for c in counts),
        requests=sum(len(t.instances) for t in loaded["tasks"].values()),
        cached_requests=0,
        limit=limit,
        num_fewshot=fewshot,
        eval_s=elapsed,
        batch_size=batch[0],
        batch_size_reason=batch[1],
        doc_scores=document_scores(output.get("samples", {}).get(name), metric, value),
        chance=chance_level(output, name) if metric in ("acc", "acc_norm") else None,
    )


def chance_level(output: dict[str, Any], name: str) -> float | None:
    """The expected accuracy of guessing uniformly among a multiple-choice task's choices:
    mean over the evaluated documents of 1 / (number of choices, one request each); None for
    a task of another output type."""
    config = output.get("configs", {}).get(name, {})
    samples = output.get("samples", {}).get(name)
    if config.get("output_type") != "multiple_choice" or not samples:
        return None
    return math.fsum(1 / len(sample["arguments"]) for sample in samples) / len(samples)


def document_scores(
    samples: list[dict[str, Any]] | None, metric: str | None, value: float | None
) -> list[float] | None:
    """Each document's `metric` from lm-eval's per-sample records, in doc_id order, when
    their mean is the task's `value` (acc, acc_norm, exact_match ...); else None."""
    if not samples or metric is None or value is None:
        return None
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    scores = [_number(sample.get(metric)) for sample in ordered]
    if any(score is None for score in scores) or not math.isclose(
        math.fsum(scores) / len(scores), value, rel_tol=1e-9, abs_tol=1e-12
    ):
        return None
    return [int(score) if score.is_integer() else score for score in scores]


def _write_samples(folder: Path, output: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    for task, samples in output.get("samples", {}).items():
        lines = (json.dumps(s, default=handle_non_serializable) for s in samples)
        write_text_atomic(folder / f"{task}.jsonl", "".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------- a cell's task section


def zero_shot_average(
    headlines: dict[str, dict[str, Any] | None], tasks: list[str]
) -> float | None:
    """Mean headline value over `tasks` (higher-is-better ones); None if any is missing."""
    values = []
    for name in tasks:
        entry = headlines.get(name)
        if entry is None or entry.get("value") is None:
            return None
        if entry.get("higher_is_better", True):
            values.append(entry["value"])
    return sum(values) / len(values) if values else None


def default_work_dir(recipe_name: str) -> Path:
    return cache_dir() / "lm-eval" / recipe_name


def evaluate_cell_tasks(
    model: Any,
    tokenizer: Any,
    eval_spec: Any,
    key: str,
    stem: str,
    work_dir: Path,
    progress: bool = True,
    one_request_per_call: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The `metrics` and `details` entries of a cell's result for the recipe's tasks.

    metrics: {"tasks": {name: {metric, value, stderr, higher_is_better}},
              "zero_shot_average": mean headline value}; details: {"tasks": {name: TaskRun}}.
    Requests are cached under work_dir/cache/ by the cell's key, samples (if logged) go to
    work_dir/samples/<stem>/.
    """
    runs = evaluate_tasks(
        model,
        tokenizer,
        eval_spec.tasks,
        eval_spec.task_options,
        cache=request_cache_path(work_dir, key),
        cell_key=key,
        samples_dir=work_dir / "samples" / stem,
        progress=progress,
        one_request_per_call=one_request_per_call,
    )
    headlines = {run.name: run.headline() for run in runs}
    return {
        "metrics": {
            "tasks": headlines,
            "zero_shot_average": zero_shot_average(headlines, [r.name for r in runs]),
        },
        "details": {"tasks": {run.name: run.as_dict() for run in runs}},
    }


def discard_request_cache(work_dir: Path, key: str) -> None:
    """Delete a cell's request cache once its result is written."""
    for path in request_cache_files(request_cache_path(work_dir, key)):
        path.unlink(missing_ok=True)
