"""The clamp at a study's best learning rates: how much does the variance floor matter there?

    python -m studies.clamp_profile --family full      # reads studies/best/full-<version>.json
    python -m studies.clamp_profile --best FILE --clamps 1e-8,1e-4,1e-1
    python -m studies.clamp_profile --family full --set component_lr=0.1   # where collapse happens

A study's trials vary the clamp and the learning rates together, so its trials alone do not say what the
clamp does at fixed learning rates. This command takes the best trial's parameters (the study's best file),
replaces the clamp by each value of a grid, and fits the study's datasets (the family's collapse datasets
and controls) as the trials do: the same seed, iterations and options, without MLflow. It prints, per
clamp, the objective (the mean validation NLL over the datasets), the clamp events and resets, and the
best and worst clamp of the grid. Takes about a second per fit (7 datasets x 5 clamps on 2 cores: ~30 s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from gmm.cli import OneLineParser

from . import STUDY_VERSION

DEFAULT_CLAMPS = (1e-8, 1e-6, 1e-4, 1e-2, 1e-1)  # the search space's range, two decades apart


@dataclass(frozen=True)
class ClampPoint:
    """One clamp of the grid: the study objective at the best parameters, and what the floor did."""

    clamp: float
    value: float  # mean validation NLL over the datasets (the study's objective)
    clamps: int  # clamp events over the datasets' fits
    resets: int


def profile(best: dict, datasets: tuple[str, ...], clamps=DEFAULT_CLAMPS) -> list[ClampPoint]:
    """Fit every dataset at `best` (an ExperimentConfig dict: the study's best file) with each clamp."""
    import torch

    import gmm
    from experiments.config import ExperimentConfig
    from experiments.datasets import load_dataset

    points = []
    for clamp in clamps:
        values, events, resets = [], 0, 0
        for name in datasets:
            config = ExperimentConfig.from_dict({**best, "dataset": name, "clamp": clamp})
            data = load_dataset(config.data_spec())
            model = gmm.make_model(config.family, config.model_components, config.model_dims)
            with warnings.catch_warnings():  # spikes and the like are the trials' business too; not shown here
                warnings.simplefilter("ignore", gmm.ConvergenceWarning)
                try:
                    result = gmm.fit(model, data.train, **config.fit_options())
                except (gmm.NonFiniteNLLError, FloatingPointError, torch.linalg.LinAlgError):
                    values.append(math.inf)  # a failed fit scores as the trial would: not finite
                    continue
            values.append(model.nll(data.val))
            events += result.clamp_count
            resets += result.reset_count
        points.append(ClampPoint(clamp, sum(values) / len(values), events, resets))
    return points


def format_profile(points: list[ClampPoint]) -> str:
    lines = [f"{'clamp':>8}  {'mean val NLL':>12}  {'clamp events':>12}  {'resets':>6}"]
    lines += [f"{p.clamp:8.0e}  {p.value:12.4f}  {p.clamps:12d}  {p.resets:6d}" for p in points]
    best = min(points, key=lambda p: p.value)
    worst = max(points, key=lambda p: p.value)
    lines.append(
        f"best clamp {best.clamp:.0e} ({best.value:.4f}), worst {worst.clamp:.0e} ({worst.value:.4f}): "
        f"the floor moves the objective by {worst.value - best.value:.4f} nats at these learning rates"
    )
    return "\n".join(lines)


def _read_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, dict, tuple[float, ...]]:
    """The best-parameter file (its path, and its parameters with --set applied) and the clamps; a bad value
    ends the command through `parser.error` (one line, exit 2)."""
    import yaml

    from .summary import BEST_DIR

    path = Path(args.best) if args.best else BEST_DIR / f"{args.family}-{STUDY_VERSION}.json"
    try:
        best = json.loads(path.read_text())
    except OSError:
        parser.error(f"no best-parameter file {path}; run `make study FAMILY={args.family}` first, or pass --best FILE")
    except ValueError as err:
        parser.error(f"{path} is not JSON ({err}); pass the file `make study` wrote")
    if not isinstance(best, dict):
        parser.error(f"{path} holds {type(best).__name__}, not the parameter object `make study` writes")
    try:
        clamps = tuple(float(c) for c in args.clamps.split(","))
        if not all(math.isfinite(c) and c > 0 for c in clamps):
            raise ValueError
    except ValueError:
        parser.error(f"--clamps must be positive numbers separated by commas, e.g. 1e-8,1e-4,1e-1; got {args.clamps!r}")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, e.g. --set component_lr=0.1; got {item!r}")
        try:
            best[key.strip()] = yaml.safe_load(value)  # numbers, true/false as in the config files
        except yaml.YAMLError:
            parser.error(f"--set {item}: the value is not a number, true/false or a word; e.g. --set component_lr=0.1")
    return path, best, clamps


def main(argv: list[str] | None = None) -> int:
    from experiments.datasets import DATASETS

    from .datasets import study_datasets
    from .summary import BEST_DIR

    parser = OneLineParser(prog="python -m studies.clamp_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="full", help="the study's family (default full)")
    default_best = f"{BEST_DIR}/<family>-{STUDY_VERSION}.json"
    parser.add_argument("--best", default=None, help=f"best-parameter file [default: {default_best}]")
    parser.add_argument("--clamps", default=",".join(f"{c:g}" for c in DEFAULT_CLAMPS), help="comma-separated clamps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter of the best file, e.g. --set component_lr=0.1 --set reset=false (repeatable)",
    )
    args = parser.parse_args(argv)
    path, best, clamps = _read_args(parser, args)
    family = best.get("family", args.family)
    if best.get("data_file") is not None:
        parser.error(f"{path} is a study of your own data; this command profiles the named datasets' studies")
    if "dataset" in best and best["dataset"] not in DATASETS:
        parser.error(f"dataset {best['dataset']!r} is not a named dataset; drop it (the study's datasets are used)")
    try:
        datasets = study_datasets(family)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    changed = f" with {', '.join(args.set)}" if args.set else ""
    print(f"{family}: the best parameters of {path.name}{changed}, clamp replaced, over {len(datasets)} datasets")
    sys.stdout.flush()  # the fits take a while: say what is coming first
    try:
        points = profile(best, datasets, clamps)
    except (ValueError, TypeError) as err:  # a bad --set value: ExperimentConfig names it
        parser.error(str(err))
    print(format_profile(points))
    return 0


if __name__ == "__main__":
    from experiments.commands import leave

    leave(main())
