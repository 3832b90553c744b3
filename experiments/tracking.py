"""MLflow plumbing: one run per `tracked_run` block that always ends, and batched logging.

    with tracked_run(uri, "gmm", run_name="full seed 42") as (client, run_id):
        log_params(client, run_id, config.flat())
        log_metric_history(client, run_id, "train_nll", history, steps)

The block ends the run FINISHED when it completes, KILLED on Ctrl-C / SIGTERM (a SIGTERM handler that raises
KeyboardInterrupt is installed while the run is open, in the main thread), FAILED on any other exception
(tag `error` = "Type: message", artifact `error.txt` = the traceback), or with the status a `StopRun`
carries (tag `stop_reason`). The exception is re-raised either way. While it is open, a daemon thread refreshes
its heartbeat tag (experiments.stores: a later command ends the run KILLED if its process dies). Tags, params,
the error tag and error.txt go through experiments.redact (no passwords). While the run is being closed, SIGINT
and SIGTERM are held back and re-raised afterwards, so a second Ctrl-C cannot leave the run RUNNING.

Metrics go through `MlflowClient.log_batch`, at most 1000 per call (the store's limit): the SQLite store
writes about 4,000-5,000 metric values per second, so the runner keeps curves to a few hundred points by
default (see experiments.config `log_every`).

Inside `write_behind(uri)` (a study's trial loop), `get_client(uri)` returns an experiments.writer client: a
helper process makes the writes in order while this process fits, and they are all made when the block ends.

MLflow is imported only here and in experiments.run (never in gmm/). Importing this module changes nothing
in the process. `configure_mlflow()` (called by the command-line entry points and by the first `get_client`)
turns MLflow's telemetry off (no network) and bounds its HTTP retries; while `get_client` opens a store, the
store's INFO chatter ("Creating initial MLflow database tables...") and a SQLAlchemy deprecation warning
raised inside MLflow's own models are silenced, and restored after; everything else MLflow says is left alone.
"""

from __future__ import annotations

import functools
import getpass
import logging
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .redact import install_log_redaction, redact, redact_mapping
from .stores import (
    BEAT_TAG,
    HEARTBEAT_SECONDS,
    WRITER_TAG,
    StoreError,  # noqa: F401  (re-exported: what get_client raises)
    heartbeat_tags,
    open_store,
    sqlite_path,
)
from .writer import WriteBehindClient

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_MAX_TAG_CHARS = 5000
_MAX_PARAM_CHARS = 6000
# MLflow 3 opens an experiment on the view of its kind; without this tag it guesses GenAI (traces) and
# hides the runs. Every experiment this project creates holds model-training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class StopRun(Exception):
    """Raised (e.g. by an `on_eval` callback) to end a run early with `status` ("KILLED" by default).

    `tracked_run` and `run_experiment` end the MLflow run with `status`, tag `stop_reason` = `reason`,
    keep what was logged, and re-raise it.
    """

    def __init__(self, reason: str, status: str = "KILLED", tags: Mapping[str, str] | None = None):
        if status not in STATUSES:
            raise ValueError(f"StopRun status must be one of {', '.join(STATUSES)}; got {status!r}")
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.tags = dict(tags or {})  # extra tags set on the run as it ends (e.g. "pruned": where)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db."""
    if uri:
        if not isinstance(uri, str):
            raise TypeError(f"tracking_uri must be a string such as 'sqlite:///mlflow.db'; got {type(uri).__name__}")
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def add_tracking_arguments(parser, experiment: str) -> None:
    """--tracking-uri and --experiment (default `experiment`) on an argparse parser."""
    parser.add_argument(
        "--tracking-uri",
        "--tracking_uri",
        dest="tracking_uri",
        default=None,
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project)",
    )
    parser.add_argument("--experiment", default=experiment, help=f"MLflow experiment [default: {experiment}]")


HTTP_RETRIES = "3"  # MLflow's HTTP retries during a run (its default 7 with back-off takes minutes)
HTTP_TIMEOUT = "20"  # seconds per MLflow HTTP request during a run (default 120)
_STORE_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")  # INFO while a store opens


def start_command() -> None:
    """What an experiments command does first, in its own process: MLflow configured (`configure_mlflow`),
    warnings-level log lines, and credentials redacted from every log line."""
    configure_mlflow()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()


def configure_mlflow() -> None:
    """Process-wide MLflow settings of this project's commands, each unless its variable is set already:

    - $MLFLOW_DISABLE_TELEMETRY=true: no usage reports (runs are often offline). MLflow reads it when it is
      imported, to make its telemetry client, and before each report; `set_telemetry_client` makes it read
      the variable again, which drops a client made at import before any report was sent.
    - $MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT (HTTP_RETRIES, HTTP_TIMEOUT): a tracking server that drops
      out during a long run gets a few tries and then a clear error, not minutes of back-off.

    Called by the command-line entry points at their start and by the first `get_client` (every tracked
    command opens its store through it); idempotent.
    """
    from mlflow.telemetry import set_telemetry_client

    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        set_telemetry_client()
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES), ("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT)):
        os.environ.setdefault(name, value)


@contextmanager
def _quiet_store_opening() -> Iterator[None]:
    """The block without MLflow's and Alembic's INFO lines of a store's creation or upgrade, nor the SQLAlchemy
    deprecation warning MLflow's models raise when they are first mapped; logger levels and warning filters
    are restored after."""
    loggers = [logging.getLogger(name) for name in _STORE_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated.*")
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def get_client(uri: str) -> MlflowClient:
    """One MlflowClient per URI and process, for a store checked, created if new, and swept of dead runs.

    The first call per URI runs experiments.stores.open_store: a dead or silent tracking server, a corrupt,
    half-built or read-only SQLite store raise StoreError (a ValueError, one line) within seconds; a new
    SQLite store is built atomically, safe against signals and against concurrent first use; RUNNING runs of
    dead processes are ended KILLED. Runs `configure_mlflow` first. Inside `write_behind(uri)`, the client
    whose writes a helper process makes.
    """
    return _write_behind.get(uri) or _open_client(uri)


@functools.lru_cache(maxsize=16)
def _open_client(uri: str) -> MlflowClient:
    configure_mlflow()
    with _quiet_store_opening():
        return open_store(uri, lambda u: MlflowClient(tracking_uri=u))


_write_behind: dict[str, WriteBehindClient] = {}


@contextmanager
def write_behind(tracking_uri: str | None = None) -> Iterator[None]:
    """Within the block, a helper process makes the tracking writes to the SQLite store `tracking_uri`
    (experiments.writer); they are all made when the block ends, however it ends. A no-op for a tracking
    server, in a worker process, inside another such block for the same store, or with $GMM_WRITE_BEHIND=0."""
    import multiprocessing

    uri = resolve_tracking_uri(tracking_uri)
    if (
        sqlite_path(uri) is None
        or uri in _write_behind
        or multiprocessing.parent_process() is not None
        or os.environ.get("GMM_WRITE_BEHIND", "1") == "0"
    ):
        yield
        return
    from .unsent import unsent_root

    client = WriteBehindClient(_open_client(uri), uri, unsent_root())
    _write_behind[uri] = client
    completed = False
    try:
        yield
        completed = True
    finally:
        del _write_behind[uri]
        with deferred_signals(reraise=completed):  # a second Ctrl-C does not cut the last writes short
            failed = client.close()
        if failed:
            log.error("%d MLflow writes to %s failed and were kept in %s", failed, redact(uri), client.unsent_file)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None, uri: str | None = None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted).

    With a SQLite store and no `artifact_location`, artifacts go next to the database
    (<db folder>/mlartifacts/<name>) rather than into whatever folder the process runs in. The experiment
    is tagged as a model-training one (EXPERIMENT_KIND_TAG), also when it exists without the tag.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"experiment_name must be a non-empty string; got {name!r}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        if artifact_location is None and uri is not None and (db := sqlite_path(uri)) is not None:
            folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
            artifact_location = (db.resolve().parent / "mlartifacts" / folder).as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version, or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (mlflow.pytorch.log_model / load_model) at `uri` while the block runs.

    The fluent API reads one process-wide URI (and sets $MLFLOW_TRACKING_URI); both are restored after.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


# -- reproducibility --------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def static_tags() -> dict[str, str]:
    """The tags every run of this process gets: git commit and dirty state, versions, platform, user (cached)."""
    import torch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "version.torch": torch.__version__,
        "version.numpy": np.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
        "platform": platform.platform(),
        "mlflow.user": user,
        "mlflow.source.type": "LOCAL",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def repro_tags() -> dict[str, str]:
    """Tags that say how to reproduce a run: git commit and dirtiness, versions, platform, command line.

    The git part is read once per process (two `git` calls); the command line is the exact one that
    started the process (sys.orig_argv).
    """
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return {
        **static_tags(),
        "command": redact(shlex.join(argv))[:_MAX_TAG_CHARS],
        "mlflow.source.name": sys.argv[0] or "-",
    }


# -- signals ----------------------------------------------------------------------------------------------
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While open (main thread only), SIGTERM raises KeyboardInterrupt, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_signals(reraise: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the block runs (main thread only); afterwards, if one arrived and
    `reraise` (pass False while another exception is on its way out), raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and reraise:
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name} (held until a store write was complete)")


# -- the run ----------------------------------------------------------------------------------------------
def _is_pruned(err: BaseException) -> bool:
    # optuna.TrialPruned without importing optuna: a pruned study trial is a deliberate stop, not a failure
    return type(err).__name__ == "TrialPruned"


# (uri, experiment name, artifact location) -> experiment id: a study opens hundreds of runs in one experiment,
# and each lookup is a store query (tracked_run looks the experiment up again when create_run fails)
_experiments: dict[tuple[str, str, str | None], str] = {}


@contextmanager
def tracked_run(
    tracking_uri: str | None = None,
    experiment_name: str = "gmm",
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    artifact_location: str | None = None,
) -> Iterator[tuple[MlflowClient, str]]:
    """Open an MLflow run; yield (client, run_id); always end it (see the module docstring).

    Args:
        tracking_uri: see `resolve_tracking_uri`.
        experiment_name: created when missing (with `artifact_location` when given).
        run_name: the run's display name.
        parent_run_id: nest the run under this one (tag mlflow.parentRunId).
        tags: extra tags, on top of `repro_tags()`.

    Inside `write_behind(uri)` the helper process creates the run, in order with the writes, and `run_id` is a
    stand-in until then: every call through `client` takes it, and `real_run_id(client, run_id)` gives the
    store's id (waiting for the helper to make the run).

    Raises:
        Whatever the block raised, after the run has been ended.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = get_client(uri)
    where = (uri, experiment_name, artifact_location)
    if where not in _experiments:
        _experiments[where] = ensure_experiment(client, experiment_name, artifact_location, uri)
    experiment_id = _experiments[where]
    extra = {k: v[:_MAX_TAG_CHARS] for k, v in redact_mapping(tags or {}).items()}
    all_tags = {**repro_tags(), **extra, **heartbeat_tags()}
    if isinstance(client, WriteBehindClient):
        all_tags[WRITER_TAG] = str(client.pid)
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = str(parent_run_id)
    status, end_tags, error_text, raised = "FINISHED", {}, None, True
    with _sigterm_as_interrupt():
        try:
            if isinstance(client, WriteBehindClient):  # made by the helper: a stand-in id until then
                run_id = client.create_run_later(experiment_id, _now_ms(), all_tags, run_name)
            else:
                run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        except MlflowException:  # the remembered experiment was deleted meanwhile: look it up (restore) again
            _experiments[where] = experiment_id = ensure_experiment(client, experiment_name, artifact_location, uri)
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        beat = None
        try:
            beat = _Heartbeat(client, run_id)
            yield client, run_id
            raised = False
        except StopRun as err:
            status = err.status
            end_tags = {"stop_reason": err.reason[:_MAX_TAG_CHARS], **{k: v[:_MAX_TAG_CHARS] for k, v in err.tags.items()}}
            raise
        except KeyboardInterrupt as err:
            status, end_tags = "KILLED", {"stop_reason": f"interrupted ({err or 'KeyboardInterrupt'})"}
            raise
        except SystemExit as err:
            status, end_tags = "KILLED", {"stop_reason": f"SystemExit({err.code})"}
            raise
        except BaseException as err:
            if _is_pruned(err):  # a pruned trial ran correctly, only shorter: FINISHED, tagged where it stopped
                status, end_tags = "FINISHED", {"pruned": str(err)[:_MAX_TAG_CHARS] or "pruned"}
            else:
                status = "FAILED"
                end_tags = {"error": redact(f"{type(err).__name__}: {err}")[:_MAX_TAG_CHARS]}
                error_text = redact("".join(traceback.format_exception(err)))
            raise
        finally:
            if beat is not None:
                beat.stop()
            with deferred_signals(reraise=not raised):
                _end_run(client, run_id, status, {k: redact(v) for k, v in end_tags.items()}, error_text)


def real_run_id(client: MlflowClient, run_id: str, wait: bool = True) -> str | None:
    """The store's id of a run `tracked_run` opened with `client`: `run_id` itself, except inside
    `write_behind`, where it waits until the helper has made the run (wait=False: None if it has not yet;
    None too when its creation failed, which is kept in the unsent file)."""
    return client.real_id(run_id, wait=wait) if isinstance(client, WriteBehindClient) else run_id


class _Heartbeat:
    """A daemon thread that refreshes an open run's heartbeat tag every HEARTBEAT_SECONDS (see stores)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                self.client.set_tag(self.run_id, BEAT_TAG, f"{time.time():.0f}")
            except Exception as err:  # a store that drops out briefly: the next beat tries again
                log.debug("heartbeat of run %s failed: %s", self.run_id, redact(err))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=HEARTBEAT_SECONDS)


def _end_run(client: MlflowClient, run_id: str, status: str, tags: dict, error_text: str | None) -> None:
    try:
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if error_text is not None:
            client.log_text(run_id, error_text, "error.txt")
    except Exception as err:  # never let a logging problem keep the run open
        log.warning("could not record why run %s ended: %s", run_id, _one_line(err))
    try:
        # the end as this process saw it (a write-behind helper may make it later)
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)), end_time=_now_ms())
    except Exception as err:  # the store is gone: the heartbeat lets the next command on it end the run
        log.warning("could not end run %s (%s); the next command on this store ends it KILLED", run_id, _one_line(err))


def _one_line(err: BaseException) -> str:
    return redact(" ".join(str(err).split()))[:300] or type(err).__name__


# -- batched logging --------------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def log_metrics_batched(client: MlflowClient, run_id: str, metrics: Sequence[Metric]) -> int:
    """Log prepared `Metric`s in batches of at most 1000 (one store transaction each); returns the count."""
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=list(metrics[start : start + MAX_METRICS_PER_BATCH]))
    return len(metrics)


def history_metrics(
    key: str, values: Iterable[float], steps: Iterable[int], timestamps: Iterable[int] | None = None
) -> list[Metric]:
    """Metric entities for one curve: values[i] at steps[i] (timestamps in ms, default now)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    if values.shape != steps.shape:
        raise ValueError(f"{key}: {values.size} values but {steps.size} steps; pass one step per value")
    if timestamps is None:
        stamps = np.full(steps.shape, _now_ms(), dtype=np.int64)
    else:
        stamps = np.asarray(timestamps, dtype=np.int64).reshape(-1)
        if stamps.shape != steps.shape:
            raise ValueError(f"{key}: {stamps.size} timestamps for {steps.size} steps")
    return [Metric(key, v, t, s) for v, t, s in zip(values.tolist(), stamps.tolist(), steps.tolist(), strict=True)]


def log_metric_history(
    client: MlflowClient,
    run_id: str,
    key: str,
    values: Iterable[float],
    steps: Iterable[int],
    timestamps: Iterable[int] | None = None,
) -> int:
    """Log a whole curve of metric `key` in batches (MlflowClient.log_batch, <= 1000 per call)."""
    return log_metrics_batched(client, run_id, history_metrics(key, values, steps, timestamps))


def log_curve(
    client: MlflowClient, run_id: str, key: str, values: Sequence[float], steps: Sequence[int], timestamp: int | None = None
) -> int:
    """Log a whole curve of metric `key` (values[i] at steps[i], all at `timestamp` ms, default now), like
    `log_metric_history`; with a write-behind client its helper builds the entities (experiments.writer
    `later`), so this process only sends the numbers. Returns the number of points."""
    values = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    steps = np.asarray(steps, dtype=np.int64).reshape(-1).tolist()
    if len(values) != len(steps):
        raise ValueError(f"{key}: {len(values)} values but {len(steps)} steps; pass one step per value")
    stamp = _now_ms() if timestamp is None else int(timestamp)
    if isinstance(client, WriteBehindClient):
        client.later(_log_curve_now, run_id, key, values, steps, stamp)
    else:
        _log_curve_now(client, run_id, key, values, steps, stamp)
    return len(values)


def _log_curve_now(client: MlflowClient, run_id: str, key: str, values: list, steps: list, stamp: int) -> None:
    log_metric_history(client, run_id, key, values, steps, [stamp] * len(values))


def csv_text(columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """`rows` as CSV text under a header of `columns`."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def log_csv(client: MlflowClient, run_id: str, columns: Sequence[str], rows: Sequence[tuple], artifact_file: str) -> None:
    """The table `rows` (tuples of plain values) as the CSV artifact `artifact_file`; with a write-behind client
    its helper writes the text (experiments.writer `later`)."""
    if isinstance(client, WriteBehindClient):
        client.later(_log_csv_now, run_id, tuple(columns), list(rows), artifact_file)
    else:
        _log_csv_now(client, run_id, columns, rows, artifact_file)


def _log_csv_now(client: MlflowClient, run_id: str, columns: Sequence[str], rows: Sequence[tuple], artifact_file: str):
    client.log_text(run_id, csv_text(columns, rows), artifact_file)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> int:
    """Log several scalar metrics at one step in one batch (None values are skipped)."""
    now = _now_ms()
    entities = [Metric(str(k), float(v), now, step) for k, v in metrics.items() if v is not None]
    return log_metrics_batched(client, run_id, entities)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, object]) -> None:
    """Log params as strings (None -> "None", credentials redacted), at most 100 per call; long values are
    truncated."""
    items = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in redact_mapping(params).items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def finite_or_none(value: float | None) -> float | None:
    """`value` when it is a finite number, else None (so it is not logged)."""
    return value if value is not None and math.isfinite(value) else None
