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

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

import gmm
from experiments.redact import install_log_redaction, redact
from gmm.cli import OneLineParser
from gmm.validation import suggest

from . import STUDY_VERSION
from .storage import PROJECT_ROOT, fail_stale_trials, open_storage, resolve_storage_url

log = logging.getLogger("studies.run")

DEFAULT_TRIALS = 40
DEFAULT_BATCH = 8  # trials per population (--batch); see the README's study timings for the measurement
DEFAULT_ITERATIONS = 1000
DEFAULT_EVAL_EVERY = 50
DEFAULT_TIMEOUT = 480.0  # seconds per family: with start-up and the closing plots, one family stays under 10 minutes
DEFAULT_STUDY = "{family}-" + STUDY_VERSION
BEST_DIR = PROJECT_ROOT / "studies" / "best"
PRUNERS = ("median", "hyperband", "none")
SETTINGS_OPTIONS = ("iterations", "eval_every", "seed", "space", "datasets", "data")  # a worker takes the study's


# -- command line -------------------------------------------------------------------------------------------
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
    p.add_argument("--datasets", default=None, help="comma-separated dataset names (default: the family's three)")
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


# -- one worker: a sampler, a pruner, study.optimize ------------------------------------------------------
@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to run its share of a study (picklable, for spawned processes)."""

    storage_url: str
    study_name: str
    settings: object  # studies.objective.StudySettings
    n_trials: int
    timeout: float | None
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sampler_seed: int
    pruner: str
    threads: int
    heartbeat_interval: int
    grace_period: int
    parallel: bool = False  # other workers share the study: the sampler lies about their running trials
    verbose: bool = False
    retries: int = 0  # times a trial failed as stale (dead worker) is queued again
    batch: int = 1  # trials asked and fit together as one population per dataset (1: one trial at a time)


STARTUP_TRIALS = 10  # TPE's random trials before it models the objective


def make_sampler(seed: int, parallel: bool, batch: int = 1) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, grouped); `parallel`: other trials run meanwhile, so it lies about them (constant
    liar). With batches of B trials, the random start is min(10, B) trials: the first batch, not two batches
    of which the second would be random too (10 complete trials are needed before TPE models anything)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=min(STARTUP_TRIALS, batch) if batch > 1 else STARTUP_TRIALS,
            multivariate=True,
            group=True,
            constant_liar=parallel or batch > 1,
            seed=seed,
        )


PRUNE_MARGIN = 0.05  # nats: a trial is pruned only this far above the median of the others at the same step


class MarginPruner(optuna.pruners.BasePruner):
    """Median rule with a margin: prune a trial whose intermediate value at a step exceeds the median of the
    other trials' values at that step by more than `margin`, once `min_trials` finished trials reported
    there, and never before step `warmup_steps` (studies.objective reports after each dataset)."""

    def __init__(self, margin: float, min_trials: int = 5, warmup_steps: int = 1):
        self.margin, self.min_trials, self.warmup_steps = margin, min_trials, warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])
        ]
        if len(others) < self.min_trials:
            return False
        return trial.intermediate_values[step] > float(np.median(others)) + self.margin


def make_pruner(name: str, settings) -> optuna.pruners.BasePruner:
    """Steps are datasets (see studies.objective): nothing is pruned before half of them are done."""
    num = len(settings.datasets)
    if name == "median":
        return MarginPruner(PRUNE_MARGIN, min_trials=5, warmup_steps=max(1, num // 2))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, num // 2), max_resource=num)
    return optuna.pruners.NopPruner()


def _sampler_seed(seed: int, existing: int, worker: int) -> int:
    """Distinct per worker and per resumption, so a resumed study does not redraw its first random trials."""
    return int(np.random.SeedSequence([seed, existing, worker]).generate_state(1)[0])


class _QuietTrialFailed(logging.Filter):
    """Optuna logs a traceback for every caught exception; a diverged fit needs only its reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .objective import TrialFailed

        if record.exc_info and isinstance(record.exc_info[1], TrialFailed | KeyboardInterrupt):
            record.exc_info = None  # Ctrl-C / SIGTERM: the command says "interrupted" once
        return True


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("studies").setLevel(logging.INFO if verbose else logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    for handler in optuna.logging.get_logger("optuna").handlers:  # a logger's own filter misses its children
        if not any(isinstance(f, _QuietTrialFailed) for f in handler.filters):
            handler.addFilter(_QuietTrialFailed())
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    install_log_redaction("optuna")


def optimize(job: WorkerJob, callbacks: list | None = None) -> None:
    """Run `job.n_trials` trials (or until `job.timeout`) of the study in this process."""
    import torch

    from .objective import Objective, TrialFailed

    torch.set_num_threads(job.threads)
    storage = open_storage(
        job.storage_url,
        heartbeat_interval=job.heartbeat_interval,
        grace_period=job.grace_period,
        stale_callback=StaleTrialHandler(job.tracking_uri, job.experiment, job.retries),
    )
    study = optuna.load_study(
        study_name=job.study_name,
        storage=storage,
        sampler=make_sampler(job.sampler_seed, parallel=job.parallel, batch=job.batch),
        pruner=make_pruner(job.pruner, job.settings),
    )
    objective = Objective(job.settings, job.tracking_uri, job.experiment, job.parent_run_id, job.study_name)
    if job.batch > 1:
        optimize_batched(study, storage, objective, job, callbacks or [])
        return
    study.optimize(
        objective,
        n_trials=job.n_trials,
        timeout=job.timeout,
        catch=(TrialFailed,),
        callbacks=callbacks,
        gc_after_trial=False,
    )


def optimize_batched(study: optuna.Study, storage, objective, job: WorkerJob, callbacks: list) -> None:
    """`job.n_trials` trials in batches of `job.batch`: ask a batch (TPE with the constant liar), run it as
    populations (`Objective.run_batch`), tell each trial's outcome, then the callbacks, as `study.optimize`
    would. While a batch runs, a thread records each trial's heartbeat; a batch cut short by Ctrl-C or an error
    fails its trials that were not told, like `study.optimize` does, and re-raises."""
    start = time.monotonic()
    done = 0
    while done < job.n_trials and (job.timeout is None or time.monotonic() - start < job.timeout):
        fail_stale_trials(study)
        trials = []
        for _ in range(min(job.batch, job.n_trials - done)):
            trials.append(study.ask())
            _beat(storage, trials[-1])  # at once: a worker killed during the asks leaves no ownerless trial
        told: set[int] = set()
        try:
            with _heartbeats(storage, trials, job.heartbeat_interval):
                outcomes = objective.run_batch(trials)
            for trial, (state, value) in zip(trials, outcomes, strict=True):
                frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
                told.add(trial.number)
                for callback in callbacks:
                    callback(study, frozen)
        except BaseException as err:
            ended = getattr(err, "batch_outcomes", {})  # trials that had been pruned or failed on their own
            for trial in trials:
                if trial.number in told:
                    continue
                if trial.number in ended:
                    state, value = ended[trial.number]
                    study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
                else:
                    trial.set_user_attr("fail_reason", f"the batch stopped: {type(err).__name__}: {err}"[:500])
                    study.tell(trial, state=TrialState.FAIL)
            raise
        done += len(trials)


def _beat(storage, trial) -> None:
    if hasattr(storage, "record_heartbeat"):
        storage.record_heartbeat(trial._trial_id)  # Optuna has no public trial-id accessor; storages take the id


@contextlib.contextmanager
def _heartbeats(storage, trials: list, interval: int) -> Iterator[None]:
    """Record a heartbeat for every trial of a batch now and every `interval` seconds until the block ends (what
    `study.optimize` does for its one running trial), so that a killed worker's batch is failed as stale."""
    if not hasattr(storage, "record_heartbeat") or not interval:
        yield
        return
    stop = threading.Event()
    ids = [t._trial_id for t in trials]  # Optuna has no public trial-id accessor; storages take the id

    def beat() -> None:
        while True:
            for trial_id in ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001  (a missed beat is retried at the next interval)
                    log.debug("heartbeat of trial %d failed", trial_id, exc_info=True)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="trial-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _worker_main(job: WorkerJob) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(job.verbose)
    try:
        optimize(job)
    except KeyboardInterrupt:
        sys.exit(130)


# -- MLflow runs orphaned by a killed process --------------------------------------------------------------
def end_orphan_runs(tracking_uri: str, experiment: str) -> int:
    """End (KILLED) RUNNING runs of `experiment` owned by a dead process on this host; returns how many."""
    from experiments.stores import process_alive
    from experiments.tracking import get_client

    from .objective import WORKER_TAG

    client = get_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    host, ended = socket.gethostname(), 0
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        owner = run.data.tags.get(WORKER_TAG, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not process_alive(int(pid)):
            client.set_tag(run.info.run_id, "stop_reason", f"process {pid} died while the run was open")
            client.set_terminated(run.info.run_id, "KILLED")
            ended += 1
    return ended


def end_trial_runs(tracking_uri: str, trial: FrozenTrial) -> int:
    """End (KILLED) the RUNNING MLflow runs of a trial failed as stale: its trial run and the fit runs nested
    in it, on whatever host the dead worker ran. Returns how many."""
    from experiments.tracking import get_client

    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return 0
    client = get_client(tracking_uri)
    trial_run = client.get_run(run_id)
    children = client.search_runs(
        [trial_run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    ended = 0
    for run in [*children, trial_run]:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "stop_reason", f"trial {trial.number} failed: its worker died")
            client.set_terminated(run.info.run_id, "KILLED")
            ended += 1
    return ended


@dataclass(frozen=True)
class StaleTrialHandler:
    """The storage's stale-trial callback: log, end the dead worker's MLflow runs, queue a retry if asked.

    Runs in whichever worker noticed the stale trial (picklable, for spawned workers).
    """

    tracking_uri: str
    experiment: str
    retries: int = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from .storage import retry_stale_trial

        log.warning(
            "trial %d was left RUNNING by a dead worker; marked FAIL (%s)",
            trial.number,
            trial.user_attrs.get("fail_reason", "stale heartbeat"),
        )
        try:
            end_trial_runs(self.tracking_uri, trial)
            end_orphan_runs(self.tracking_uri, self.experiment)
        except Exception as e:  # clean-up must never stop the study
            log.warning("could not end the MLflow runs of trial %d: %s", trial.number, e)
        if self.retries and retry_stale_trial(study, trial, self.retries):
            log.warning("trial %d queued again (--retries %d)", trial.number, self.retries)


# -- summary, best parameters, study-level artifacts ---------------------------------------------------------
@dataclass(frozen=True)
class StudySummary:
    """One study after an invocation (the counts cover the whole study, not only this invocation)."""

    study_name: str
    family: str
    added: int  # trials this invocation finished
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_trial: int | None
    best_config: dict | None  # ExperimentConfig overrides of the best trial
    resets_best: int | None  # collapse resets in the best trial's fits
    resets_all: int  # collapse resets over every finished trial
    clamps_best: int | None = None  # clamp events in the best trial's fits
    clamps_all: int = 0  # clamp events over every finished trial
    with_clamps: int = 0  # finished trials (complete or pruned) with at least one clamp event
    finished: int = 0  # complete + pruned trials
    clamp_importance: float | None = None  # Optuna's (fANOVA) importance of clamp over the complete trials
    wall_time: float = 0.0  # seconds this invocation spent on the study
    best_file: str | None = None


def summarize(study: optuna.Study, settings, added: int, wall_time: float, best_file: str | None) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = min(complete, key=lambda t: t.value) if complete else None  # pruned values are partial: never ranked
    return StudySummary(
        study_name=study.study_name,
        family=settings.family,
        added=added,
        complete=count[TrialState.COMPLETE],
        pruned=count[TrialState.PRUNED],
        failed=count[TrialState.FAIL],
        running=count[TrialState.RUNNING],
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        best_config=settings.space.to_config(best.params) if best else None,
        resets_best=int(best.user_attrs.get("reset_count", 0)) if best else None,
        resets_all=int(sum(t.user_attrs.get("reset_count", 0) for t in trials)),
        clamps_best=int(best.user_attrs.get("clamp_count", 0)) if best else None,
        clamps_all=int(sum(t.user_attrs.get("clamp_count", 0) for t in trials)),
        with_clamps=sum(t.user_attrs.get("clamp_count", 0) > 0 for t in finished),
        finished=len(finished),
        clamp_importance=clamp_importance(study),
        wall_time=wall_time,
        best_file=best_file,
    )


def clamp_importance(study: optuna.Study) -> float | None:
    """Optuna's importance of `clamp` (fANOVA, seeded) over the complete trials and the parameters every one
    of them has; None when clamp is not searched or fewer than 5 trials are complete."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    common = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    if len(complete) < 5 or "clamp" not in common:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return float(optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(common))["clamp"])
    except Exception as err:  # every trial with the same value, scikit-learn (fANOVA's) missing, ...: no figure
        log.debug("no clamp importance: %s", err)
        return None


def best_config_dict(settings, overrides: dict) -> dict:
    """The best trial as an ExperimentConfig file: the family, the study's fit length, a data file's fields
    (a study of your own data), the tuned values."""
    from experiments.config import ExperimentConfig

    d = {"family": settings.family, "iterations": settings.iterations, "seed": settings.seed, **settings.data, **overrides}
    ExperimentConfig.from_dict(d)  # validates; the file keeps only the keys that matter
    return d


def write_best(study: optuna.Study, settings, folder: Path) -> Path | None:
    """Write <folder>/<study>.json (ExperimentConfig.from_file format) of the best trial, or None if none."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    path = Path(folder) / f"{study.study_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(best_config_dict(settings, settings.space.to_config(best.params)), indent=2) + "\n")
    return path


def _fmt_params(config: dict | None) -> str:
    if not config:
        return "-"
    parts = []
    for k, v in config.items():
        if k == "mixture_lr" and v == 0:
            parts.append("mixture_lr=frozen")
        else:
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def format_table(summaries: list[StudySummary]) -> str:
    """The closing table: one row per study."""
    head = (
        "study",
        "best val NLL",
        "trial",
        "complete",
        "pruned",
        "failed",
        "resets best/all",
        "clamps best/all",
        "trials with clamps",
        "clamp importance",
        "time",
        "best params",
    )
    rows = [head]
    for s in summaries:
        rows.append(
            (
                s.study_name,
                f"{s.best_value:.4f}" if s.best_value is not None else "-",
                f"#{s.best_trial}" if s.best_trial is not None else "-",
                str(s.complete),
                str(s.pruned),
                str(s.failed) + (f" (+{s.running} running)" if s.running else ""),
                f"{s.resets_best if s.resets_best is not None else '-'}/{s.resets_all}",
                f"{s.clamps_best if s.clamps_best is not None else '-'}/{s.clamps_all}",
                f"{s.with_clamps}/{s.finished}",
                f"{s.clamp_importance:.2f}" if s.clamp_importance is not None else "-",
                f"{s.wall_time:.0f} s",
                _fmt_params(s.best_config),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def log_study_artifacts(
    client, run_id: str, study: optuna.Study, summary: StudySummary, settings, plots: bool = True
) -> None:
    """best_params.json, trials.csv and (unless `plots` is False) Optuna's matplotlib plots on the
    invocation's parent run."""
    from mlflow.entities import Metric

    best = None
    if summary.best_trial is not None:
        trial = study.best_trial
        best = {
            "study": study.study_name,
            "value": trial.value,
            "trial": trial.number,
            "params": trial.params,
            "config": best_config_dict(settings, summary.best_config),
            "user_attrs": trial.user_attrs,
        }
    client.log_dict(run_id, best or {"study": study.study_name, "value": None}, "best_params.json")
    client.log_text(run_id, trials_csv(study), "trials.csv")
    now = int(time.time() * 1000)
    metrics = {
        "trials_complete": summary.complete,
        "trials_pruned": summary.pruned,
        "trials_failed": summary.failed,
        "trials_added": summary.added,
        "resets_all": summary.resets_all,
        "clamps_all": summary.clamps_all,
        "trials_with_clamps": summary.with_clamps,
        "study_time": summary.wall_time,
    }
    if summary.best_value is not None:
        metrics["best_value"] = summary.best_value
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    if not plots:
        return
    figures = list(study_figures(study))
    nll_vs_clamp = plot_nll_vs_clamp(study)
    if nll_vs_clamp is not None:
        figures.append(("nll_vs_clamp", nll_vs_clamp))
    for name, fig in figures:
        with warnings.catch_warnings():  # Optuna's slice plot of many parameters cannot fit tight_layout
            warnings.filterwarnings("ignore", message="Tight layout not applied")
            client.log_figure(run_id, fig, f"plots/{name}.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def trials_csv(study: optuna.Study) -> str:
    """Optuna's trials table as CSV, with a pruned trial's value moved from `value` (complete trials only,
    the objective) to `partial_value` (the mean over the datasets it fitted before it was pruned), so the
    two are never sorted or ranked together."""
    frame = study.trials_dataframe()
    if "value" in frame:
        pruned = frame["state"] == TrialState.PRUNED.name
        frame.insert(frame.columns.get_loc("value") + 1, "partial_value", frame["value"].where(pruned))
        frame.loc[pruned, "value"] = float("nan")
    return frame.to_csv(index=False)


def plot_nll_vs_clamp(study: optuna.Study):
    """Validation NLL (the objective) against clamp of the complete trials, colored by component_lr; None
    when fewer than two complete trials searched clamp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "clamp" in t.params and t.value is not None and math.isfinite(t.value)
    ]
    if len(trials) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lrs = [t.params.get("component_lr", float("nan")) for t in trials]
    points = ax.scatter(
        [t.params["clamp"] for t in trials],
        [t.value for t in trials],
        c=lrs,
        cmap="viridis",
        norm=LogNorm() if all(v > 0 for v in lrs) else None,
        edgecolors=["red" if t.user_attrs.get("clamp_count", 0) else "none" for t in trials],
    )
    fig.colorbar(points, ax=ax, label="component_lr")
    ax.set(xscale="log", xlabel="clamp (variance floor)", ylabel="mean validation NLL")
    ax.set_title(f"{study.study_name}: complete trials (red edge: clamp events)", fontsize=10)
    fig.tight_layout()
    return fig


def study_figures(study: optuna.Study):
    """(name, matplotlib Figure) for each of Optuna's plots the study has enough trials for."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {p for t in complete for p in t.params}
    plots = []
    if complete:
        plots += [("optimization_history", vm.plot_optimization_history), ("slice", vm.plot_slice)]
    if len(complete) >= 2:  # importances need a fit over at least two trials
        plots.append(("param_importances", vm.plot_param_importances))
    if len(complete) >= 2 and len(names) >= 2:
        plots.append(("contour", vm.plot_contour))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots.append(("intermediate_values", vm.plot_intermediate_values))
    for name, fn in plots:
        try:
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length is less than 2", per param
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = fn(study)
            finally:
                optuna.logging.set_verbosity(verbosity)
        except Exception as e:  # a plot the data cannot support (e.g. importances of constant params): skip it
            log.warning("skipped the %s plot: %s", name, e)
            continue
        first = axes.flat[0] if isinstance(axes, np.ndarray) else axes
        yield name, first.figure


# -- one study --------------------------------------------------------------------------------------------
class _Progress:
    """tqdm bar of this invocation's finished trials and the study's best value (only on a terminal)."""

    def __init__(self, total: int, name: str, show: bool | None, start_number: int, owners: set[str] | None = None):
        from tqdm.auto import tqdm

        enabled = sys.stderr.isatty() if show is None else show
        self.bar = tqdm(total=total, desc=name, unit="trial", disable=not enabled, dynamic_ncols=True)
        self.start_number = start_number
        self.owners = owners  # "host:pid" of this invocation's processes; None: every new trial is ours
        self.done = 0
        self.total = total
        self.started = time.monotonic()
        self.logged: set[int] = set()  # trial numbers already logged (trials finish out of order)

    def mine(self, trial: FrozenTrial) -> bool:
        """Whether this invocation ran `trial` (other workers may add trials to the study meanwhile)."""
        from .storage import OWNER_KEY

        if trial.number < self.start_number:
            return False
        return self.owners is None or trial.system_attrs.get(OWNER_KEY) in self.owners

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:  # an Optuna callback (in-process worker)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        mine = [t for t in trials if self.mine(t) and t.state.is_finished()]
        count = {s: sum(t.state == s for t in mine) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        values = [t.value for t in trials if t.state == TrialState.COMPLETE]
        if len(mine) > self.done:
            elapsed = time.monotonic() - self.started
            for t in sorted(mine, key=lambda t: t.number):
                if t.number not in self.logged:
                    self.logged.add(t.number)
                    k = len(self.logged)
                    left = _time_left(elapsed, k, self.total)
                    log.info("%d/%d: trial %d %s%s", k, self.total, t.number, _outcome(t), left)
            self.bar.update(len(mine) - self.done)
            self.done = len(mine)
        self.bar.set_postfix(
            best=f"{min(values):.4f}" if values else "-",
            pruned=count[TrialState.PRUNED],
            failed=count[TrialState.FAIL],
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _time_left(elapsed: float, done: int, total: int) -> str:
    """ ", about 2 min left" from the mean time per finished trial so far (empty when done or unknown)."""
    if done >= total or done <= 0 or total <= 0:
        return ""
    left = elapsed / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


def _outcome(trial: FrozenTrial) -> str:
    """'complete: 3.8102', 'pruned at step 100 (...)', 'fail (reason)': a pruned trial's value is a partial
    objective, not comparable with complete ones, so it is not shown as one."""
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        return f"{state}: {trial.value:.4f}"
    reason = _reason(trial)
    if reason.startswith(state):
        return reason
    return f"{state} ({reason})" if reason else state


def _reason(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason") or "")


def _settings_for(args: argparse.Namespace, family: str):
    from .datasets import dataset_fingerprints, file_fingerprints, file_study_data, study_datasets
    from .objective import StudySettings
    from .space import check_values, load_space

    if args.data is not None:
        data = file_study_data(args.data, args.columns, args.standardize, args.components, args.data_seed)
        prints = file_fingerprints(data)
        settings = StudySettings(
            family=family,
            datasets=tuple(prints),
            space=load_space(family, args.space),
            iterations=DEFAULT_ITERATIONS if args.iterations is None else args.iterations,
            eval_every=DEFAULT_EVAL_EVERY if args.eval_every is None else args.eval_every,
            seed=42 if args.seed is None else args.seed,
            fingerprints=prints,
            data=data,
        )
    else:
        names = study_datasets(family, args.datasets.split(",") if args.datasets else None)
        settings = StudySettings(
            family=family,
            datasets=names,
            space=load_space(family, args.space),
            iterations=DEFAULT_ITERATIONS if args.iterations is None else args.iterations,
            eval_every=DEFAULT_EVAL_EVERY if args.eval_every is None else args.eval_every,
            seed=42 if args.seed is None else args.seed,
            fingerprints=dataset_fingerprints(names),
        )
    for name in settings.datasets:  # every value the space can suggest, in a config as the trials build it
        check_values(
            settings.space,
            lambda overrides, name=name: settings.config(name, overrides),
            f"--space {args.space}" if args.space else "the search space",
        )
    return settings


def open_study(storage, study_name: str, settings, attrs: dict | None = None) -> optuna.Study:
    """Create the study or load it; a loaded study must have been made with the same settings.

    `attrs` (user attributes such as the MLflow experiment and the pruner) are recorded at creation, so that
    workers joining later use the same.
    """
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
    recorded = study.user_attrs.get("settings")
    wanted = json.loads(json.dumps(settings.as_dict()))
    if recorded is None:
        study.set_user_attr("settings", wanted)
        study.set_user_attr("created_by", f"studies.run {STUDY_VERSION}")
        for key, value in (attrs or {}).items():
            study.set_user_attr(key, value)
    elif recorded != wanted:
        diff = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        raise ValueError(
            f"study {study_name!r} was started with other settings ({', '.join(diff)} differ); "
            "rerun with the same options, or name a new study with --study"
        )
    return study


def join_study(storage, study_name: str, family: str):
    """Load an existing study for a worker; returns (study, its StudySettings).

    Raises:
        ValueError: no such study, a study not made by studies.run or of another family, or datasets that
            regenerate to other data on this machine than the study recorded.
    """
    from .datasets import dataset_fingerprints, file_fingerprints
    from .objective import StudySettings

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ValueError(
            f"no study {study_name!r} in the storage; create it first (make study FAMILY={family} TRIALS=0 "
            "STORAGE=...) or drop --worker"
        ) from None
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        raise ValueError(f"study {study_name!r} records no settings: it was not created by studies.run")
    settings = StudySettings.from_dict(recorded)
    if settings.family != family:
        raise ValueError(f"study {study_name!r} fits family {settings.family!r}, not {family!r}")
    local = file_fingerprints(settings.data) if settings.data else dataset_fingerprints(settings.datasets)
    differ = [n for n in settings.datasets if settings.fingerprints.get(n, local[n]) != local[n]]
    if differ:
        raise ValueError(
            f"dataset(s) {', '.join(differ)} regenerate to other data on this machine than study "
            f"{study_name!r} recorded; install the same project, numpy and torch versions as the other workers"
        )
    return study, settings


def run_study(args: argparse.Namespace, family: str, settings, tracking_uri: str) -> tuple[StudySummary, bool]:
    """Run one family's study (`settings` None: join it as a worker); returns its summary and whether
    every worker process ended cleanly."""
    import zlib

    from experiments.tracking import log_params, tracked_run

    from .objective import WORKER_TAG, worker_tag

    study_name = args.study.replace("{family}", family)
    storage_url = resolve_storage_url(args.storage)
    storage = open_storage(storage_url, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)
    if args.worker:
        study, settings = join_study(storage, study_name, family)
        recorded = study.user_attrs
        experiment = args.experiment or recorded.get("mlflow_experiment") or f"study-{study_name}"
        pruner = args.pruner or recorded.get("pruner") or "median"
        if recorded.get("mlflow_tracking_uri") not in (None, redact(tracking_uri)):
            log.warning(
                "study %s logs to MLflow at %s, this worker to %s; set MLFLOW_TRACKING_URI to share one server",
                study_name,
                recorded["mlflow_tracking_uri"],
                redact(tracking_uri),
            )
    else:
        experiment = args.experiment or f"study-{study_name}"
        pruner = args.pruner or "median"
        attrs = {"mlflow_experiment": experiment, "pruner": pruner, "mlflow_tracking_uri": redact(tracking_uri)}
        study = open_study(storage, study_name, settings, attrs)
    # known only now: a worker's experiment comes from the study
    storage.heartbeat_stale_trial_callback = StaleTrialHandler(tracking_uri, experiment, args.retries)
    fail_stale_trials(study)  # a worker SIGKILLed in an earlier run leaves RUNNING trials: fail them now
    ended = end_orphan_runs(tracking_uri, experiment)
    if ended:
        log.warning("ended %d MLflow run(s) left open by dead processes", ended)
    start_number = len(study.get_trials(deepcopy=False))
    jobs = max(1, min(args.jobs, args.trials)) if args.trials else 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    timeout = args.timeout or None
    # workers on other hosts start from the same study state: mix this process into the sampler seeds
    seed_base = zlib.crc32(worker_tag().encode()) if args.worker else 0
    start = time.perf_counter()
    clean = True
    kind = "worker" if args.worker else "study"
    tags = {"kind": kind, "study": study_name, "family": family, WORKER_TAG: worker_tag()}
    run_name = f"{study_name} {'worker ' + worker_tag() + ' ' if args.worker else ''}+{args.trials} trials"
    with tracked_run(tracking_uri, experiment, run_name=run_name, tags=tags) as (client, parent_id):
        log_params(
            client,
            parent_id,
            {
                "study": study_name,
                "family": family,
                "storage": redact(storage_url),
                "trials": args.trials,
                "jobs": jobs,
                "timeout": args.timeout,
                "iterations": settings.iterations,
                "eval_every": settings.eval_every,
                "seed": settings.seed,
                "datasets": ",".join(settings.datasets),
                "space": settings.space.describe(),
                "pruner": pruner,
                "sampler": "TPE (multivariate, group)",
                "sampler_seed": args.sampler_seed,
                "worker": args.worker,
                "retries": args.retries,
            },
        )
        shares = [args.trials // jobs + (i < args.trials % jobs) for i in range(jobs)]
        job = WorkerJob(
            storage_url,
            study_name,
            settings,
            shares[0],
            timeout,
            tracking_uri,
            experiment,
            parent_id,
            _sampler_seed(args.sampler_seed, start_number, seed_base),
            pruner,
            threads,
            args.heartbeat_interval,
            args.grace_period,
            jobs > 1 or args.worker,
            args.verbose,
            args.retries,
            max(1, min(args.batch, args.trials or 1)),
        )
        owners = {worker_tag()}  # not every new trial: other invocations may run trials of the study meanwhile
        progress = _Progress(args.trials, study_name, args.progress, start_number, owners)
        try:
            if args.trials == 0:
                pass
            elif jobs == 1:
                optimize(job, callbacks=[progress])
            else:
                workers = [
                    dataclasses.replace(
                        job,
                        n_trials=n,
                        sampler_seed=_sampler_seed(args.sampler_seed, start_number, seed_base + i),
                    )
                    for i, n in enumerate(shares)
                ]
                clean = _run_workers(workers, study, progress)
        finally:
            progress.close()
        wall = time.perf_counter() - start
        added = len([t for t in study.get_trials(deepcopy=False) if progress.mine(t)])
        best_file = write_best(study, settings, Path(args.best_dir))
        summary = summarize(study, settings, added, wall, str(best_file) if best_file else None)
        log_study_artifacts(client, parent_id, study, summary, settings, plots=args.plots)
    return summary, clean


def _run_workers(jobs: list[WorkerJob], study: optuna.Study, progress: _Progress) -> bool:
    """Spawn one process per job, update the bar until all end; False if one died."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow/sqlite state
    procs = [ctx.Process(target=_worker_main, args=(job,), name=f"study-worker-{i}") for i, job in enumerate(jobs)]
    for p in procs:
        p.start()
        if progress.owners is not None:
            progress.owners.add(f"{socket.gethostname()}:{p.pid}")
    try:
        while any(p.is_alive() for p in procs):  # is_alive also reaps a dead worker, so it is no zombie
            progress.update(study)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=10)  # the workers got the same SIGINT: Optuna fails their trials and they exit
            if p.is_alive():
                p.terminate()
        raise
    progress.update(study)
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    for name, code in bad:
        log.error("%s ended with exit status %s; its remaining trials did not run", name, code)
    return not bad


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
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


def fit_best_hint(best_file: str, settings) -> str:
    """How to fit the best parameters again, and on which data (the best file holds a data file's fields,
    but not a named dataset: a study fits several of those)."""
    try:
        best_file = str(Path(best_file).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    if settings.data:
        return f"fit them on the same data: make run CONFIG={best_file}"
    return (
        f"fit them on one of the study's datasets ({', '.join(settings.datasets)}): make run CONFIG={best_file} "
        f"RUN_ARGS='--dataset {settings.datasets[0]}' (without --dataset, make run fits generated data)"
    )


if __name__ == "__main__":
    sys.exit(main())
