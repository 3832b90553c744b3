"""MLflow plumbing: one run per `tracked_run` block that always ends, and batched logging.

    with tracked_run(uri, "gmm", run_name="full seed 42") as (client, run_id):
        log_params(client, run_id, config.flat())
        log_metric_history(client, run_id, "train_nll", history, steps)

The block ends the run FINISHED when it completes, KILLED on Ctrl-C / SIGTERM (a SIGTERM handler that raises
KeyboardInterrupt is installed while the run is open, in the main thread), FAILED on any other exception
(tag `error` = "Type: message", artifact `error.txt` = the traceback), or with the status a `StopRun`
carries (tag `stop_reason`). The exception is re-raised either way. While the run is being closed, SIGINT
and SIGTERM are held back and re-raised afterwards, so a second Ctrl-C cannot leave the run RUNNING.

Metrics go through `MlflowClient.log_batch`, at most 1000 per call (the store's limit): the SQLite store
writes about 4,000-5,000 metric values per second, so the runner keeps curves to a few hundred points by
default (see experiments.config `log_every`).

MLflow is imported only here and in experiments.run (never in gmm/). Telemetry is turned off (no network),
and the store's INFO chatter ("Creating initial MLflow database tables...") and a SQLAlchemy deprecation
warning raised inside MLflow's own models are silenced; everything else MLflow says is left alone.
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

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent first use of a new SQLite store is not serialized
    fcntl = None

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports: runs are often offline
warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated.*")
for _name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

import mlflow  # noqa: E402  (after the environment and logging setup above)
import numpy as np  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_MAX_TAG_CHARS = 5000
_MAX_PARAM_CHARS = 6000


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, or None for other stores (and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder of a SQLite store while its tables may be created.

    MLflow creates and migrates the tables of a fresh SQLite database on first use, without a lock:
    two processes opening the same new store at once (a run and a UI, two study workers) make all
    but one fail inside Alembic ("Online migration expected to match one row ...", or a UNIQUE
    constraint). Locking the folder (flock, no lock file left behind) makes them take turns; later
    openings, which find the tables, pass straight through.
    """
    db = sqlite_path(uri)
    if db is None or fcntl is None:
        yield
        return
    folder = db.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)  # MLflow would create it too, after the race
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@functools.lru_cache(maxsize=16)
def get_client(uri: str) -> MlflowClient:
    """One MlflowClient per URI and process (creating one opens the store, creating its tables if new).

    Safe to call from several processes at once on a new SQLite store (see `_store_init_lock`).
    """
    with _store_init_lock(uri):
        return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None, uri: str | None = None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted).

    With a SQLite store and no `artifact_location`, artifacts go next to the database
    (<db folder>/mlartifacts/<name>) rather than into whatever folder the process runs in.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"experiment_name must be a non-empty string; got {name!r}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        if artifact_location is None and uri is not None and (db := sqlite_path(uri)) is not None:
            folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
            artifact_location = (db.resolve().parent / "mlartifacts" / folder).as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# -- reproducibility --------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def _static_tags() -> dict[str, str]:
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
        **_static_tags(),
        "command": shlex.join(argv)[:_MAX_TAG_CHARS],
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
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name} (held while closing a run)")


# -- the run ----------------------------------------------------------------------------------------------
def _is_pruned(err: BaseException) -> bool:
    # optuna.TrialPruned without importing optuna: a pruned study trial is a deliberate stop, not a failure
    return type(err).__name__ == "TrialPruned"


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

    Raises:
        Whatever the block raised, after the run has been ended.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = get_client(uri)
    experiment_id = ensure_experiment(client, experiment_name, artifact_location, uri)
    all_tags = {**repro_tags(), **{str(k): str(v)[:_MAX_TAG_CHARS] for k, v in (tags or {}).items()}}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = str(parent_run_id)
    status, end_tags, error_text, raised = "FINISHED", {}, None, True
    with _sigterm_as_interrupt():
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        try:
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
                end_tags = {"error": f"{type(err).__name__}: {err}"[:_MAX_TAG_CHARS]}
                error_text = "".join(traceback.format_exception(err))
            raise
        finally:
            with deferred_signals(reraise=not raised):
                _end_run(client, run_id, status, end_tags, error_text)


def _end_run(client: MlflowClient, run_id: str, status: str, tags: dict, error_text: str | None) -> None:
    try:
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if error_text is not None:
            client.log_text(run_id, error_text, "error.txt")
    except Exception:  # never let a logging problem keep the run open
        log.exception("could not record why run %s ended", run_id)
    finally:
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


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


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> int:
    """Log several scalar metrics at one step in one batch (None values are skipped)."""
    now = _now_ms()
    entities = [Metric(str(k), float(v), now, step) for k, v in metrics.items() if v is not None]
    return log_metrics_batched(client, run_id, entities)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, object]) -> None:
    """Log params as strings (None -> "None"), at most 100 per call; long values are truncated."""
    items = [Param(str(k), ("None" if v is None else str(v))[:_MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def finite_or_none(value: float | None) -> float | None:
    """`value` when it is a finite number, else None (so it is not logged)."""
    return value if value is not None and math.isfinite(value) else None
