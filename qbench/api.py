"""qbench from Python: quantize a model in a notebook, undo it, evaluate it as a recipe would.

On torchao's pattern (`quantize_(model, config)`): configs are data, one verb changes the
model in place. Everything here runs the very code the runner runs for a recipe's cells.

>>> import qbench
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
>>> model = LlamaForCausalLM(config)
>>> w4a8 = qbench.quantizer(method="rtn", weights={"bits": 4}, activations={"bits": 8})
>>> with qbench.quantized(model, w4a8) as report:   # quantized inside, float again after
...     report["kinds"]["mlp"]["weights"]             # [rounded, total] weight elements
[12288, 12288]
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from qbench.quant.quantizer import QuantizerConfig
    from qbench.record import Metrics


def quantizer(**fields: Any) -> QuantizerConfig:
    """A validated quantizer from a recipe's quantizer fields (`name` optional: it defaults to
    the steps, e.g. 'smoothquant+gptq'). Raises pydantic's ValidationError naming the field.

    >>> import qbench
    >>> qbench.quantizer(method="smoothquant", alpha=0.8, weights={"bits": 8},
    ...                  activations={"bits": 8}).label()
    'smoothquant: int8 channel / int8 token'
    """
    from qbench.quant.quantizer import QuantizerConfig

    return QuantizerConfig.model_validate(fields)


def quantize_(
    model: nn.Module,
    config: QuantizerConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> dict[str, Any]:
    """Quantize `model` in place as `config` says; the coverage report.

    model: any module tree holding linear layers (a transformers decoder, an nn.Sequential);
    tokenizer: needed by steps that calibrate on text (SmoothQuant, AWQ, GPTQ, quanto's
    activations); seed: their calibration windows and the rotation's random signs (a function
    of the seed and the text, never of global RNG state); targets / ignore: module-name
    patterns (`re:<regex>` or globs, compressed-tensors' convention) narrowing the config's
    own. The report: {"kinds": {kind: {"weights": [rounded, total], "activations": [...]}},
    "float": {kind: why}, "targeted": [...], "ignored": {...} when patterns leave targets out}.

    Raises QBenchError before any change where the quantizer cannot run on the model (the
    planner's refusals: a group that does not divide a width, a method the architecture does
    not allow, nothing to quantize), or where qbench already quantized it; and after it where
    a targeted weight stayed in float.

    >>> import qbench, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
    ...                             torch.nn.Linear(64, 8))
    >>> w4 = qbench.quantizer(method="rtn", weights={"bits": 4, "group": 32})
    >>> qbench.quantize_(model, w4, ignore=["2"])["ignored"]
    {'patterns': 'ignore: 2', 'modules': 1, 'other': 512}
    >>> qbench.quantize_(model, w4)
    Traceback (most recent call last):
    qbench.errors.QBenchError: Sequential is already quantized (1 modules, e.g. 0): ...
    """
    from qbench.errors import QBenchError
    from qbench.quant.walk.select import pattern_problem

    for pattern in [*(targets or []), *(ignore or [])]:
        if problem := pattern_problem(pattern):
            raise QBenchError(f"quantize_: {problem}")
    if targets is not None:
        config = config.model_copy(update={"targets": targets})
    if ignore:
        config = config.model_copy(update={"ignore": [*config.ignore, *ignore]})
    return config.apply(model, tokenizer, seed=seed)


@contextlib.contextmanager
def quantized(
    model: nn.Module,
    config: QuantizerConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Within the block, `model` is quantized as `config` says (the coverage report is
    yielded); on exit it is the exact float model again, bit for bit: the runner's restore
    (qbench.quant.walk.restore), its weights kept in a temporary file meanwhile.

    >>> import qbench, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> before = model[0].weight.clone()
    >>> with qbench.quantized(model, qbench.quantizer(method="rtn", weights={"bits": 2})):
    ...     bool((model[0].weight == before).all())
    False
    >>> bool((model[0].weight == before).all()), type(model[0]).__name__
    (True, 'Linear')
    """
    from qbench.quant.walk.restore import Pristine

    with tempfile.TemporaryDirectory(prefix="qbench-pristine-") as folder:
        pristine = Pristine(model, Path(folder))
        try:
            yield config.apply(model, tokenizer, seed=seed)
        finally:
            pristine.restore()
            pristine.close()


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    perplexity: list[dict[str, Any]] | None = None,
    tasks: list[str | dict[str, Any]] | None = None,
    *,
    task_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Metrics:
    """The runner's perplexity and lm-eval tasks on `model`, as a cell's record holds them.

    perplexity: recipe `eval.perplexity` entries ({"data": "wikitext2", "seq_len": 2048},
    {"data": "text", "path": ...}); tasks: recipe `eval.tasks` entries (names or
    {"name": ..., "limit": ...}); task_options: recipe `eval.task_options`. Returns the
    record's typed `Metrics`: perplexity by column, task scores and their zero-shot average.
    Raises pydantic's ValidationError for a bad entry, QBenchError for text it cannot read.

    >>> import qbench
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from qbench.data.bpe import train_tokenizer
    >>> from qbench.data.sources import embedded_rows
    >>> tokenizer = train_tokenizer(embedded_rows("train")[:30], vocab_size=300)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    >>> metrics = qbench.evaluate(model, tokenizer, [{"data": "embedded", "seq_len": 64,
    ...                                               "max_windows": 4}])
    >>> sorted(metrics.perplexity)
    ['embedded']
    """
    from qbench.eval.perplexity import perplexity as perplexity_of
    from qbench.eval.task_scores import zero_shot_average
    from qbench.eval.tasks import evaluate_tasks
    from qbench.recipe import PerplexitySpec, TaskOptions, TaskSpec
    from qbench.record import Metrics

    specs = [PerplexitySpec.model_validate(p) for p in perplexity or []]
    task_specs = [
        TaskSpec.model_validate({"name": t} if isinstance(t, str) else t) for t in tasks or []
    ]
    options = TaskOptions.model_validate(task_options or {})
    scores = {
        spec.column: perplexity_of(
            model, tokenizer, spec.text(), spec.seq_len, spec.batch_size, spec.max_windows,
            progress, desc=spec.column,
        ).perplexity
        for spec in specs
    }  # fmt: skip
    runs = evaluate_tasks(model, tokenizer, task_specs, options, progress=progress)
    headlines = {run.name: run.headline() for run in runs}
    average = zero_shot_average(headlines, [r.name for r in runs]) if runs else None
    return Metrics(perplexity=scores, tasks=headlines or None, zero_shot_average=average)


def load_recipe(path: str | Path) -> Any:
    """The validated recipe at `path` (qbench.recipe.Recipe); RecipeError names file and field."""
    from qbench.recipe import load_recipe as load

    return load(path)
