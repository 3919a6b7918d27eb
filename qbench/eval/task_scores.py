"""A task's outcome and the numbers read from lm-eval's output: the headline metric of each
task (the one lm-eval's published tables use), per-document scores, the chance level, and
the average over tasks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from qbench.eval.task_index import Source

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


def parse_output(
    name: str, output: dict[str, Any]
) -> tuple[dict[str, float | None], dict[str, Any]]:
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
