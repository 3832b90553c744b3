"""Write-behind tracking: a helper process makes the MLflow writes of a study's runs while this process fits
the next ones (studies.worker's trial loop; reports and single runs write themselves).

A batched study spends about a quarter of its trials phase in MLflow's SQLite store (about 60 ms of
SQLAlchemy work per run: its curve, events.csv, tags, its end), all of it in the one thread that also fits,
while the second core idles: a small fit runs in one thread. Within `experiments.tracking.write_behind(uri)`,
`get_client(uri)` returns a `WriteBehindClient`: the writes (`WRITES`) are sent through a pipe to a helper
process, which makes them in order with its own MlflowClient; the rest is called here, and every read first
waits for the writes sent before it (so a read sees them).

What it keeps (tests/test_writer.py):
- **Order and completeness.** One pipe, one helper, one call at a time: the store receives the writes in the
  order they were made; `drain()` returns once every write sent before it is made. A run is ended by its
  `set_terminated`, which comes after the run's other writes.
- **A killed parent loses nothing it sent.** A write is in the pipe (the kernel's buffer) when its call
  returns here; if this process dies (SIGKILL included), the helper makes what the pipe holds, then exits.
  The helper runs in its own session, so Ctrl-C at the terminal reaches only this process, which ends its
  runs KILLED through the helper (it also ignores SIGINT and SIGTERM sent to it). The runs of a killed
  parent are ended KILLED by the next command (heartbeats).
- **A failed write is kept, not dropped.** The helper retries a write that fails once, then logs one line
  and appends it to `<unsent dir>/writes-<pid>.jsonl` (experiments.unsent's folder), to be read by hand;
  after 3 failures in a row it stops retrying until a write succeeds again. The run itself still ends
  as its fit did (its record in the store is then incomplete: the file has the rest), and the block's end
  logs how many writes were kept.
- **A helper that dies** (killed on its own, or before it started): this process keeps every write until the
  helper acknowledges it, so the next call here notices, logs one line, makes the unacknowledged writes
  itself and every later one. The helper acknowledges every ACK_EVERY writes while it is behind, so up to
  that many writes it had made may be made twice (a curve point twice, a tag set again).
- **Messages are whole.** SIGINT and SIGTERM are held back while a message is written to the pipe or a reply
  read from it, and while the unacknowledged writes of a dead helper are made.

- **Turns at the store.** SQLite lets one writer in at a time, and a writer that finds the store locked
  sleeps in steps of 1 to 100 ms before it tries again. So while the helper writes a population's records,
  the burst of runs this process opens for the next one (`first()`) would wait a sleep step per run: 13 ms a
  run instead of 8 in a batched study. Within `first()` the helper waits instead: both processes hold the
  same unlinked temporary file, and a POSIX record lock on it (`_Turn`) is held by the helper around each of
  its writes and by this process for the block. The kernel drops a process's lock when it dies, a wait for
  the helper (a read's drain) inside the block gives the turn back first, and the helper waits TURN_WAIT
  seconds at most (a write into a full pipe inside the block would otherwise wait for a helper that waits).

Only SQLite stores, and only in the process that owns the block: a worker process of `--jobs` writes itself
(it has its own core), and so does a tracking server (HTTP: its own retries and keep-locally rules apply).
$GMM_WRITE_BEHIND=0 turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
_DRAIN, _CLOSE = "__drain__", "__close__"
RETRY_SECONDS = 1.0
TURN_WAIT = 0.5  # seconds the helper waits at most for this process's block (runs_first), then writes anyway
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
        self._turn = _Turn.new()
        command = [sys.executable, "-m", "experiments.writer", uri, str(path), *self._turn.argv()]
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
            pass_fds=self._turn.fds(),
        )  # fmt: skip
        _widen(self._proc.stdin)
        self._send = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._replies = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        self._lock = threading.Lock()  # the heartbeat threads write too
        self._seq = 0
        self._pending: collections.deque = collections.deque()  # (seq, name, args, kwargs) sent, not yet made
        self._failed = self._reported = 0  # writes failed (made nowhere but the unsent file) / returned by drain
        self._alive = True

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
        if name in DIRECT or not callable(attr):
            return attr

        @functools.wraps(attr)
        def read(*args, **kwargs):
            self.drain()  # a read sees every write sent before it
            return attr(*args, **kwargs)

        return read

    def _write(self, name: str, *args, **kwargs) -> None:
        with self._lock:
            if self._alive:
                try:
                    self._collect()
                    self._post(name, args, kwargs)
                    return
                except (EOFError, OSError):
                    self._lost()
        getattr(self._client, name)(*args, **kwargs)

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
            with _signals_held():  # a reply is read whole
                done, failed = self._replies.recv()
            while self._pending and self._pending[0][0] <= done:
                self._pending.popleft()
            self._failed += failed
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
        log.error(
            "the MLflow writer process ended (exit code %s); this process makes its %d unacknowledged writes and "
            "every later one", self._proc.returncode, len(self._pending),
        )  # fmt: skip
        with _signals_held():  # a Ctrl-C meanwhile waits until every one of them is made or kept
            while self._pending:
                _, name, args, kwargs = self._pending[0]
                if name not in (_DRAIN, _CLOSE):
                    self._failed += not _make(self._client, name, args, kwargs, self._path)
                self._pending.popleft()

    def first(self):
        """A block in which this process's own store calls (opening runs) go before the helper's writes (see
        the module docstring); the helper waits for its turn until the block ends."""
        return self._turn.held()

    def drain(self) -> int:
        """Wait until every write sent so far is made; returns how many writes failed since the last drain (each
        is logged and kept, see the module docstring)."""
        with self._turn.given_back(), self._lock:
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
        self._turn.close()
        return failed


class _Turn:
    """Whose turn it is at the store: a POSIX record lock (fcntl.lockf) on an unlinked temporary file that this
    process and its helper both hold open. Record locks belong to a process, so the two exclude each other,
    and the kernel drops a dead process's lock.

    The helper waits for its turn at most `wait` seconds (TURN_WAIT), then writes without waiting for as long
    again: whatever this process does inside its block (a write into a full pipe, a lock left behind
    by a Ctrl-C at the wrong instant), the helper is slowed once, never stopped. Where fcntl or the lock is not
    available, every turn is free."""

    def __init__(self, file=None, fd: int | None = None, wait: float = 0.0):
        self._file = file  # keeps the file open in the parent
        self.fd = fd if fd is not None else (file.fileno() if file is not None else None)
        self.wait = wait  # the helper's longest wait for its turn
        self.depth = 0  # nested blocks of this process (one record lock: only the outermost takes and gives it)
        self.owner: int | None = None  # the thread whose block holds it
        self.free_until = 0.0  # the helper gave up waiting: until then (monotonic) it writes without waiting

    @classmethod
    def new(cls) -> _Turn:
        try:
            import fcntl  # noqa: F401

            return cls(tempfile.TemporaryFile())
        except (ImportError, OSError):
            return cls()

    def argv(self) -> list[str]:
        """The helper's arguments: the file's descriptor and its longest wait (TURN_WAIT, read now)."""
        return [] if self.fd is None else [str(self.fd), str(float(TURN_WAIT))]

    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def _lock(self, op: str, wait: bool = True) -> bool:
        """lockf `op` ("LOCK_EX", "LOCK_UN"); False when another process holds it (wait=False) or locks fail
        here (then none is used again)."""
        if self.fd is None:
            return False
        import fcntl

        try:
            fcntl.lockf(self.fd, getattr(fcntl, op) | (0 if wait or op == "LOCK_UN" else fcntl.LOCK_NB))
            return True
        except OSError as err:
            if not wait and err.errno in (errno.EACCES, errno.EAGAIN):
                return False
            self.fd = None  # no record locks on this system or file: turns are free from now on
            return False

    # -- this process -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def held(self):
        """The turn for the block (nested blocks share the outermost's). For one thread: the main one, which
        opens runs; other threads only write and drain."""
        self.depth += 1
        try:
            if self.depth == 1:
                self.owner = threading.get_ident()
                self._lock("LOCK_EX")
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.owner = None
                self._lock("LOCK_UN")  # also after a Ctrl-C during the wait for it: unlocking none is harmless

    @contextlib.contextmanager
    def given_back(self):
        """The turn given back for the block when the calling thread's block holds it (a wait for the helper's
        writes there would otherwise last TURN_WAIT per write)."""
        if self.depth == 0 or self.owner != threading.get_ident():
            yield
            return
        self._lock("LOCK_UN")
        try:
            yield
        finally:
            self._lock("LOCK_EX")

    # -- the helper ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def waited(self):
        """The helper's turn for one write: after the parent's block, or after `wait` seconds at most."""
        took = self._lock("LOCK_EX", wait=False)
        now = time.monotonic()
        deadline = now + self.wait if now >= self.free_until else now
        while not took and self.fd is not None and time.monotonic() < deadline:
            time.sleep(0.001)
            took = self._lock("LOCK_EX", wait=False)
        if not took and self.fd is not None and now >= self.free_until:  # gave up: no wait for the next `wait` s
            self.free_until = time.monotonic() + self.wait
        try:
            yield
        finally:
            if took:
                self._lock("LOCK_UN")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self.fd = None


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


def serve(uri: str, recv, replies, path: Path, turn: _Turn | None = None) -> None:
    """The helper's loop: make each write in order, acknowledge them, answer drains with the number of failed
    writes; exit on close or when the parent is gone (ended or died), after the writes the pipe still held."""
    from mlflow.tracking import MlflowClient

    from .redact import install_log_redaction
    from .tracking import configure_mlflow

    configure_mlflow()
    install_log_redaction("mlflow", "alembic", "sqlalchemy")
    client = MlflowClient(tracking_uri=uri)
    failed = made = in_a_row = 0
    while True:
        try:
            seq, name, args, kwargs = recv.recv()
        except EOFError:  # the parent is gone, and so is everything it sent
            return
        if name == _CLOSE:
            return
        if name != _DRAIN:
            # a store that keeps failing: after FAILING failures in a row, no retry (and no wait before it)
            ok = _make(client, name, args, kwargs, path, tries=1 if in_a_row >= FAILING else 2, turn=turn)
            in_a_row = 0 if ok else in_a_row + 1
            failed += not ok
            made += 1
        if name == _DRAIN or made % ACK_EVERY == 0 or not recv.poll():
            try:  # (number of the last message made, writes failed since the last reply)
                replies.send((seq, failed))
                failed = 0
            except OSError:  # the parent stopped reading: it is gone; make what the pipe still holds
                replies = _Nowhere()


class _Nowhere:
    def send(self, _obj) -> None:
        pass


def _make(client, name: str, args: tuple, kwargs: dict, path: Path, tries: int = 2, turn: _Turn | None = None) -> bool:
    """Make one write (up to `tries` times, RETRY_SECONDS apart; each try in the helper's `turn`, not the sleep
    between); if it fails, keep it in the file `path` (one JSON line) and say so on stderr. Returns whether it
    was made."""
    error: BaseException | None = None
    for attempt in range(tries):
        try:
            with turn.waited() if turn is not None else contextlib.nullcontext():
                getattr(client, name)(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001  (kept and reported below; the next write goes on)
            error = err
            if attempt + 1 < tries:
                time.sleep(RETRY_SECONDS)
    from .redact import redact

    run_id = args[0] if args else kwargs.get("run_id", "?")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"method": name, "args": args, "kwargs": kwargs}, default=_jsonable) + "\n")
        kept = f"kept in {path}"
    except OSError as err:
        kept = f"and could not be kept ({err})"
    print(
        f"MLflow writer: {name} of run {run_id} was not made ({redact(' '.join(str(error).split()))[:300]}); {kept}",
        file=sys.stderr,
        flush=True,
    )
    return False


def _jsonable(obj):
    """MLflow entities (Metric, Param, RunTag, DatasetInput) as their fields."""
    to_dict = getattr(obj, "to_dictionary", None)
    if callable(to_dict):
        return to_dict()
    return getattr(obj, "__dict__", repr(obj))


def main(argv: list[str]) -> int:
    """python -m experiments.writer URI UNSENT_FILE [TURN_FD TURN_WAIT]: serve the pipes on stdin and stdout (started by
    WriteBehindClient; not a command for people)."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a signal to the group: the parent ends its runs, through here
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uri, path, *turn = argv
    turn = _Turn(fd=int(turn[0]), wait=float(turn[1])) if turn else None
    recv = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # whatever MLflow prints goes to stderr, not into the replies
    serve(uri, recv, replies, Path(path), turn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
