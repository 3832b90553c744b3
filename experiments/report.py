"""Seed reports: one configuration fit over many seeds by gradient descent and by EM, written to a folder that
anyone can regenerate number for number, and a check that it does.

    python -m experiments.report --family full --seeds 10                 # -> reports/full-10seeds-<time>/
    python -m experiments.report --family all --seeds 5 --jobs 2 --out reports/all-5
    python -m experiments.report --config my.yaml --iterations 2000 --seeds 10 --tracking-uri sqlite:////tmp/m.db
    python -m experiments.report --verify reports/full-10seeds-<time>
    make report FAMILY=full SEEDS=10 [JOBS=2] [CONFIG=FILE]      then      make verify-report [REPORT=path]

The config is REPORT_DEFAULTS (the demo's data: 1000 samples, 5 components, 2-D, radius 8; 5000 Adam
steps, about 4-5 s per seed on one core with the MLflow logging) < the --config file < explicit flags (every
ExperimentConfig field has a flag, as in `python -m experiments.run`). `em` is always on: the report
compares the two methods.

What a seed varies: seed i (0 <= i < --seeds) runs the config with `seed = config.seed + i` (the fit's init
and resets) and `data_seed = config.data_seed + i` (a fresh dataset); with a named `dataset` the data is
fixed and only `seed` varies. `--family all` runs every family in gmm.FAMILIES on the same seeds. The seeds of a
family are fit as one population (experiments.population.run_population: one batched gradient-descent fit,
then per seed EM from the same initialization and everything `run_experiment` logs), one MLflow run per seed
nested under one parent run per report, tagged `report.name`; the parent run holds the
report folder as its `report/` artifact.

The folder (built in a hidden temporary sibling and renamed into place, so an interrupted run never leaves
a half-written report; every file inside is also written to a temporary name and renamed):

| file                           | what                                                                      |
|--------------------------------|---------------------------------------------------------------------------|
| runs.csv                       | one row per (family, seed, method); RUN_COLUMNS (the key columns, then  |
|                                | each metric of experiments.metrics.METRICS that has a column)             |
| summary.csv                    | count, mean, std, min, max of every metric per family and method          |
| figures/nll_curves_<family>.png | every seed's gradient-descent NLL curve overlaid, resets dashed          |
| figures/final_nll_<family>.png | final train/validation NLL per method (box + one point per seed)          |
| figures/fit_<family>.png       | data and fitted model of the median seed (median final train NLL of GD)   |
| report.md, report.html         | tables and figures; the HTML embeds the images (base64), one file          |
| manifest.json                  | config, seeds, dataset fingerprints, git commit + dirty flag, versions,    |
|                                | platform, MLflow ids, sha256 of runs.csv without its timing columns        |

`--verify FOLDER` re-runs the manifest's config and seeds (logged to MLflow as usual) and compares every
number of runs.csv but the timing columns (TIMING_COLUMNS): exactly when the platform, CPU capability and
Python/torch/numpy versions match the manifest's, else within |got - expected| <= ATOL + RTOL * |expected|
(counts and iterations still exactly). It prints PASS or FAIL and, on failure, the first difference
(family, seed, method, column, expected, got).

Every family runs with one torch thread (worker processes of a spawn-context pool, one family each, when
--jobs > 1; this process otherwise), and a seed's numbers do not depend on what else its population holds, so
serial and parallel runs give identical runs.csv apart from the timing columns.

This module holds make_report and the CLI; the jobs are modules of their own: experiments.seeds (the plan,
one seed's or one family's fits, the process pool), runs_table (columns, runs.csv, summary.csv),
report_figures, report_doc (report.md / report.html through experiments.document's Jinja2 templates, and
every file as bytes), environment (versions, platform), files (atomic writes, the folder checks) and verify.

Exit status: 0 done / PASS, 1 a fit failed / FAIL, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

import gmm
from gmm.cli import OneLineParser

from .config import ExperimentConfig, add_arguments
from .document import markdown_table
from .environment import EXACT_PLATFORM, EXACT_VERSIONS, environment, installed_packages, same_environment
from .files import MANIFEST_FORMAT, MARKER, WrittenFolder, check_out_dir, print_written, write_folder
from .redact import redact
from .report_doc import build_document, report_files, summary_table
from .report_figures import family_figures, figures_of, median_outcome
from .runs_table import (
    COUNT_COLUMNS,
    GLOSSARY,
    KEY_COLUMNS,
    METHODS,
    METRIC_COLUMNS,
    RUN_COLUMNS,
    TIMING_COLUMNS,
    count_columns,
    read_runs_csv,
    run_columns,
    runs_csv_text,
    runs_frame,
    runs_sha256,
    summarize,
    timing_columns,
)
from .seeds import (
    EXPERIMENT,
    SeedFailed,
    SeedOutcome,
    SeedTask,
    check_plan,
    default_jobs,
    run_seeds,
    seed_configs,
    seed_groups,
    started_workers,
)
from .verify import ATOL, RTOL, Verdict, compare_files, first_difference, load_manifest, verify_report

# the names this module held before it was split, importable from here as before (tests, studies, users)
__all__ = [
    "ATOL", "COUNT_COLUMNS", "EXPERIMENT", "GLOSSARY", "KEY_COLUMNS", "MANIFEST_FORMAT", "MARKER", "METHODS",
    "METRIC_COLUMNS", "REPORT_DEFAULTS", "RTOL", "RUN_COLUMNS", "TIMING_COLUMNS", "Report", "SeedFailed",
    "SeedOutcome", "SeedTask", "Verdict", "build_document", "compare_files", "environment", "family_figures",
    "first_difference", "installed_packages", "load_manifest", "main", "make_report", "markdown_table",
    "median_outcome", "read_runs_csv", "run_seeds", "runs_csv_text", "same_environment", "summarize",
    "summary_table", "verify_report",
]  # fmt: skip

log = logging.getLogger(__name__)

# 5000 steps instead of the demo's 20000: the NLL curves are flat long before (log-scale steps in
# figures/nll_curves_*.png), and `make report FAMILY=full SEEDS=10` takes under a minute on one core.
REPORT_DEFAULTS = ExperimentConfig(iterations=5000, em=True)
REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports"  # the default folder, next to the stores


# -- the report -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Report(WrittenFolder):
    """A written report: its folder, runs and summary frames, the manifest and the parent MLflow run."""

    runs: pd.DataFrame = field(repr=False)


def seed_rule(config: ExperimentConfig) -> str:
    if config.dataset is not None:
        return (
            f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets); "
            f"the data is the named dataset {config.dataset!r} for every seed."
        )
    if config.data_file is not None:
        return (
            f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets) on the data file "
            f"{config.data_file!r}, split into train and validation afresh with data_seed = {config.data_seed} + i."
        )
    return (
        f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets) on fresh data "
        f"generated with data_seed = {config.data_seed} + i."
    )


def make_report(
    config: ExperimentConfig,
    families: Sequence[str] | None = None,
    num_seeds: int = 10,
    out: str | Path | None = None,
    *,
    jobs: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    command: str | None = None,
    force: bool = False,
    population: bool = True,
) -> Report:
    """Run `config` over `num_seeds` seeds for each of `families` (default: config.family) and write the
    report folder `out` (default <project>/reports/<family>-<n>seeds-<UTC time>; an earlier report there is
    replaced only with `force`, and never a folder holding files the report did not write). `jobs`: processes,
    this one included (default experiments.seeds.default_jobs: one per core, at most one per family).

    Raises:
        ValueError / TypeError: bad arguments or config (before anything runs).
        SeedFailed: a fit failed; no folder is written (the parent MLflow run ends FAILED).
    """
    from .stores import check_store
    from .tracking import log_metrics, log_params, resolve_tracking_uri, tracked_run

    base, families, out, created = _checked(config, families, num_seeds, out, jobs, force)
    name = out.name
    uri = resolve_tracking_uri(tracking_uri)
    configs = seed_configs(base, families, num_seeds)
    groups = seed_groups(len(families), num_seeds, population)
    jobs = jobs if jobs is not None else default_jobs(groups)
    command = redact(command or shlex.join(list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])))
    plan = _plan_record(out, created, command, families, base, configs, population)
    tags = {
        "report.name": name,
        "report.kind": "report",
        "report.families": ",".join(families),
        "report.seeds": str(num_seeds),
    }
    t0 = time.perf_counter()
    check_store(uri)  # a store that cannot be used fails here, before workers start (their start takes seconds)
    with (
        started_workers(jobs, groups) as pool,  # their start overlaps the store's opening and the parent run
        tracked_run(uri, experiment, run_name=f"report {name}", tags=tags) as (client, parent_id),
    ):
        params = {"report.families": ",".join(families), "report.seeds": num_seeds, "report.jobs": jobs}
        log_params(client, parent_id, {**base.flat(), **params})
        tasks = [SeedTask(c, uri, experiment, parent_id, name) for c in configs]
        drawn: dict[str, dict[str, bytes]] = {}

        def draw(family: list[SeedOutcome]) -> None:  # a family's figures while the other families still run
            drawn[family[0].family] = figures_of(family[0].family, family, runs_frame(family), configs)

        on_group = draw if population else None  # one by one, a group is a seed: the figures come at the end
        outcomes = run_seeds(tasks, jobs, desc=f"report {name}", population=population, on_group=on_group, pool=pool)
        runs = runs_frame(outcomes)
        summary = summarize(runs)
        figures = {}
        for family in families:
            mine = [o for o in outcomes if o.family == family]
            figures.update(drawn[family] if family in drawn else figures_of(family, mine, runs, configs))
        elapsed = time.perf_counter() - t0
        manifest = {
            **plan,
            "runs": [_run_record(o) for o in outcomes],
            **environment(),
            **_reproduction(runs),
            "mlflow": {"tracking_uri": redact(uri), "experiment": experiment, "parent_run_id": parent_id},
            "jobs": jobs,
            "elapsed_seconds": round(elapsed, 3),
        }
        _write_folder(out, manifest, runs, summary, figures)
        means = {f"{r.family}.{r.method}.{r.metric}.mean": r.mean for r in summary.itertuples() if math.isfinite(r.mean)}
        log_metrics(client, parent_id, means)
        client.log_artifacts(parent_id, str(out), "report")
    return Report(folder=out, manifest=manifest, summary=summary, parent_run_id=parent_id, elapsed=elapsed, runs=runs)


def _checked(
    config, families, num_seeds: int, out, jobs: int | None, force: bool
) -> tuple[ExperimentConfig, list[str], Path, datetime]:
    """make_report's arguments checked, before anything runs: (base config, families, out folder, start time)."""
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig; got {type(config).__name__}")
    base = config.replace(em=True)
    families = check_plan(families if families is not None else [base.family], num_seeds, jobs)
    created = datetime.now(UTC)
    label = "all" if len(families) > 1 else families[0]
    out = Path(out) if out is not None else REPORTS_DIR / f"{label}-{num_seeds}seeds-{created:%Y%m%d-%H%M%S}"
    check_out_dir(out, force)
    return base, families, out, created


def _plan_record(out, created, command, families, base, configs, population) -> dict[str, Any]:
    """The manifest's first entries: what was run, by which command, and how seeds vary (known before the fits)."""
    return {
        "format": MANIFEST_FORMAT,
        "name": out.name,
        "folder": out.as_posix(),
        "created_utc": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "families": families,
        "config": base.to_dict(),
        "seed_rule": seed_rule(base),
        "fit_mode": "population" if population else "one-by-one",  # verify re-runs it the same way
        "seeds": [{"seed": c.seed, "data_seed": c.data_seed} for c in configs if c.family == families[0]],
    }


def _run_record(o: SeedOutcome) -> dict[str, Any]:
    """A seed's entry in the manifest's runs."""
    return {
        "family": o.family,
        "seed": o.seed,
        "data_seed": o.data_seed,
        "dataset_fingerprint": o.fingerprint,
        "run_id": o.run_id,
    }


def _reproduction(runs: pd.DataFrame) -> dict[str, Any]:
    """The manifest's runs_csv (sha256, columns) and tolerance entries: what --verify checks, and how."""
    return {
        "runs_csv": {
            "sha256": runs_sha256(runs),
            "columns": list(run_columns()),
            "excluded_from_sha256": list(timing_columns()),
        },
        "tolerance": {
            "exact_when_equal": [*(f"versions.{k}" for k in EXACT_VERSIONS), *(f"platform.{k}" for k in EXACT_PLATFORM)],
            "otherwise": f"|got - expected| <= {ATOL} + {RTOL} * |expected|; {', '.join(count_columns())} exactly",
            "rtol": RTOL,
            "atol": ATOL,
        },
    }


def _write_folder(out: Path, manifest: dict, runs: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, bytes]) -> None:
    """Write every file of the report into a hidden temporary sibling folder, then rename it to `out`."""
    write_folder(out, report_files(manifest, runs, summary, figures))


# -- command line -----------------------------------------------------------------------------------------
_REPORT_FLAGS = ("seeds", "out", "force")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m experiments.report",
        description="Run one configuration over many seeds (gradient descent and EM) and write a reproducible "
        "report folder, or --verify one.",
        epilog="Config precedence: the report defaults (5000 steps, em on) < --config FILE < flags.",
    )
    add_arguments(parser)
    for action in parser._actions:
        if action.dest == "family":
            action.help = (
                f"covariance family of the model, or 'all' for every one of {', '.join(gmm.FAMILIES)} [default: full]"
            )
    parser.add_argument("--seeds", type=int, default=argparse.SUPPRESS, metavar="N", help="number of seeds [default: 10]")
    parser.add_argument(
        "--out",
        default=argparse.SUPPRESS,
        metavar="FOLDER",
        help="report folder [default: reports/<family>-<N>seeds-<time> in the project]",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        default=argparse.SUPPRESS,
        help="replace the earlier report in --out (never a folder holding other files)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes, this one included, one family each at a time [default: one per core, at most one per "
        "family; the numbers do not depend on it]",
    )
    parser.add_argument(
        "--one-by-one",
        action="store_true",
        help="fit the seeds one after the other instead of a family's seeds as one population (slower; the "
        "numbers of reports made before populations, up to float rounding)",
    )
    from .tracking import add_tracking_arguments

    add_tracking_arguments(parser, EXPERIMENT)
    parser.add_argument("--verify", metavar="FOLDER", default=None, help="re-run the report in FOLDER and compare")
    return parser


def _file_keys(path: str) -> list[str]:
    """The keys a config file sets (ExperimentConfig.from_file has already checked it)."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return list(data or {})


def report_config(ns: argparse.Namespace) -> tuple[ExperimentConfig, list[str]]:
    """The base config and the families of parsed flags: REPORT_DEFAULTS < --config file < flags."""
    given = {f.name: getattr(ns, f.name) for f in fields(ExperimentConfig) if hasattr(ns, f.name)}
    if given.get("em") is False:
        raise ValueError("a report always fits EM next to gradient descent; drop --no-em")
    family = given.pop("family", None)
    base = REPORT_DEFAULTS
    config_file = getattr(ns, "config", None)
    if config_file:
        from_file = ExperimentConfig.from_file(config_file)
        base = base.replace(**{k: getattr(from_file, k) for k in _file_keys(config_file)})
    if family is not None and family != "all":
        given["family"] = family
    config = base.replace(**given, em=True)
    families = list(gmm.FAMILIES) if family == "all" else [config.family]
    return config, families


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .tracking import start_command  # noqa: PLC0415

    start_command()
    if args.verify is not None:
        return _verify_main(parser, args)
    from mlflow.exceptions import MlflowException

    from .tracking import resolve_tracking_uri

    try:
        config, families = report_config(args)
        num_seeds = getattr(args, "seeds", 10)
        check_plan(families, num_seeds, args.jobs)
        if args.jobs is None:
            args.jobs = default_jobs(seed_groups(len(families), num_seeds, not args.one_by_one))
        out = getattr(args, "out", None)
        if out is not None:
            check_out_dir(Path(out), getattr(args, "force", False))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    uri = resolve_tracking_uri(args.tracking_uri)
    print(
        f"Report: {', '.join(families)} x {num_seeds} seeds ({config.iterations} Adam steps + EM each, "
        f"{config.data_file or config.dataset or 'generated data'}), {args.jobs} job{'s' * (args.jobs > 1)}; "
        f"tracking to {redact(uri)}",
        flush=True,
    )
    try:
        report = make_report(
            config, families, num_seeds, out, jobs=args.jobs, tracking_uri=uri, experiment=args.experiment,
            force=getattr(args, "force", False), population=not args.one_by_one,
        )  # fmt: skip
    except (ValueError, TypeError, MlflowException) as err:
        parser.error(str(err))
    except SeedFailed as err:
        print(f"{parser.prog}: fit failed: {err} (no report written)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (no report written)", file=sys.stderr)
        return 130
    for family in families:
        headers, rows = summary_table(report.summary, family)
        print(f"\n{family}:\n{markdown_table(headers, rows)}")
    files = "report.md, report.html, runs.csv, summary.csv, manifest.json, figures/"
    what = f": {files} (MLflow parent run {report.parent_run_id})"
    print()
    print_written(report.folder, report.elapsed, what, "experiments.report", "verify-report REPORT")
    return 0


def _verify_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--verify FOLDER`: PASS (0) or FAIL (1) on stdout; no config flag may come with it."""
    from mlflow.exceptions import MlflowException

    typed = [f.name for f in fields(ExperimentConfig) if hasattr(args, f.name)]
    typed += [name for name in (*_REPORT_FLAGS, "config") if hasattr(args, name)]
    if typed:
        flags = ", --".join(t.replace("_", "-") for t in typed)
        parser.error(f"--verify re-runs the manifest's config and seeds; drop --{flags}")
    try:
        check_plan(["full"], 1, args.jobs)
        verdict = verify_report(args.verify, jobs=args.jobs, tracking_uri=args.tracking_uri, experiment=args.experiment)
    except (ValueError, TypeError, MlflowException) as err:
        parser.error(str(err))
    except SeedFailed as err:
        print(f"FAIL: {args.verify}: fit failed in the re-run: {err}")
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(verdict.message)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    # run through the package module, so spawned workers and this process share one `experiments.report`
    from experiments.commands import leave
    from experiments.report import main as _main

    leave(_main())
