"""One study of one family: create it (or join it as a worker), run its trials under one MLflow parent run,
then write the best-parameter file, the summary and the study's artifacts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
import zlib
from pathlib import Path

import optuna

from experiments.redact import redact

from . import STUDY_VERSION
from .artifacts import log_study_artifacts
from .progress import Progress
from .sampling import sampler_seed
from .stale import StaleTrialHandler, end_orphan_runs
from .storage import fail_stale_trials, open_storage, resolve_storage_url
from .summary import StudySummary, summarize, write_best
from .worker import WorkerJob, optimize, run_workers

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class _Opened:
    """A study ready to run: its settings, and the MLflow experiment and pruner it records."""

    study: optuna.Study
    settings: object  # studies.objective.StudySettings
    experiment: str
    pruner: str


def _open(args: argparse.Namespace, storage, study_name: str, family: str, settings, tracking_uri: str) -> _Opened:
    """Create or resume the study (`settings` given), or join it as a worker (`--worker`: the study's own)."""
    if not args.worker:
        experiment = args.experiment or f"study-{study_name}"
        pruner = args.pruner or "median"
        attrs = {"mlflow_experiment": experiment, "pruner": pruner, "mlflow_tracking_uri": redact(tracking_uri)}
        return _Opened(open_study(storage, study_name, settings, attrs), settings, experiment, pruner)
    study, settings = join_study(storage, study_name, family)
    recorded = study.user_attrs
    if recorded.get("mlflow_tracking_uri") not in (None, redact(tracking_uri)):
        log.warning(
            "study %s logs to MLflow at %s, this worker to %s; set MLFLOW_TRACKING_URI to share one server",
            study_name,
            recorded["mlflow_tracking_uri"],
            redact(tracking_uri),
        )
    experiment = args.experiment or recorded.get("mlflow_experiment") or f"study-{study_name}"
    return _Opened(study, settings, experiment, args.pruner or recorded.get("pruner") or "median")


def _parent_params(args: argparse.Namespace, opened: _Opened, storage_url: str, jobs: int) -> dict:
    """The params of the invocation's parent MLflow run."""
    settings = opened.settings
    return {
        "study": opened.study.study_name,
        "family": settings.family,
        "storage": redact(storage_url),
        "trials": args.trials,
        "jobs": jobs,
        "timeout": args.timeout,
        "iterations": settings.iterations,
        "eval_every": settings.eval_every,
        "seed": settings.seed,
        "datasets": ",".join(settings.datasets),
        "space": settings.space.describe(),
        "pruner": opened.pruner,
        "sampler": "TPE (multivariate, group)",
        "sampler_seed": args.sampler_seed,
        "worker": args.worker,
        "retries": args.retries,
    }


def _run_trials(args: argparse.Namespace, job: WorkerJob, jobs: int, study: optuna.Study, progress: Progress) -> bool:
    """Run the invocation's trials in this process (one job) or in `jobs` spawned workers; False if one died."""
    if args.trials == 0:
        return True
    if jobs == 1:
        optimize(job, callbacks=[progress])
        return True
    start_number = progress.start_number
    seed_base = _seed_base(args.worker)
    shares = _shares(args.trials, jobs)
    workers = [
        dataclasses.replace(job, n_trials=n, sampler_seed=sampler_seed(args.sampler_seed, start_number, seed_base + i))
        for i, n in enumerate(shares)
    ]
    return run_workers(workers, study, progress)


def _shares(trials: int, jobs: int) -> list[int]:
    """`trials` split as evenly as possible over `jobs` workers."""
    return [trials // jobs + (i < trials % jobs) for i in range(jobs)]


def _seed_base(worker: bool) -> int:
    """Workers on other hosts start from the same study state: mix this process into their sampler seeds."""
    from .objective import worker_tag

    return zlib.crc32(worker_tag().encode()) if worker else 0


def run_study(args: argparse.Namespace, family: str, settings, tracking_uri: str) -> tuple[StudySummary, bool]:
    """Run one family's study (`settings` None: join it as a worker); returns its summary and whether
    every worker process ended cleanly."""
    from experiments.tracking import log_params, tracked_run

    from .objective import WORKER_TAG, worker_tag

    study_name = args.study.replace("{family}", family)
    storage_url = resolve_storage_url(args.storage)
    storage = open_storage(storage_url, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)
    opened = _open(args, storage, study_name, family, settings, tracking_uri)
    study, settings = opened.study, opened.settings
    # known only now: a worker's experiment comes from the study
    storage.heartbeat_stale_trial_callback = StaleTrialHandler(tracking_uri, opened.experiment, args.retries)
    fail_stale_trials(study)  # a worker SIGKILLed in an earlier run leaves RUNNING trials: fail them now
    ended = end_orphan_runs(tracking_uri, opened.experiment)
    if ended:
        log.warning("ended %d MLflow run(s) left open by dead processes", ended)
    start_number = len(study.get_trials(deepcopy=False))
    jobs = max(1, min(args.jobs, args.trials)) if args.trials else 1
    start = time.perf_counter()
    tags = {"kind": "worker" if args.worker else "study", "study": study_name, "family": family, WORKER_TAG: worker_tag()}
    run_name = f"{study_name} {'worker ' + worker_tag() + ' ' if args.worker else ''}+{args.trials} trials"
    with tracked_run(tracking_uri, opened.experiment, run_name=run_name, tags=tags) as (client, parent_id):
        log_params(client, parent_id, _parent_params(args, opened, storage_url, jobs))
        job = WorkerJob(
            storage_url=storage_url,
            study_name=study_name,
            settings=settings,
            n_trials=_shares(args.trials, jobs)[0],
            timeout=args.timeout or None,
            tracking_uri=tracking_uri,
            experiment=opened.experiment,
            parent_run_id=parent_id,
            sampler_seed=sampler_seed(args.sampler_seed, start_number, _seed_base(args.worker)),
            pruner=opened.pruner,
            threads=args.threads or max(1, (os.cpu_count() or 1) // jobs),
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
            parallel=jobs > 1 or args.worker,
            verbose=args.verbose,
            retries=args.retries,
            batch=max(1, min(args.batch, args.trials or 1)),
        )
        owners = {worker_tag()}  # not every new trial: other invocations may run trials of the study meanwhile
        progress = Progress(args.trials, study_name, args.progress, start_number, owners)
        try:
            clean = _run_trials(args, job, jobs, study, progress)
        finally:
            progress.close()
        wall = time.perf_counter() - start
        added = len([t for t in study.get_trials(deepcopy=False) if progress.mine(t)])
        best_file = write_best(study, settings, Path(args.best_dir))
        summary = summarize(study, settings, added, wall, str(best_file) if best_file else None)
        log_study_artifacts(client, parent_id, study, summary, settings, plots=args.plots)
    return summary, clean
