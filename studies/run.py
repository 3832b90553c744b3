"""Run an Optuna study of clamp and learning rates for one covariance family (or all), tracked in MLflow.

    python -m studies.run --family full                          # 40 trials; resumes the study "full-v4"
    python -m studies.run --family full --trials 30 --jobs 2     # two worker processes share the study
    python -m studies.run --family all --timeout 300             # every family in turn, 5 minutes each
    python -m studies.run --family full --storage sqlite:///studies.db --space my_space.yaml
    make study FAMILY=full [TRIALS=30] [JOBS=2] [STORAGE=URL]

Many machines (README "Scaling out"): create the study once on a shared database, then start workers anywhere
    python -m studies.run --family full --trials 0 --storage postgresql+psycopg://user@db-host/optuna
    python -m studies.run --worker --family full --trials 20 --retries 1 --storage postgresql+psycopg://...
    make study-worker FAMILY=full STORAGE=postgresql+psycopg://user@db-host/optuna [TRIALS=20] [RETRIES=1]

Each invocation adds `--trials` trials to the study "<family>-v4" (created on first use, resumed after: the
storage keeps every trial) and stops early after `--timeout` seconds. Storage: the journal file
studies.log in the project by default (see studies/storage.py). MLflow: one parent run per invocation
(experiment "study-<study name>"), one nested run per trial, one per fit; the parent gets best_params.json,
trials.csv (pruned trials' values apart, as partial_value), Optuna's plots and the validation NLL against
clamp. At the end a table shows each study's best value, best parameters, trial counts, resets and clamp
events, and how many trials had clamp events; the best parameters go to studies/best/<study>.json, a config
file for `python -m experiments.run --config FILE` (`make run CONFIG=FILE`).

`--worker` joins an existing study: it takes the study's recorded settings (datasets, search space,
iterations, eval_every, seed; the datasets must regenerate to the recorded fingerprints on this machine), its
MLflow experiment and pruner, and runs `--trials` trials beside the other workers (TPE with constant liar).
Each worker invocation is one MLflow parent run tagged kind=worker, study=<name> and studies.worker=<host:pid>;
its trial runs nest under it. A worker that dies (SIGKILL, power loss) leaves its trial RUNNING: the
heartbeat fails it (at once on the same host, after `--grace-period` seconds elsewhere), the MLflow runs it
left open on this host end KILLED, and with `--retries N` a copy of the trial is queued (up to N times) for
the next free worker.

Exit status: 0 done, 1 a worker process died, 2 bad input (one line on stderr), 130 interrupted.
"""

import argparse
import logging
import math
import re
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

import gmm
from experiments.redact import redact
from gmm.cli import OneLineParser
from gmm.validation import suggest

from . import STUDY_VERSION
from .logs import configure_logging
from .sampling import PRUNERS
from .storage import open_storage
from .study import run_study
from .summary import BEST_DIR, fit_best_hint, format_table

DEFAULT_TRIALS = 40
DEFAULT_BATCH = 16  # trials per population (--batch); the README's Benchmarks give the measurement (8 vs 16 vs 1)
DEFAULT_ITERATIONS = 1000
DEFAULT_EVAL_EVERY = 50
DEFAULT_TIMEOUT = 480.0  # seconds per family: with start-up and the closing plots, one family stays under 10 minutes
DEFAULT_STUDY = "{family}-" + STUDY_VERSION
SETTINGS_OPTIONS = ("iterations", "eval_every", "seed", "space", "datasets", "data")  # a worker takes the study's


# -- command line -------------------------------------------------------------------------------------------
# one add_argument per flag, in --help order: a long function, but one list to read
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m studies.run",
        description="Optuna study of clamp and learning rates per covariance family, tracked in MLflow.",
    )
    p.add_argument("--family", default="full", help=f"one of {', '.join(gmm.FAMILIES)}, or 'all' (default: full)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"trials to add (default {DEFAULT_TRIALS})")
    p.add_argument("--jobs", type=int, default=1, help="worker processes sharing the study (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker process (default: cores / jobs)")
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"trials fit together as one population per dataset (default {DEFAULT_BATCH}; 1: one at a time)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="journal file PATH.log, sqlite:///FILE.db or another "
        "SQLAlchemy URL (default: $OPTUNA_STORAGE, else studies.log in the project)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per family after which no new trial starts; 0 = none (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--study",
        default=DEFAULT_STUDY,
        help=f"study name; '{{family}}' is replaced by the family (default {DEFAULT_STUDY})",
    )
    p.add_argument("--space", default=None, help="search-space file overriding studies/space.yaml")
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated dataset names (default: the family's collapse datasets and controls; "
        "python -m experiments.datasets lists them)",
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="study your own data: a .csv (header optional), .npy or .parquet file of numeric columns",
    )
    p.add_argument("--columns", default=None, help="columns of --data, by name or 0-based index (x,y or 0,2)")
    p.add_argument("--standardize", action="store_true", help="z-score --data by its training split's mean and std")
    p.add_argument("--components", type=int, default=5, help="components of the model fitted to --data (default 5)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of --data's train/validation split (default 0)")
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"Adam steps per fit (default {DEFAULT_ITERATIONS})",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"steps between validation NLLs reported to the pruner (default {DEFAULT_EVAL_EVERY})",
    )
    p.add_argument("--seed", type=int, default=None, help="fit seed, the same for every trial (default 42)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    p.add_argument(
        "--pruner",
        choices=PRUNERS,
        default=None,
        help="median (default), hyperband or none (a worker: the study's)",
    )
    p.add_argument(
        "--worker",
        action="store_true",
        help="join an existing study as one more worker, with the study's settings (see the module docstring)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="queue a trial whose worker died again, up to N times (default 0: leave it failed)",
    )
    p.add_argument(
        "--no-plots",
        dest="plots",
        action="store_false",
        help="skip Optuna's plots on the parent run (they take seconds per study)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project)",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: study-<study name>)")
    p.add_argument("--best-dir", default=str(BEST_DIR), help="folder of the best-parameter config files")
    p.add_argument("--heartbeat-interval", type=int, default=5, help="seconds between trial heartbeats")
    p.add_argument(
        "--grace-period",
        type=int,
        default=60,
        help="seconds without heartbeat before another host's running trial is failed",
    )
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show the bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every trial and Optuna's messages")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """The families to run; raises ValueError on a bad value (the CLI prints it and exits 2)."""
    if args.family == "all":
        families = list(gmm.FAMILIES)
    elif args.family in gmm.FAMILIES:
        families = [args.family]
    else:
        raise ValueError(
            f"unknown family {args.family!r}; choose one of {', '.join(gmm.FAMILIES)} or all"
            + suggest(args.family, [*gmm.FAMILIES, "all"])
        )
    for name, low in (
        ("trials", 0),
        ("jobs", 1),
        ("iterations", 1),
        ("eval_every", 1),
        ("heartbeat_interval", 1),
        ("grace_period", 1),
        ("retries", 0),
        ("threads", 1),
        ("batch", 1),
    ):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
    if args.worker:
        given = [n for n in SETTINGS_OPTIONS if getattr(args, n) is not None]
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            raise ValueError(f"a worker runs with the study's recorded settings; drop {flags}")
    if args.timeout < 0 or not math.isfinite(args.timeout):
        raise ValueError(f"--timeout must be >= 0 seconds (0 = none); got {args.timeout}")
    if len(families) > 1 and "{family}" not in args.study:
        raise ValueError(f"--family all needs '{{family}}' in --study to name one study per family; got {args.study!r}")
    if args.datasets is not None and len(families) > 1:
        raise ValueError("--datasets names one family's datasets; use it with a single --family")
    if args.data is not None and args.datasets is not None:
        raise ValueError("--data studies your own file instead of named datasets; drop --datasets")
    if args.data is None and (args.columns is not None or args.standardize):
        raise ValueError("--columns and --standardize apply to --data FILE; pass --data too")
    if args.data is not None and args.study == DEFAULT_STUDY:  # its own study, apart from the named datasets'
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.data).stem) or "data"
        args.study = "{family}-" + stem + "-" + STUDY_VERSION
    return families


def _settings_for(args: argparse.Namespace, family: str):
    """The StudySettings of one family from the command line; raises ValueError on a bad space or dataset."""
    from .datasets import dataset_fingerprints, file_fingerprints, file_study_data, study_datasets
    from .objective import StudySettings
    from .space import check_values, load_space

    if args.data is not None:
        data = file_study_data(args.data, args.columns, args.standardize, args.components, args.data_seed)
        prints = file_fingerprints(data)
        names = tuple(prints)
    else:
        data = {}
        names = study_datasets(family, args.datasets.split(",") if args.datasets else None)
        prints = dataset_fingerprints(names)
    settings = StudySettings(
        family=family,
        datasets=names,
        space=load_space(family, args.space),
        iterations=DEFAULT_ITERATIONS if args.iterations is None else args.iterations,
        eval_every=DEFAULT_EVAL_EVERY if args.eval_every is None else args.eval_every,
        seed=42 if args.seed is None else args.seed,
        fingerprints=prints,
        data=data,
    )
    for name in settings.datasets:  # every value the space can suggest, in a config as the trials build it
        check_values(
            settings.space,
            lambda overrides, name=name: settings.config(name, overrides),
            f"--space {args.space}" if args.space else "the search space",
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    """The command (see the module docstring); returns its exit status. Sets up the process first: MLflow
    (experiments.tracking.configure_mlflow), logging, the plots' backend."""
    from experiments.tracking import configure_mlflow

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_mlflow()
    configure_logging(args.verbose)
    if args.plots:  # Optuna's plots draw with pyplot: off-screen, whatever display the session has
        import matplotlib

        matplotlib.use("Agg")
    if args.progress is None and not sys.stderr.isatty():
        logging.getLogger("studies").setLevel(logging.INFO)  # no bar: one line per trial instead
    try:
        families = check_args(args)
        open_storage(args.storage)  # a bad URL or a dead database server fails here, before any study starts
        from experiments.tracking import get_client, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        get_client(tracking_uri)  # so does a dead or silent tracking server, or a broken store (StoreError)
        # bad space/datasets fail here; a worker reads its settings from the study
        all_settings = [None if args.worker else _settings_for(args, family) for family in families]
        summaries, clean = [], True
        for family, settings in zip(families, all_settings, strict=True):
            summary, ok = run_study(args, family, settings, tracking_uri)
            summaries.append(summary)
            clean &= ok
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:  # a store that failed mid-study (a server gone for longer than the retries)
        print(f"{parser.prog}: lost the tracking store: {redact(' '.join(str(e).split()))[:300]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    print(format_table(summaries))
    for s, settings in zip(summaries, all_settings, strict=True):
        if s.best_file:
            print(f"best parameters of {s.study_name}: {s.best_file}")
            if settings is not None:
                print(f"  {fit_best_hint(s.best_file, settings)}")
    return 0 if clean else 1


if __name__ == "__main__":
    from experiments.commands import leave

    leave(main())
