"""Downstream tasks through lm-evaluation-harness, in process, on the cell's own model.

The cell's model (already quantized, already on its device) is wrapped in lm-eval's HFLM,
so no weights are reloaded or copied, and lm-eval's evaluator runs each task on it (which
definition: qbench.eval.task_index; what is read of its output: qbench.eval.task_scores).

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
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qbench.environment import cache_dir
from qbench.errors import QBenchError, warn
from qbench.eval.task_index import (
    ResolvedTask,
    effective_options,
    lm_eval_manager,
    local_manager,
    resolve_task,
)
from qbench.eval.task_scores import (
    TaskRun,
    chance_level,
    document_scores,
    headline_metric,
    parse_output,
    zero_shot_average,
)
from qbench.files import write_text_atomic


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

    from qbench.eval.request_cache import JsonCachingLM
    from qbench.quant.walk.onload import input_device

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

    manager = lm_eval_manager() if resolved.source == "lm-eval" else local_manager()
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
    metrics, stderrs = parse_output(name, output)
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


def _write_samples(folder: Path, output: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    for task, samples in output.get("samples", {}).items():
        lines = (json.dumps(s, default=handle_non_serializable) for s in samples)
        write_text_atomic(folder / f"{task}.jsonl", "".join(f"{line}\n" for line in lines))


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
