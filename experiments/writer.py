"""Write-behind tracking: a helper process makes the MLflow writes of a study's runs while this process fits
the next ones (studies.worker's trial loop; reports and single runs write themselves).

A batched study spends about a quarter of its trials phase in MLflow's SQLite store (about 70 ms of
SQLAlchemy work per run: its creation, curve, events.csv, tags, its end), all of it in the one thread that
also fits, while the second core idles: a small fit runs in one thread. Within
`experiments.tracking.write_behind(uri)`, `get_client(uri)` returns a `WriteBehindClient`: the writes
(`WRITES`) are sent through a pipe to a helper process, which makes them in order with its own MlflowClient;
the rest is called here, and every read first waits for the writes sent before it (so a read sees them).

- **Runs, too, are created by the helper** (`create_run_later`, which tracking.tracked_run uses inside the
  block): this process gets a stand-in id at once and goes on fitting. Every call through the client maps a
  stand-in to its run's id (a write in the helper, a read or direct call here, which first waits for the
  run to be made), and `real_id` gives the store's id to whatever keeps it elsewhere (a study's trial
  attribute `mlflow_run_id`). The run's start time is the one this process asked for, and its end time too
  (tracking passes `end_time`), so a run lasts in the store what it lasted here.
- **Writes whose entities the helper builds** (`later(fn, *args)`): a curve is sent as its numbers and
  events.csv as its rows; the helper makes the Metric entities and the CSV text (tracking.log_curve, log_csv).

What it keeps (tests/test_writer.py):
- **Order and completeness.** One pipe, one helper, one call at a time: the store receives the writes in the
  order they were made; `drain()` returns once every write sent before it is made. A run is ended by its
  `set_terminated`, which comes after the run's other writes.
- **A killed parent loses nothing it sent.** A write is in the pipe (the kernel's buffer) when its call
  returns here; if this process dies (SIGKILL included), the helper makes what the pipe holds, then exits.
  The helper runs in its own session, so Ctrl-C at the terminal reaches only this process, which ends its
  runs KILLED through the helper (it also ignores SIGINT and SIGTERM sent to it). When the parent dies, the
  helper ends KILLED the runs it created that are still open (tag stop_reason: the process died); runs the
  parent created itself are ended KILLED by the next command (heartbeats).
- **A failed write is kept, not dropped.** The helper retries a write that fails once, then logs one line
  and appends it to `<unsent dir>/writes-<pid>.jsonl` (experiments.unsent's folder), to be read by hand;
  after 3 failures in a row it stops retrying until a write succeeds again. The run itself still ends
  as its fit did (its record in the store is then incomplete: the file has the rest), and the block's end
  logs how many writes were kept.
- **A helper that dies** (killed on its own, or before it started): this process keeps every write until the
  helper acknowledges it, so the next call here notices, logs one line, makes the unacknowledged writes
  itself and every later one (keeping those that fail, as the helper would). The helper acknowledges every
  ACK_EVERY writes while it is behind, so up to that many writes it had made may be made twice (a curve point
  twice, a tag set again); it acknowledges a new run at once, so a run is made twice only if the helper died
  between making it and saying so. A helper whose pipe fails while it still runs is killed first.
- **A run whose creation failed** (after the retry) has its create_run kept in the unsent file like any
  failed write; the writes to it are kept there too, without a try, and `real_id` gives None for it.
- **Messages are whole.** SIGINT and SIGTERM are held back while a message is written to the pipe or a reply
  read from it, and while the unacknowledged writes of a dead helper are made.

Only SQLite stores, and only in the process that owns the block: a worker process of `--jobs` writes itself
(it has its own core), and so does a tracking server (HTTP: its own retries and keep-locally rules apply).
$GMM_WRITE_BEHIND=0 turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# the MlflowClient methods the helper makes; they return nothing the caller uses
WRITES = frozenset(
    {"log_batch", "log_text", "log_dict", "log_inputs", "log_param", "log_metric", "set_tag", "delete_tag", "set_terminated"}
)
# called here without waiting: they neither read nor depend on what a pending write changes (a run's artifact
# location, an experiment, a new run id)
DIRECT = frozenset(
    {"create_run", "create_experiment", "get_experiment", "get_experiment_by_name", "restore_experiment",
     "search_experiments", "log_artifact", "log_artifacts", "log_figure", "log_image"}
)  # fmt: skip
_DRAIN, _CLOSE, _CALL, _CREATE = "__drain__", "__close__", "__call__", "__create__"  # see _Maker
STAND_IN = "stand-in-"  # the start of the ids `create_run_later` hands out before the helper made the run
RETRY_SECONDS = 1.0
FAILING = 3  # writes failed in a row after which the helper stops retrying (see serve)


class WriteBehindClient:
    """An MlflowClient whose writes a helper process makes (see the module docstring)."""

    def __init__(self, client, uri: str, unsent_dir: Path):
        from multiprocessing.connection import Connection

        self._client = client
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._path = path = Path(unsent_dir) / f"writes-{os.getpid()}.jsonl"
        # its own interpreter (no forked SQLite connections, none of this program's imports); stdin and stdout
        # are its pipes, its stderr is ours; its own session: Ctrl-C at the terminal reaches this process only
        # (which ends its runs KILLED through the helper), also while the helper is still starting
        command = [sys.executable, "-m", "experiments.writer", uri, str(path), str(os.getpid()), str(RETRY_SECONDS)]
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
        )  # fmt: skip
        _widen(self._proc.stdin)
        self._send = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._replies = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._lock = threading.RLock()  # the heartbeat threads write too
        self._seq = 0
        self._pending: collections.deque = collections.deque()  # (seq, name, args, kwargs) sent, not yet made
        self._failed = self._reported = 0  # writes failed (made nowhere but the unsent file) / returned by drain
        self._alive = True
        self._maker = _Maker(client, path)  # the stand-in ids the helper made, and what makes writes here
        self._creates: dict[str, int] = {}  # stand-in id -> the number of its create message

    @property
    def pid(self) -> int:
        """The helper's process id (runs record it: experiments.stores keeps them open while it writes)."""
        return self._proc.pid

    @property
    def unsent_file(self) -> Path:
        """Where writes that failed are kept (one JSON line each)."""
        return self._path

    def __getattr__(self, name: str):
        if name.startswith("_"):  # this object's own state (copy, pickle and hasattr look for these)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if name in WRITES:
            return functools.partial(self._write, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            if name not in DIRECT:
                self.drain()  # a read sees every write sent before it
            args = tuple(self._made(a) for a in args)
            kwargs = {k: self._made(v) for k, v in kwargs.items()}
            if isinstance(kwargs.get("tags"), dict):  # create_run's parent
                kwargs["tags"] = {k: self._made(v) for k, v in kwargs["tags"].items()}
            return attr(*args, **kwargs)

        return call

    def _made(self, value):
        """`value`, or for a stand-in id its run's id; raises MlflowException when that run was not created."""
        if not _is_stand_in(value):
            return value
        real = self.real_id(value)
        if real is None:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

            raise MlflowException(f"run {value} was not created (see {self._path})", RESOURCE_DOES_NOT_EXIST)
        return real

    def _write(self, name: str, *args, **kwargs) -> int | None:
        """Send a write (returns its number), or make it here when the helper is gone (returns None; a write that
        fails here is kept and counted as the helper would)."""
        with self._lock:
            if self._alive:
                try:
                    self._collect()
                except (EOFError, OSError):
                    self._lost()
            if self._alive:
                try:
                    return self._post(name, args, kwargs)
                except (EOFError, OSError):
                    self._lost()  # it makes this write too: it was kept before the send failed
                    return None
            self._failed += not self._maker.make(name, args, kwargs)
        return None

    def _post(self, name: str, args: tuple = (), kwargs: dict | None = None) -> int:
        """Send one message whole (a signal cannot cut it in two: it is held back until the message is in the
        pipe) and keep it until the helper acknowledges it; returns its number."""
        self._seq += 1
        message = (self._seq, name, args, kwargs or {})
        with _signals_held():
            self._pending.append(message)
            self._send.send(message)
        return self._seq

    def _collect(self, drain: int | None = None) -> None:
        """Read the helper's replies: acknowledgements (the number of the last message made); with `drain`,
        wait for the answer to that drain message. Raises EOFError when the helper is gone."""
        while True:
            if drain is None and not self._replies.poll():
                return
            while drain is not None and not self._replies.poll(0.5):
                if self._proc.poll() is not None:
                    raise EOFError
            with _signals_held():  # a reply is read and recorded whole
                done, failed, ids = self._replies.recv()
                while self._pending and self._pending[0][0] <= done:
                    self._pending.popleft()
                self._failed += failed
                self._maker.ids.update(ids)
            if drain is not None and done >= drain:
                return

    def _lost(self) -> None:
        """The helper is gone: the writes it did not acknowledge, and every later one, are made here (called
        with the lock held). Writes it made but had not acknowledged yet (up to ACK_EVERY) are made twice."""
        self._alive = False
        with contextlib.suppress(EOFError, OSError):
            while self._replies.poll():
                self._collect()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=1)
        if self._proc.poll() is None:  # alive but unusable (its pipe failed): it must not write beside this one
            self._proc.kill()
            self._proc.wait()
        log.error(
            "the MLflow writer process ended (exit code %s); this process makes its %d unacknowledged writes and "
            "every later one", self._proc.returncode, len(self._pending),
        )  # fmt: skip
        with _signals_held():  # a Ctrl-C meanwhile waits until every one of them is made or kept
            while self._pending:
                _, name, args, kwargs = self._pending[0]
                if name not in (_DRAIN, _CLOSE):
                    self._failed += not self._maker.make(name, args, kwargs)
                self._pending.popleft()

    def create_run_later(self, experiment_id: str, start_time: int, tags: dict[str, str], run_name: str | None) -> str:
        """A new run that the helper creates in order with the writes (MlflowClient.create_run, with this
        `start_time` in ms). Returns a stand-in id at once: every call through this client maps it to the run's
        id, and `real_id` gives that id (once the helper has made the run)."""
        stand_in = f"{STAND_IN}{uuid.uuid4().hex}"
        with self._lock:  # its number is known before a reply can name it
            seq = self._write(_CREATE, stand_in, experiment_id, start_time, dict(tags), run_name)
            if seq is not None:
                self._creates[stand_in] = seq
        return stand_in

    def real_id(self, run_id: str, wait: bool = True) -> str | None:
        """The store's id of a run: `run_id` itself, or for a stand-in id of `create_run_later` the id of the run
        the helper made (this waits until it is made; with wait=False, None when it is not made yet), or None
        when its creation failed (kept in the unsent file)."""
        if not _is_stand_in(run_id):
            return run_id
        with self._lock:
            if not wait and self._alive:
                with contextlib.suppress(EOFError, OSError):  # a gone helper is noticed by the next call
                    self._collect()
                return self._maker.ids.get(run_id)
            seq = self._creates.get(run_id, 0)  # 0: made here
            # until the helper has made it (once acknowledged, its id came with the acknowledgement)
            while run_id not in self._maker.ids and self._alive and self._pending and self._pending[0][0] <= seq:
                try:
                    self._collect(drain=seq)
                except (EOFError, OSError):
                    self._lost()
            return self._maker.ids.get(run_id)

    def later(self, fn, *args) -> None:
        """A write that `fn(client, *args)` makes, in order with the others: by the helper, with its own client.
        `fn` is a module-level function (sent by name); the work of building the write's entities (a curve's
        Metrics, a CSV text) is then done there, not in this process."""
        self._write(_CALL, fn, *args)

    def drain(self) -> int:
        """Wait until every write sent so far is made; returns how many writes failed since the last drain (each
        is logged and kept, see the module docstring)."""
        with self._lock:
            if self._alive and any(m[1] != _DRAIN for m in self._pending):
                try:
                    self._collect(drain=self._post(_DRAIN))
                except (EOFError, OSError):
                    self._lost()
            failed, self._reported = self._failed - self._reported, self._failed
            return failed

    def close(self, timeout: float | None = None) -> int:
        """Drain, then stop the helper (it exits once the pipe is empty); returns how many writes failed in all."""
        self.drain()
        failed = self._failed
        with self._lock:
            if self._alive:
                self._alive = False
                with contextlib.suppress(OSError):
                    self._post(_CLOSE)
            self._send.close()
            self._replies.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        return failed


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held back for the block, in this thread (delivered when it ends), where POSIX allows."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


PIPE_BYTES = 1 << 20  # a population's closing writes (about 15 KB a run) fit in the pipe: no wait for the helper


def _widen(conn) -> None:
    """Grow the pipe's kernel buffer from 64 KiB to PIPE_BYTES where the system allows it (Linux), so a burst
    of writes does not wait for the helper; elsewhere, or above /proc/sys/fs/pipe-max-size, it stays."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


# -- the helper process -------------------------------------------------------------------------------------
ACK_EVERY = 64  # the helper acknowledges its progress this often, and whenever it has caught up


def serve(uri: str, recv, replies, path: Path, parent: int = 0) -> None:
    """The helper's loop: make each write in order, acknowledge them, answer drains with the number of failed
    writes; exit on close or when the parent is gone (ended or died), after the writes the pipe still held."""
    from mlflow.tracking import MlflowClient

    from .redact import install_log_redaction
    from .tracking import configure_mlflow

    configure_mlflow()
    install_log_redaction("mlflow", "alembic", "sqlalchemy")
    maker = _Maker(MlflowClient(tracking_uri=uri), path)
    failed = made = in_a_row = 0
    while True:
        try:
            seq, name, args, kwargs = recv.recv()
        except EOFError:  # the parent died (it sends _CLOSE when it ends): what it sent is made; its runs end
            maker.end_open_runs(parent)
            return
        if name == _CLOSE:
            return
        if name != _DRAIN:
            # a store that keeps failing: after FAILING failures in a row, no retry (and no wait before it)
            ok = maker.make(name, args, kwargs, tries=1 if in_a_row >= FAILING else 2)
            in_a_row = 0 if ok else in_a_row + 1
            failed += not ok
            made += 1
        # a new run's id goes back at once: the parent may be waiting for it (real_id)
        if name in (_DRAIN, _CREATE) or made % ACK_EVERY == 0 or not recv.poll():
            try:  # (number of the last message made, writes failed since the last reply, new runs' ids)
                replies.send((seq, failed, maker.made_ids))
                failed = 0
                maker.made_ids = {}
            except OSError:  # the parent stopped reading: it is gone; make what the pipe still holds
                replies = _Nowhere()


class _Nowhere:
    def send(self, _obj) -> None:
        pass


def _is_stand_in(value) -> bool:
    return isinstance(value, str) and value.startswith(STAND_IN)


class _NotCreated(Exception):
    """A write to a run whose creation failed (its create_run is kept in the unsent file)."""


class _Maker:
    """Makes messages with one MlflowClient: the helper's, or this process's once the helper is gone.

    A message is a client method by name, `later`'s function (`_CALL`), or a run to create (`_CREATE`) under a
    stand-in id that `ids` maps to the store's id once it is made (None when its creation failed). Every
    top-level string argument that is a stand-in, and every value of a created run's tags that is one (its
    parent), is replaced by its run's id; a write to a run that was not created is kept without a try.
    """

    def __init__(self, client, path: Path):
        self.client, self.path = client, path
        self.ids: dict[str, str | None] = {}  # stand-in -> the store's run id (None: not created)
        self.made_ids: dict[str, str | None] = {}  # those made since the last reply (the helper sends them back)
        self.open: dict[str, None] = {}  # runs created here and not ended yet, in order

    def _real(self, value):
        if not _is_stand_in(value):
            return value
        if self.ids.get(value) is None:
            raise _NotCreated(f"its run was not created (stand-in id {value})")
        return self.ids[value]

    def _shown(self, value):
        """`value`, or for a stand-in its run's id where that run was made (a kept write names it)."""
        return (self.ids.get(value) or value) if _is_stand_in(value) else value

    def call(self, name: str, args: tuple, kwargs: dict) -> None:
        """Make the message once; raises what the store raised."""
        if name == _CREATE:
            stand_in, experiment_id, start_time, tags, run_name = args
            tags = {k: self.ids.get(v) if _is_stand_in(v) else v for k, v in tags.items()}
            tags = {k: v for k, v in tags.items() if v is not None}  # a parent that was not created is left out
            try:
                run = self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
            except Exception:  # its experiment deleted meanwhile: restored, as tracking.ensure_experiment does
                if self.client.get_experiment(experiment_id).lifecycle_stage != "deleted":
                    raise
                self.client.restore_experiment(experiment_id)
                run = self.client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
            self.ids[stand_in] = self.made_ids[stand_in] = run.info.run_id
            self.open[run.info.run_id] = None
            return
        fn = functools.partial(args[0], self.client) if name == _CALL else getattr(self.client, name)
        args = tuple(self._real(a) for a in (args[1:] if name == _CALL else args))
        kwargs = {k: self._real(v) for k, v in kwargs.items()}
        fn(*args, **kwargs)
        if name == "set_terminated":
            self.open.pop(args[0] if args else kwargs.get("run_id"), None)

    def end_open_runs(self, pid: int) -> None:
        """End KILLED the runs created here that process `pid` (the parent, now dead) left open."""
        for run_id in list(self.open):
            self.make("set_tag", (run_id, "stop_reason", f"process {pid} died while the run was open"), {})
            self.make("set_terminated", (run_id, "KILLED"), {})

    def make(self, name: str, args: tuple, kwargs: dict, tries: int = 2) -> bool:
        """Make one message (up to `tries` times, RETRY_SECONDS apart); if it fails, keep it in the file `path`
        (one JSON line) and say so on stderr. Returns whether it was made."""
        error: BaseException | None = None
        for attempt in range(tries):
            try:
                self.call(name, args, kwargs)
                return True
            except _NotCreated as err:
                error = err
                break
            except Exception as err:  # noqa: BLE001  (kept and reported below; the next write goes on)
                error = err
                if attempt + 1 < tries:
                    time.sleep(RETRY_SECONDS)
        if name == _CREATE:
            self.ids[args[0]] = self.made_ids[args[0]] = None
        self._keep(name, args, kwargs, error)
        return False

    def _keep(self, name: str, args: tuple, kwargs: dict, error: BaseException) -> None:
        from .redact import redact

        if name == _CALL:
            name, args = f"{args[0].__module__}.{args[0].__qualname__}", args[1:]
        elif name == _CREATE:
            name = "create_run"
        else:  # the run's id where it was made (a stand-in only for a run that was not)
            args = tuple(self._shown(a) for a in args)
            kwargs = {k: self._shown(v) for k, v in kwargs.items()}
        run_id = args[0] if args else kwargs.get("run_id", "?")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"method": name, "args": args, "kwargs": kwargs}, default=_jsonable) + "\n")
            kept = f"kept in {self.path}"
        except OSError as err:
            kept = f"and could not be kept ({err})"
        print(
            f"MLflow writer: {name} of run {run_id} was not made ({redact(' '.join(str(error).split()))[:300]}); {kept}",
            file=sys.stderr,
            flush=True,
        )


def _jsonable(obj):
    """MLflow entities (Metric, Param, RunTag, DatasetInput) as their fields."""
    to_dict = getattr(obj, "to_dictionary", None)
    if callable(to_dict):
        return to_dict()
    return getattr(obj, "__dict__", repr(obj))


def main(argv: list[str]) -> int:
    """python -m experiments.writer URI UNSENT_FILE PARENT_PID RETRY_SECONDS: serve the pipes on stdin and stdout
    (started by WriteBehindClient; not a command for people)."""
    global RETRY_SECONDS
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a signal to the group: the parent ends its runs, through here
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uri, path, parent, retry = argv
    RETRY_SECONDS = float(retry)  # the parent's (read when it started the helper)
    recv = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # whatever MLflow prints goes to stderr, not into the replies
    serve(uri, recv, replies, Path(path), int(parent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
