"""Evaluate cells on a worker: one load per checkpoint, one record per cell, failures recorded.

A `Worker` keeps the checkpoint it loaded last (a `CheckpointContext`): the model, which each
quantized cell quantizes in place and `Pristine` (qbench.quant.restore) puts back afterwards
(weights read back from a file written once, never a second copy in memory), its tokenizer,
and a store of what the checkpoint's cells share: calibration token ids, the fp model's
SmoothQuant activation absmax, GPTQ's block-0 Hessians (qbench.quant.context's
`StepContext.statistic`). `Worker.execute` never raises for a failing cell: an exception (an OOM
included), a non-finite perplexity or a transform that is not lossless becomes a
`status: failed` record; a quantizer refused at plan time, or once the model is traced (a
RefusedError), a `status: refused` one.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qbench.checkpoints.dispatch import device_label
from qbench.checkpoints.load import Stamps, load_identified
from qbench.environment import cache_dir
from qbench.errors import QBenchError, describe, storage_problem
from qbench.eval.diagnostics import diagnose, diagnostic_walk, layer_sqnr, probe_ids
from qbench.eval.perplexity import Perplexity, perplexity
from qbench.eval.tasks import default_work_dir, evaluate_cell_tasks
from qbench.plan import Cell
from qbench.quant.artifacts import LEARNED_FOLDER, Artifacts
from qbench.quant.formats.fused import fast_quant_mode
from qbench.quant.quantizer import QuantizerConfig
from qbench.quant.walk.inventory import find_blocks
from qbench.quant.walk.meters import measured
from qbench.quant.walk.onload import check_quantizable
from qbench.quant.walk.restore import Pristine
from qbench.recipe import Recipe
from qbench.record import OK, Record
from qbench.store import read_record

# How far a transformed (smoothed, rotated) model's perplexity may move from fp, relative,
# before the cell fails: float transforms are lossless up to rounding in the weights' dtype.
TRANSFORM_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TRANSFORM_TOLERANCE = 2e-2  # bfloat16 / float16


class NonFiniteMetricError(QBenchError):
    """A cell's model produced NaN or infinite perplexity."""


class TransformError(QBenchError):
    """A float transform changed the model's perplexity beyond its tolerance."""


@dataclass
class CheckpointContext:
    """One checkpoint loaded on a worker, the statistics its cells share, and its pristine
    state (written when its first quantized cell starts) to restore the model after each."""

    load_key: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stamps: Stamps | None = None  # a path: checkpoint's files as loaded
    shared: dict[Any, Any] = field(default_factory=dict)
    pristine: Pristine | None = None

    def keep_pristine(self) -> Pristine:
        """The pristine state, written now if this is the first quantized cell."""
        if self.pristine is None:
            folder = cache_dir() / "pristine"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.pristine = Pristine(self.model, folder)
            except Exception as error:
                if not storage_problem(error):
                    raise
                raise QBenchError(
                    f"{folder}: cannot write the pristine weights: {describe(error)}; free "
                    "space there (QBENCH_CACHE_DIR)"
                ) from None
        return self.pristine

    def close(self) -> None:
        if self.pristine is not None:
            self.pristine.close()


class Worker:
    """Runs cells one at a time, keeping the last checkpoint loaded."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.loads = 0  # checkpoint loads so far
        self._context: CheckpointContext | None = None

    def context(self, cell: Cell) -> CheckpointContext:
        """The loaded checkpoint of `cell` (loaded now unless the last cell's was the same)."""
        if self._context is None or self._context.load_key != cell.load_key:
            self.release()
            loaded = load_identified(cell.checkpoint, cell.identity, self.progress)
            self._context = CheckpointContext(cell.load_key, *loaded)
            self.loads += 1
        return self._context

    def release(self) -> None:
        """Drop the loaded checkpoint, what its cells shared and its pristine weights file."""
        if self._context is not None:
            self._context.close()
        self._context = None
        _free_memory()

    def execute(self, cell: Cell, recipe: Recipe, results_root: Path) -> Record:
        """The cell's record: `status: ok` with metrics, or `status: failed` with the error.

        A quantized cell changes the loaded model in place; it is restored afterwards, whether
        the cell finished or failed (a failed restore drops the model: the next cell reloads).
        A `path:` checkpoint whose files changed while the cell ran (weights may be memory
        mapped) fails the cell and is dropped.
        """
        start = time.perf_counter()
        if cell.refusal is not None:
            return Record.refused(cell, recipe, cell.refusal)
        try:
            context = self.context(cell)
            fp = read_record(results_root, cell.fp_cell()) if cell.quantizer else None
            if cell.quantizer:  # what a string device_map offloaded shows only once loaded
                rounding = cell.quantizer.rounding
                check_quantizable(context.model, rounding.method, rounding.library)
            pristine = context.keep_pristine() if cell.quantizer else None
            try:
                record = run_cell(
                    cell,
                    recipe,
                    context.model,
                    context.tokenizer,
                    self.progress,
                    results_root / recipe.name,
                    fp,
                    context.shared,
                )
            finally:
                if pristine is not None:
                    self._restore(pristine)
            if context.stamps is not None:
                context.stamps.check("while the cell ran")
            return record
        except Exception as error:  # recorded; KeyboardInterrupt and SystemExit are not caught
            if self._context is not None and self._context.stamps is not None:
                self._drop_if_changed(self._context.stamps)
            record = Record.failed(cell, recipe, error, time.perf_counter() - start)
        _free_memory()  # the error's traceback held tensors of the cell
        return record

    def _drop_if_changed(self, stamps: Stamps) -> None:
        """Drop the loaded checkpoint when its files changed since it loaded."""
        try:
            stamps.check("")
        except QBenchError:
            self.release()

    def _restore(self, pristine: Pristine) -> None:
        try:
            pristine.restore()
        except Exception:
            self.release()
            raise


def check_finite(scores: dict[str, Perplexity]) -> None:
    bad = {k: s.perplexity for k, s in scores.items() if not math.isfinite(s.perplexity)}
    if bad:
        raise NonFiniteMetricError(f"non-finite perplexity {bad}: the model produced NaN/inf")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cell(
    cell: Cell,
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool = True,
    work_dir: Path | None = None,
    fp: Record | None = None,
    shared: dict[Any, Any] | None = None,
) -> Record:
    """Quantize `model` in place as the cell says, evaluate it, and return its record (the
    caller restores the model afterwards: qbench.quant.walk.restore).

    Raises NonFiniteMetricError when a perplexity is NaN or infinite, TransformError when a
    transformed stage is not lossless against `fp`, the checkpoint's fp record
    (TRANSFORM_TOLERANCE), and QBenchError when a targeted weight stayed in float
    (Worker.execute records each, as any exception, as a failed cell).

    `work_dir` (results/<recipe>) holds lm-eval's request cache and logged samples, and the
    tensors steps learn (`cell_artifacts`); `shared`: the statistics the cells of the loaded
    checkpoint share (qbench.quant.context).
    """
    start = time.perf_counter()
    stages, notes, caveats, coverage = {}, [], [], None
    probe = _probe(recipe, tokenizer)
    query_types = recipe.eval.perplexity[0].query_types(probe) if probe is not None else None
    quantizer = cell.quantizer
    sqnr = layer_sqnr(model, probe, quantizer) if probe is not None and quantizer else None
    walk = diagnostic_walk(model, probe) if probe is not None else None  # the float model's
    transformed_eval_s = 0.0
    label = f"{cell.checkpoint.name} x {cell.quantizer_name}: quantizing"

    def evaluate_transformed(model: PreTrainedModel) -> None:
        """The float model after smoothing / rotation: its perplexity, checked against fp (not
        for ablations alone: the transformed model is the cell's model)."""
        nonlocal transformed_eval_s
        if not quantizer.has_transform or quantizer.rounding.float_only:
            return
        eval_start = time.perf_counter()
        with passes.paused():
            scores = _perplexities(cell, recipe, model, tokenizer, progress, " (transformed)")
        stages["transformed"] = {"perplexity": {k: s.perplexity for k, s in scores.items()}}
        check_transformed(stages["transformed"]["perplexity"], fp, model, quantizer, notes)
        transformed_eval_s = time.perf_counter() - eval_start

    if quantizer is not None:
        with block_passes(model, label, progress) as passes:
            coverage = quantizer.apply(
                model,
                tokenizer,
                seed=recipe.seed,
                shared=shared,
                notes=notes,
                caveats=caveats,
                on_transformed=evaluate_transformed,
                artifacts=cell_artifacts(cell, work_dir) if work_dir is not None else None,
                progress=progress,
            )
    quantize_s = time.perf_counter() - start - transformed_eval_s
    scores = _perplexities(cell, recipe, model, tokenizer, progress)
    check_finite(scores)
    diagnostics = diagnose(model, probe, sqnr, walk, query_types) if probe is not None else None
    tasks = (
        evaluate_cell_tasks(
            model,
            tokenizer,
            recipe.eval,
            cell.key,
            Path(cell.filename).stem,
            work_dir or default_work_dir(recipe.name),
            progress,
            cell.quantizer.tokens_share_scales() if cell.quantizer else None,
        )
        if recipe.eval.tasks
        else {"metrics": {}, "details": {}}
    )
    coverage = measured(coverage, model) if coverage is not None else None  # tokens kept fp
    return Record.ok(
        cell,
        recipe,
        time.perf_counter() - start,
        metrics={
            "perplexity": {name: s.perplexity for name, s in scores.items()},
            **({"diagnostics": diagnostics.summary} if diagnostics else {}),
            **tasks["metrics"],
        },
        details={
            "perplexity": {name: s.as_dict() for name, s in scores.items()},
            **({"diagnostics": diagnostics.details} if diagnostics else {}),
            **tasks["details"],
        },
        stages=stages,
        coverage=coverage,
        notes=notes,
        caveats=caveats,
        device=device_label(model),
        fast_quant=fast_quant_mode(),  # QBENCH_FAST_QUANT: compiled fake-quant (auto: CUDA)
        quantize_s=quantize_s,
    )


def cell_artifacts(cell: Cell, work_dir: Path) -> Artifacts:
    """Where the cell's steps keep what they learn: results/<recipe>/learned, keyed by the
    checkpoint's identity and dtype (and what each step adds)."""
    identity = {"identity": cell.identity.model_dump(), "dtype": cell.checkpoint.dtype}
    return Artifacts(work_dir / LEARNED_FOLDER, identity)


class BlockPasses:
    """A running count of decoder-block forward passes (a tqdm counter), which `paused` stops
    counting (an evaluation inside the quantization is not its progress)."""

    def __init__(self, bar: tqdm | None) -> None:
        self.bar, self.counting = bar, True

    def count(self, *_: Any) -> None:  # a forward hook: returns None, the output stays its own
        if self.bar is not None and self.counting:
            self.bar.update()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


@contextlib.contextmanager
def block_passes(model: PreTrainedModel, desc: str, enabled: bool) -> Iterator[BlockPasses]:
    """Count decoder-block forward passes while a quantizer's steps run, so the long ones show
    progress (SmoothQuant, AWQ, GPTQ and quanto calibrate block by block, AWQ runs each block
    once per grid point); no bar (and no hooks) when not `enabled`."""
    if not enabled:
        yield BlockPasses(None)
        return
    try:
        _, blocks = find_blocks(model)
    except QBenchError:  # no decoder blocks: the step itself refuses or rounds without them
        blocks = []
    passes = BlockPasses(tqdm(desc=desc, unit=" block passes", leave=False, dynamic_ncols=True))
    handles = [block.register_forward_hook(passes.count) for block in blocks]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()
        passes.bar.close()


def check_transformed(
    transformed: dict[str, float],
    fp: Record | None,
    model: PreTrainedModel,
    quantizer: QuantizerConfig,
    notes: list[str],
) -> None:
    """TransformError when a transformed perplexity moved from the fp record's beyond the
    tolerance of the model's dtype (no check without a finished fp record, nor where a
    transform changes the float model by design: a note in `notes` says so)."""
    if not quantizer.lossless:
        lossy = ", ".join(t.transform for t in quantizer.transforms if not t.is_lossless())
        notes.append(f"transformed stage not compared with fp: {lossy} changes the float model")
        return
    if fp is None or fp.status != OK:
        return
    dtype = next(model.parameters()).dtype
    tolerance = TRANSFORM_TOLERANCE.get(dtype, HALF_TRANSFORM_TOLERANCE)
    for column, value in transformed.items():
        reference = fp.metrics.perplexity.get(column)
        if reference and not abs(value / reference - 1) <= tolerance:
            raise TransformError(
                f"the transformed float model's {column} perplexity is {value:.4f}, fp's "
                f"{reference:.4f} (relative {value / reference - 1:+.2e}, allowed {tolerance:g} "
                f"in {dtype}): the transform is not lossless on this model"
            )


def _perplexities(
    cell: Cell,
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool,
    stage: str = "",
) -> dict[str, Perplexity]:
    return {
        spec.column: perplexity(
            model,
            tokenizer,
            spec.text(),
            spec.seq_len,
            spec.batch_size,
            spec.max_windows,
            progress,
            desc=f"{cell.checkpoint.name} x {cell.quantizer_name}{stage}",
        )
        for spec in recipe.eval.perplexity
    }


def _probe(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
    """The outlier diagnostics' token windows (of the first perplexity text), if asked for."""
    spec = recipe.eval.diagnostics
    if spec is None:
        return None
    return probe_ids(tokenizer, recipe.eval.perplexity[0], spec)
