"""Executors compute a sweep's cells: `local` (in this process) and `ray` (one task per cell).

Both hand every result back to the driver (qbench.sweep.Sweep), which holds the cell's
claim while it runs and writes its record, so results land in the same folder with the
same keys whichever executor computed them.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qbench.errors import QBenchError
from qbench.registry import Registry

if TYPE_CHECKING:
    from qbench.record import Record
    from qbench.runner import Worker
    from qbench.store import Claim
    from qbench.sweep import Job, Sweep

# Environment a Ray worker needs to find data, caches and the offline switches (no tokens).
FORWARDED_ENV = (
    "QBENCH_DATA_DIR",
    "QBENCH_CACHE_DIR",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
)


MAX_IN_FLIGHT = 256  # Ray tasks (and held claims, one open file each) at once


class Executor(Protocol):
    def run(self, jobs: list[Job], sweep: Sweep) -> None:
        """Compute `jobs` in order, claiming each through `sweep` and recording its result."""


EXECUTORS: Registry[type[Executor]] = Registry("executor")


def make_executor(name: str, **options: Any) -> Executor:
    """The executor registered as `name`, with its options (ray: address, num_cpus)."""
    try:
        factory = EXECUTORS.get(name)
    except KeyError as error:
        raise QBenchError(f"--executor: {error.args[0]}") from None
    return factory(**options)


@EXECUTORS.register("local")
class LocalExecutor:
    """One cell after another in this process; the worker keeps the current checkpoint."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if address is not None or num_cpus is not None:
            raise QBenchError("--address / --num-cpus apply to --executor ray")

    def run(self, jobs: list[Job], sweep: Sweep) -> None:
        from qbench.runner import Worker  # the model libraries, only when cells run

        worker = Worker(sweep.progress)
        try:
            for job in jobs:
                claim = sweep.claim(job)
                if claim is None:
                    continue
                with claim:
                    sweep.record(job, worker.execute(job.cell, job.recipe, sweep.results_root))
        finally:
            worker.release()


@EXECUTORS.register("ray")
class RayExecutor:
    """One Ray task per cell, reserving the recipe's `resources` (num_gpus, num_cpus).

    Connects to the cluster at `address` (or $RAY_ADDRESS), else starts a local instance
    with `num_cpus` (default: all). Tasks are submitted in checkpoint order, each claimed
    when submitted, with twice as many in flight as the cluster runs at once (at most
    MAX_IN_FLIGHT); a task's worker process keeps its checkpoint loaded for the next task.
    Ray does not retry a task: a crashed worker is a failed cell, which the next sweep retries.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if address is not None and num_cpus is not None:
            raise QBenchError("--num-cpus sizes a local Ray instance; not with --address")
        self.address, self.num_cpus = address, num_cpus

    def run(self, jobs: list[Job], sweep: Sweep) -> None:
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            start = time.perf_counter()
            ray.init(**self._init_options())
            print(f"ray: started in {time.perf_counter() - start:.1f} s", flush=True)
        try:
            cluster = ray.cluster_resources()
            _check_resources(jobs, cluster)
            self._submit_and_collect(ray, jobs, sweep, cluster)
        finally:
            if started:
                ray.shutdown()

    def _init_options(self) -> dict[str, Any]:
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "runtime_env": {"env_vars": env} if env else None,
        }
        if self.address is not None:
            return {**options, "address": self.address}
        return {**options, "num_cpus": self.num_cpus}

    def _submit_and_collect(
        self, ray: Any, jobs: list[Job], sweep: Sweep, cluster: dict[str, float]
    ) -> None:
        # max_calls=0: a worker process runs any number of tasks, so it keeps its checkpoint
        # (Ray's default for functions declared with GPUs is a new process per task).
        task = ray.remote(max_calls=0)(_run_on_ray_worker)
        window = min(MAX_IN_FLIGHT, 2 * _cells_at_once(jobs, cluster))
        cpus, gpus = int(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
        print(f"ray: {len(jobs)} cells on {cpus} CPUs, {gpus} GPUs ({window} in flight)")
        queue = iter(jobs)
        in_flight: dict[Any, tuple[Job, Claim, float]] = {}

        def fill() -> None:
            while len(in_flight) < window:
                job = next(queue, None)
                if job is None:
                    return
                claim = sweep.claim(job)
                if claim is None:
                    continue
                resources = job.recipe.resources
                ref = task.options(
                    num_cpus=resources.cpus_per_cell,
                    num_gpus=resources.gpus_per_cell,
                    max_retries=0,
                    name=job.label,
                ).remote(job.cell, job.recipe, str(sweep.results_root.resolve()), os.getcwd())
                in_flight[ref] = (job, claim, time.perf_counter())

        try:
            fill()
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                job, claim, submitted = in_flight.pop(ref)
                with claim:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as error:  # the worker died, or Ray failed
                        from qbench.record import Record

                        elapsed = time.perf_counter() - submitted
                        result = Record.failed(job.cell, job.recipe, error, elapsed)
                    sweep.record(job, result)
                fill()
        finally:
            for _, claim, _ in in_flight.values():
                claim.release()


def _cells_at_once(jobs: list[Job], cluster: dict[str, float]) -> int:
    """How many cells the cluster runs at once, by the recipe that needs least per cell."""
    counts = [1]
    for resources in {id(job.recipe): job.recipe.resources for job in jobs}.values():
        count = cluster.get("CPU", 0) / resources.cpus_per_cell
        if resources.gpus_per_cell:
            count = min(count, cluster.get("GPU", 0) / resources.gpus_per_cell)
        counts.append(int(count))
    return max(counts)


def _check_resources(jobs: list[Job], cluster: dict[str, float]) -> None:
    """Every recipe's per-cell resources fit the cluster, else one error naming the field."""
    for job in {job.source: job for job in jobs}.values():
        for field, unit in (("gpus_per_cell", "GPU"), ("cpus_per_cell", "CPU")):
            needed, available = getattr(job.recipe.resources, field), cluster.get(unit, 0)
            if needed > available:
                raise QBenchError(
                    f"{job.source}: resources.{field}: {needed:g} per cell, but the Ray "
                    f"cluster has {available:g} {unit}s; lower it or use a larger cluster"
                )


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QBenchError("--executor ray needs Ray: pip install -c constraints.txt ray") from None
    return ray


@functools.cache
def _process_worker() -> Worker:
    """This Ray worker process's Worker: its loaded checkpoint outlives one task."""
    from transformers.utils import logging as transformers_logging

    from qbench.runner import Worker

    transformers_logging.disable_progress_bar()  # no bars in the driver's log
    return Worker(progress=False)


def _run_on_ray_worker(cell: Any, recipe: Any, results_root: str, cwd: str) -> Record:
    """The Ray task: one cell on this process's worker, run from the driver's directory where
    this node has it (relative `path:` checkpoints and data folders)."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
    return _process_worker().execute(cell, recipe, Path(results_root))
