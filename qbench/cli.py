"""qbench run | report | train | list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qbench.errors import QBenchError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except QBenchError as error:
        print(f"qbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qbench: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbench", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="evaluate every cell of a recipe, then report")
    run.add_argument("recipe", type=Path)
    run.add_argument("--results", type=Path, default=Path("results"), help="results root")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(command=_run)

    report = commands.add_parser("report", help="write results/<recipe>/LEADERBOARD.md")
    report.add_argument("recipe", type=Path)
    report.add_argument("--results", type=Path, default=Path("results"))
    report.set_defaults(command=_report)

    train = commands.add_parser("train", help="train (or find cached) a qbench checkpoint")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--variant", default="baseline")
    train.add_argument("--corpus", default="embedded")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps", type=int)
    train.set_defaults(command=_train)

    listing = commands.add_parser("list", help="methods, data sources, presets, variants")
    listing.set_defaults(command=_list)
    return parser


def _run(args: argparse.Namespace) -> int:
    from qbench.recipe import load_recipe
    from qbench.report.leaderboard import write_leaderboard
    from qbench.runner import run

    recipe = load_recipe(args.recipe)
    run(recipe, args.recipe, args.results, progress=not args.no_progress)
    print(f"leaderboard: {write_leaderboard(recipe, args.recipe, args.results)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from qbench.recipe import load_recipe
    from qbench.report.leaderboard import write_leaderboard

    print(write_leaderboard(load_recipe(args.recipe), args.recipe, args.results))
    return 0


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
    )
    print(trained_checkpoint(train_config(**spec.model_dump())))
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
    from qbench.checkpoints.model import VARIANTS
    from qbench.checkpoints.train import PRESETS
    from qbench.data.sources import TEXT_SOURCES
    from qbench.quant import METHODS

    print("methods:     ", ", ".join(METHODS.names()))
    print(
        "data:        ",
        ", ".join(f"{n} ({'/'.join(TEXT_SOURCES.get(n).splits)})" for n in TEXT_SOURCES.names()),
    )
    print("presets:     ", ", ".join(PRESETS.names()))
    print("variants:    ", ", ".join(sorted(VARIANTS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
