"""MLflow runs left open by a dead worker: end them KILLED, and the storage's stale-trial callback."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)


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
