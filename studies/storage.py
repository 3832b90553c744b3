"""Where studies live: storage URLs, and heartbeats so that a dead worker's trial does not stay RUNNING.

Storage forms (`--storage`):
    (none)                   the journal file <project root>/studies.log (the default)
    PATH.log, journal:PATH   an Optuna journal file (JournalFileBackend: appends under a file lock, so several
                             worker processes on one machine share a study without "database is locked")
    sqlite:///FILE.db        an Optuna RDB storage (also postgresql+psycopg://user@host/db, mysql://...);
                             postgresql://... means postgresql+psycopg://... when psycopg2 is not installed
                             (the `postgres` extra installs psycopg 3, SQLAlchemy's default is psycopg2)

Both kinds record a heartbeat for every running trial (every `heartbeat_interval` seconds) and the host:pid of
the process running it. `fail_stale_trials` (called when a study starts, and by Optuna before every trial)
fails a RUNNING trial whose worker is a dead process on this host, or whose heartbeat is older than
`grace_period` seconds (a worker on another host). Optuna 5's JournalStorage has no heartbeat of its own, so
`HeartbeatJournalStorage` adds one (timestamps in trial system attributes).

`retry_stale_trial` (run by studies.stale.StaleTrialHandler with `--retries N`) puts a failed stale trial
back in the queue as a WAITING copy of its parameters, which the next free worker of any host picks up.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage

# Private Optuna API, needed: Optuna's public heartbeat machinery (`study.optimize`'s heartbeat thread and
# `optuna.storages.fail_stale_trials`) works only on a storage that subclasses `_heartbeat.BaseHeartbeat` and
# asks it `_get_stale_trial_ids(study_id)`; no public class or hook adds heartbeats to JournalStorage or
# dead-process detection to RDBStorage. tests/test_studies.py::test_optuna_private_heartbeat_api fails with
# a message naming these when an Optuna release changes them.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from experiments.redact import redact
from experiments.stores import process_alive

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = str(PROJECT_ROOT / "studies.log")
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
HEARTBEAT_INTERVAL = 5  # seconds between heartbeats of a running trial
CONNECT_TIMEOUT = 3  # seconds per connection attempt to a database server (libpq may try twice)
GRACE_PERIOD = 60  # seconds without a heartbeat before another host's RUNNING trial counts as dead
OWNER_KEY = "studies:worker"  # trial system attr: "<host>:<pid>" of the process running the trial
BEAT_KEY = "studies:heartbeat"  # trial system attr (journal storage): unix time of the last heartbeat

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def resolve_storage_url(url: str | None = None) -> str:
    """`url`, else $OPTUNA_STORAGE, else the default journal file <project root>/studies.log."""
    return url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE


def sqlalchemy_url(url: str) -> str:
    """`url` with postgresql:// (or postgres://) turned into postgresql+psycopg:// when psycopg2 is missing.

    SQLAlchemy reads a bare postgresql:// as the psycopg2 driver; this project installs psycopg 3.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    return url


def journal_path(url: str) -> Path | None:
    """The journal file named by `url` (PATH.log or journal:PATH), or None for an RDB URL."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    return None


def worker_tag() -> str:
    """ "<host>:<pid>" of this process: what OWNER_KEY holds for the trials it runs (and the MLflow tag
    studies.objective.WORKER_TAG of its runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _OwnedTrials:
    """Mixin for heartbeat storages: record which process runs each trial; fail trials of dead processes."""

    grace_period: int | None
    heartbeat_interval: int | None
    heartbeat_stale_trial_callback: StaleCallback | None

    def _owned(self) -> set[int]:
        """The ids of the trials this process recorded itself as the owner of."""
        return self.__dict__.setdefault("_owned_trial_ids", set())

    def _record_owner(self, trial_id: int) -> None:
        owned = self._owned()
        if trial_id not in owned:
            self.set_trial_system_attr(trial_id, OWNER_KEY, worker_tag())
            owned.add(trial_id)

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        """Optuna's, with this process as the owner in the same record: a worker killed while it asks for a
        trial (with --batch, for the batch's trials) leaves no ownerless trial. Written in a second record,
        a SIGKILL between the two left a RUNNING trial that only the grace period could end."""
        if template_trial is None:  # study.ask's new trial: what Optuna creates, plus the owner
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(UTC),
                datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={OWNER_KEY: worker_tag()},
                intermediate_values={}, trial_id=-1,
            )  # fmt: skip
            trial_id = super().create_new_trial(study_id, template_trial)
            self._owned().add(trial_id)
            return trial_id
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial.state == TrialState.RUNNING:
            self._record_owner(trial_id)
        return trial_id

    def _dead_owner_trial_ids(self, study_id: int) -> dict[int, str]:
        host = socket.gethostname()
        dead: dict[int, str] = {}
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.system_attrs.get(OWNER_KEY)
            if not isinstance(owner, str) or ":" not in owner:
                continue
            owner_host, pid = owner.rsplit(":", 1)
            if owner_host == host and pid.isdigit() and not process_alive(int(pid)):
                dead[self.get_trial_id_from_study_id_trial_number(study_id, trial.number)] = (
                    f"worker process {pid} died while the trial was running"
                )
        return dead

    def _mark_stale(self, reasons: dict[int, str]) -> list[int]:
        for trial_id, reason in reasons.items():
            try:  # the reason shows in trials.csv and the dashboard
                self.set_trial_user_attr(trial_id, "fail_reason", reason)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        return list(reasons)

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self.heartbeat_stale_trial_callback


class HeartbeatJournalStorage(_OwnedTrials, JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage plus heartbeats (as trial system attributes) and dead-worker detection."""

    def __init__(
        self,
        backend,
        heartbeat_interval: int = HEARTBEAT_INTERVAL,
        grace_period: int | None = GRACE_PERIOD,
        heartbeat_stale_trial_callback: StaleCallback | None = None,
    ):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._record_owner(trial_id)
            self.set_trial_system_attr(trial_id, BEAT_KEY, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed as stale by another process meanwhile: nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # BaseHeartbeat's private hook (see the imports)
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        reasons = self._dead_owner_trial_ids(study_id)
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(BEAT_KEY)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()  # killed before its first heartbeat
            if beat is not None and now - beat > grace:
                tid = self.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                reasons.setdefault(tid, f"no heartbeat for {now - beat:.0f} s (grace period {grace} s)")
        return self._mark_stale(reasons)


class HeartbeatRDBStorage(_OwnedTrials, RDBStorage):
    """Optuna's RDBStorage (which has heartbeats) plus dead-worker detection on this host."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._record_owner(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        super().record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # BaseHeartbeat's private hook (see the imports)
        reasons = self._dead_owner_trial_ids(study_id)
        for tid in super()._get_stale_trial_ids(study_id):
            reasons.setdefault(tid, f"no heartbeat within the grace period ({self.grace_period} s)")
        return self._mark_stale(reasons)


def trial_id(storage: BaseStorage, trial: optuna.Trial) -> int:
    """The storage's id of `trial` (what `record_heartbeat` and the other storage calls take), by public calls."""
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def _open_journal(url: str, path: Path, heartbeat_interval: int, grace_period: int, stale_callback) -> BaseStorage:
    """The journal-file storage at `path` (`url` names it in messages); ValueError as `open_storage` says."""
    if not path.parent.is_dir():
        raise ValueError(f"storage {url!r}: folder {str(path.parent)!r} does not exist; create it or fix the path")
    try:
        backend = JournalFileBackend(str(path))
    except OSError as e:
        raise ValueError(
            f"storage {url!r}: cannot open the journal file: {e.strerror or e}; check its permissions and "
            "those of its folder, or give another --storage"
        ) from None
    try:  # replays the whole journal: a corrupt record fails here, not mid-study
        return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, stale_callback)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(
            f"study journal {str(path)!r} is corrupt ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            f"restore it from a backup, or move it away (mv {path} {path}.corrupt) to start a new one"
        ) from None


def open_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    stale_callback: StaleCallback | None = None,
) -> BaseStorage:
    """The Optuna storage named by `url` (see the module docstring), with heartbeats on.

    Raises:
        ValueError: an unknown URL form, a missing folder, or a database that cannot be opened.
    """
    url = resolve_storage_url(url)
    path = journal_path(url)
    if path is not None:
        return _open_journal(url, path, heartbeat_interval, grace_period, stale_callback)
    if "://" not in url:
        raise ValueError(
            f"unknown storage {redact(url)!r}; use a journal file (PATH.log or journal:PATH), sqlite:///FILE.db, "
            "or another SQLAlchemy URL (postgresql://user@host/db)"
        )
    import sqlalchemy.exc

    url = sqlalchemy_url(url)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:  # a server: drop connections the server or a firewall closed while a long trial ran
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith(("postgresql", "postgres", "mysql")):  # a dead or silent server fails in seconds
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return HeartbeatRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_callback,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            redact(
                f"cannot open storage {url!r}: {first}; check that the database server runs, the host, port, user "
                "and database name, or give another --storage"
            )
        ) from None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the study's RUNNING trials whose worker died (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int) -> bool:
    """Queue a WAITING copy of `trial` (failed as stale) unless it was retried `max_retry` times already.

    Optuna's RetryHeartbeatStaleTrialCallback (RetryFailedTrialCallback before 4.9), minus what belongs to
    the dead run: this module's owner and heartbeat system attributes (a copy carrying the dead owner would be
    failed again at once) and the user attributes (measurements of the failed run). Its static
    `retried_trial_number(t)` and `retry_history(t)` work on the copy. Returns whether a copy was queued.
    """
    import copy

    try:  # Optuna >= 4.9 renamed it
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:
        from optuna.storages import RetryFailedTrialCallback as Retry

    clean = copy.deepcopy(trial)
    clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("studies:")}
    clean.user_attrs = {}
    if len(trial.system_attrs.get("retry_history", [])) >= max_retry:
        return False  # the callback's own rule, checked here so the caller knows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        Retry(max_retry=max_retry)(study, clean)
    return True
