"""A study's workers: the trial loop of one process (`optimize`, batched with heartbeats) and the spawned pool.

`optimize(job)` runs in the main process for one job (and restores torch's thread count after), or in each
spawned process of `run_workers` (`--jobs N`). A batch of trials (`--batch`) is asked at once, fit as
populations and told one by one, with a thread recording the batch's heartbeats (studies.storage).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from experiments.tracking import write_behind

from .logs import configure_logging
from .progress import Progress
from .sampling import make_pruner, make_sampler
from .stale import StaleTrialHandler
from .storage import fail_stale_trials, open_storage, trial_id

log = logging.getLogger(__name__)


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


def optimize(job: WorkerJob, callbacks: list | None = None) -> None:
    """Run `job.n_trials` trials (or until `job.timeout`) of the study in this process, with torch's thread
    count (process-wide) set to `job.threads` and restored after."""
    import torch

    from .objective import Objective, TrialFailed

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
    with contextlib.ExitStack() as restore:
        restore.enter_context(write_behind(job.tracking_uri))  # a helper process makes the MLflow writes
        restore.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(job.threads)
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
        storage.record_heartbeat(trial_id(storage, trial))


@contextlib.contextmanager
def _heartbeats(storage, trials: list, interval: int) -> Iterator[None]:
    """Record a heartbeat for every trial of a batch now and every `interval` seconds until the block ends (what
    `study.optimize` does for its one running trial), so that a killed worker's batch is failed as stale."""
    if not hasattr(storage, "record_heartbeat") or not interval:
        yield
        return
    stop = threading.Event()
    ids = [trial_id(storage, t) for t in trials]

    def beat() -> None:
        while True:
            for tid in ids:
                try:
                    storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001  (a missed beat is retried at the next interval)
                    log.debug("heartbeat of trial %d failed", tid, exc_info=True)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="trial-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def worker_main(job: WorkerJob) -> None:
    """Entry point of a spawned worker process (it inherits the parent's environment: MLflow telemetry is off)."""
    configure_logging(job.verbose)
    try:
        optimize(job)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(jobs: list[WorkerJob], study: optuna.Study, progress: Progress) -> bool:
    """Spawn one process per job, update the bar until all end; False if one died."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow/sqlite state
    procs = [ctx.Process(target=worker_main, args=(job,), name=f"study-worker-{i}") for i, job in enumerate(jobs)]
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
