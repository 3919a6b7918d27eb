"""qbench run | sweep | report | gate | train | probe | list."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qbench.errors import QBenchError, describe, storage_problem


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "results", None) is not None:
            _check_results_root(args.results)
        return args.command(args)
    except QBenchError as error:  # a recipe with several problems: one line each
        for line in str(error).splitlines():
            print(f"qbench: error: {line}", file=sys.stderr)
        return 2
    except OSError as error:  # a file qbench could not read or write, not caught nearer
        where = f" ({error.filename})" if error.filename else ""
        if not where and storage_problem(error):
            results = getattr(args, "results", None) or "results"
            where = f" (a disk qbench writes to: --results {results} or QBENCH_CACHE_DIR)"
        print(f"qbench: error: {describe(error)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qbench: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbench", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="evaluate every cell of a recipe, then report")
    run.add_argument("recipes", type=Path, nargs=1, metavar="recipe")
    run.add_argument("--results", type=Path, default=Path("results"), help="results root")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--strict", action="store_true", help=STRICT_HELP)
    run.set_defaults(command=_sweep, executor="local", address=None, num_cpus=None)

    sweep = commands.add_parser("sweep", help="evaluate every cell of recipes, then report")
    sweep.add_argument("recipes", type=Path, nargs="+")
    sweep.add_argument("--executor", default="local", help="local (default) or ray")
    sweep.add_argument("--address", help="ray: an existing cluster (default: a local instance)")
    sweep.add_argument("--num-cpus", type=int, help="ray: CPUs of the local instance")
    sweep.add_argument("--results", type=Path, default=Path("results"), help="results root")
    sweep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sweep.add_argument("--strict", action="store_true", help=STRICT_HELP)
    sweep.set_defaults(command=_sweep)

    report = commands.add_parser("report", help="write results/<recipe>/LEADERBOARD.md")
    report.add_argument("recipe", type=Path)
    report.add_argument("--results", type=Path, default=Path("results"))
    report.set_defaults(command=_report)

    gate = commands.add_parser("gate", help="fail when quantized cells lose too much vs fp")
    gate.add_argument("recipes", type=Path, nargs="+")
    gate.add_argument("--results", type=Path, default=Path("results"))
    gate.add_argument("--cadence", help="gate only recipes whose gate.cadence is this tag")
    gate.add_argument(
        "--write-reference", action="store_true", help="record current values as gate.reference"
    )
    gate.add_argument(
        "--results-only",
        action="store_true",
        help="gate the cells of plan.json without planning the recipe now (the checkpoints and "
        "data are not checked; the output says so)",
    )
    gate.set_defaults(command=_gate)

    train = commands.add_parser("train", help="train (or find cached) a qbench checkpoint")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--variant", default="baseline")
    train.add_argument("--corpus", default="embedded")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int)
    train.add_argument("--task", help="a synthetic task (e.g. bigram-backcopy) over --corpus")
    train.set_defaults(command=_train)

    probe = commands.add_parser("probe", help="outlier diagnostics of one checkpoint")
    probe.add_argument("--path", help="a Hugging Face model directory, or a .gguf file")
    probe.add_argument("--recipe", type=Path, help="a recipe, with --checkpoint NAME")
    probe.add_argument("--checkpoint", help="a checkpoint of --recipe (seeded: name@seed)")
    probe.add_argument(
        "--quantizer", default="w4a4", help="for SQNR: wXaY (RTN), none, or a recipe quantizer"
    )
    probe.add_argument("--data", help="probe text source (default: the recipe's, or embedded)")
    probe.add_argument("--split", help="its split (default: the recipe's, or test)")
    probe.add_argument("--samples", type=int, help="windows of the text to probe")
    probe.add_argument("--seq-len", type=int, help="tokens per window")
    probe.add_argument(
        "--windows",
        choices=["stream", "document"],
        help="windows cut from the text's stream, or each from a document's start (BOS first)",
    )
    probe.add_argument("--out", type=Path, help="JSON file (default: under --results)")
    probe.add_argument("--results", type=Path, default=Path("results"))
    probe.set_defaults(command=_probe)

    listing = commands.add_parser("list", help="methods, data, presets, variants, executors")
    listing.set_defaults(command=_list)
    return parser


STRICT_HELP = "a cell the plan refuses is an error (exit 2) instead of a refused record"


def _check_results_root(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise QBenchError(f"--results: '{path}' is not a directory; give the results folder")


def _sweep(args: argparse.Namespace) -> int:
    """`qbench sweep` (and `qbench run`, its one-recipe local case): cells, then leaderboards.

    Exit 0 when every cell is ok or refused, 1 when a cell failed (its record says why; a
    rerun retries it), 2 on a plan-time error (with --strict, a refusal is one)."""
    from qbench.recipe import load_recipe

    for source in args.recipes:  # every field checked before the model libraries load
        load_recipe(source)
    if args.no_progress:
        _hide_library_bars()
    from qbench.executors import make_executor
    from qbench.report.leaderboard import write_leaderboard
    from qbench.sweep import plan_recipes, refusals, sweep

    options = {"address": args.address, "num_cpus": args.num_cpus}
    executor = make_executor(args.executor, **{k: v for k, v in options.items() if v is not None})
    planned = plan_recipes(args.recipes)
    refused = refusals(planned)
    if args.strict and refused:
        raise QBenchError(
            "\n".join(f"{p.source}: {cell.refusal} (--strict: refused)" for p, cell in refused)
        )
    tally = sweep(planned, args.results, executor, not args.no_progress)
    for p in planned:
        print(f"leaderboard: {write_leaderboard(p.recipe, p.source, args.results, p.cells)}")
    if tally.elsewhere:
        print(f"{len(tally.elsewhere)} cells were left to another sweep on the same results")
    if refused or tally.refused:
        print(
            f"{len(refused) + len(tally.refused)} cells refused (recorded as refused: the "
            "quantizer cannot run there; not retried until the recipe, the checkpoint or "
            "qbench changes; --strict makes a refusal an error)"
        )
    if tally.failed:
        print(
            f"qbench: {len(tally.failed)} of {len(tally.ran)} cells failed: "
            + ", ".join(job.label for job in tally.failed)
            + "; rerun to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _hide_library_bars() -> None:
    """--no-progress also hides the bars of transformers and the hub (loading weights, writing
    shards): set before they are imported, or switched off where they already are."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _report(args: argparse.Namespace) -> int:
    from qbench.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # checked before the model libraries load
    from qbench.report.leaderboard import write_leaderboard

    print(write_leaderboard(recipe, args.recipe, args.results))
    return 0


def _gate(args: argparse.Namespace) -> int:
    from qbench.recipe import load_recipe

    recipes = [(source, load_recipe(source)) for source in args.recipes]  # before the libraries
    from qbench.report.gate import run_gate, write_reference

    failed = False
    for source, recipe in recipes:
        if recipe.gate is None:
            raise QBenchError(f"{source}: no gate: block; add gate: {{min_recovery: ...}}")
        if args.cadence and recipe.gate.cadence != args.cadence:
            cadence = recipe.gate.cadence
            print(f"gate {recipe.name}: skipped (cadence {cadence}, not {args.cadence})")
            continue
        if args.write_reference:
            if recipe.gate.reference is None:
                raise QBenchError(f"{source}: gate.reference: set the file to write")
            write_reference(recipe, source, args.results, Path(recipe.gate.reference))
        passed, report = run_gate(recipe, source, args.results, args.results_only)
        print(report)
        failed |= not passed
    return 1 if failed else 0


def _probe(args: argparse.Namespace) -> int:
    from qbench.probe import probe_command

    return probe_command(
        args.path,
        args.recipe,
        args.checkpoint,
        args.quantizer,
        args.data,
        args.split,
        args.samples,
        args.seq_len,
        args.out,
        args.results,
        args.windows,
    )


def _train(args: argparse.Namespace) -> int:
    from qbench.checkpoints.train import train_config, trained_checkpoint
    from qbench.recipe import TrainSpec

    spec = _validated(
        TrainSpec,
        preset=args.preset,
        variant=args.variant,
        corpus=args.corpus,
        seed=args.seed,
        steps=args.steps,
        task=args.task,
    )
    print(trained_checkpoint(train_config(**dict(spec))))
    return 0


def _validated(model: type, **values: object) -> object:
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise QBenchError(
            "; ".join(
                f"--{e['loc'][0]}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
            )
        ) from None


def _list(args: argparse.Namespace) -> int:
    from qbench.checkpoints.catalog import PRESETS, VARIANTS
    from qbench.data.sources import TEXT_SOURCES
    from qbench.data.synthetic import TRAIN_TASKS
    from qbench.eval.task_index import local_task_names
    from qbench.executors import EXECUTORS
    from qbench.quant.steps import ROUNDINGS, SHORTHANDS, TRANSFORMS

    print("methods:     ", ", ".join(SHORTHANDS), "(shorthands of transforms + rounding)")
    print("transforms:  ", ", ".join(TRANSFORMS.names()))
    print("rounding:    ", ", ".join(ROUNDINGS.names()))
    print(
        "data:        ",
        ", ".join(f"{n} ({'/'.join(TEXT_SOURCES.get(n).splits)})" for n in TEXT_SOURCES.names())
        + "; perplexity also: text (path:), hub (dataset:, config:, split:, text_column:)",
    )
    print("presets:     ", ", ".join(PRESETS.names()))
    print("train tasks: ", ", ".join(TRAIN_TASKS), "(train.task; perplexity data: task)")
    print("variants:    ", ", ".join(sorted(VARIANTS)))
    print("tasks:       ", ", ".join(local_task_names()), "(local; or any lm-eval task name)")
    print("executors:   ", ", ".join(EXECUTORS.names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
