"""Opening an MLflow tracking store safely: checked first, created atomically, runs of dead processes closed.

`open_store(uri)` (called once per process and store by `experiments.tracking.get_client`) does, in order:
1. **Check** the store before any work starts, and raise `StoreError` (one line naming the store, with
   passwords redacted, and what to do) instead of hanging or printing a traceback:
   - a tracking server (http/https) must answer GET /health within CHECK_TIMEOUT seconds: a refused
     connection, a server that accepts and never answers, or a server that is not MLflow fail at once;
   - a SQLite file must be a complete SQLite database (not truncated or overwritten), with MLflow's schema
     complete (a store left half-built by an interrupted older version is named, with the fix), in a folder
     this process can write. What a writer killed mid-transaction left in its journal is rolled back first,
     as SQLite itself would, so the store is judged on what was committed.
2. **Create** a new SQLite store atomically: its tables are built in a hidden temporary file next to it,
   which is renamed into place only when complete (the rename is one system call), under a lock on the
   folder so that concurrent first uses take turns. Ctrl-C, SIGTERM or SIGKILL at any point leaves either no
   store or a complete one, never a half-built one (leftover temporary files are removed by the next
   creator).
3. **Close dead runs**: every run records a heartbeat (tags `heartbeat.host`, `heartbeat.pid`,
   `heartbeat.time`, refreshed every HEARTBEAT_SECONDS while it is open); RUNNING runs whose process is gone
   (same host) or whose heartbeat is older than STALE_SECONDS (another host) are ended KILLED, with tag
   `stop_reason` saying why.

MLflow's own HTTP retries (7 tries with back-off, 120 s timeouts: minutes against a dead server) are bounded
by experiments.tracking.configure_mlflow, not here: this module sets nothing process-wide.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .redact import redact

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0  # seconds a tracking server or database gets to answer the first check
HEARTBEAT_SECONDS = 15.0  # an open run refreshes its heartbeat tag this often
STALE_SECONDS = 600.0  # a RUNNING run of another host without a heartbeat this long is ended KILLED
HOST_TAG, PID_TAG, BEAT_TAG = "heartbeat.host", "heartbeat.pid", "heartbeat.time"
WRITER_TAG = "heartbeat.writer_pid"  # the helper process making the run's writes (experiments.writer), if any
_SQLITE_HEADER = b"SQLite format 3\x00"
_BUILDING = ".building-"  # infix of the temporary file a new store is built in


class StoreError(ValueError):
    """A store that cannot be used as it is: the message is one line naming it and the fix."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, or None for other stores (and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


# -- 1. checks --------------------------------------------------------------------------------------------
def check_server(uri: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Raise StoreError unless the MLflow tracking server at `uri` answers GET /health within `timeout` s."""
    import requests

    shown = redact(uri)
    fix = "check that the server runs (make server) and the host and port, or give another --tracking-uri"
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=(timeout, timeout))
    except requests.exceptions.ConnectTimeout:
        raise StoreError(f"MLflow tracking server {shown} did not accept a connection within {timeout:g} s; {fix}") from None
    except requests.exceptions.ReadTimeout:
        raise StoreError(
            f"MLflow tracking server {shown} accepted a connection but did not answer within {timeout:g} s; {fix}"
        ) from None
    except requests.exceptions.ConnectionError as err:
        reason = "connection refused" if "refused" in str(err).lower() else "cannot connect"
        raise StoreError(f"MLflow tracking server {shown} is unreachable ({reason}); {fix}") from None
    except requests.exceptions.RequestException as err:
        raise StoreError(f"MLflow tracking server {shown}: {redact(' '.join(str(err).split()))}; {fix}") from None
    if response.status_code != 200:
        raise StoreError(
            f"{shown} answered HTTP {response.status_code} to /health: it is not an MLflow tracking server "
            "(mlflow server) or the URI's path is wrong; check --tracking-uri"
        )


@functools.lru_cache(maxsize=1)
def _schema_head() -> str | None:
    """The newest revision of MLflow's database schema (from its Alembic migrations), or None if unknown."""
    try:
        import mlflow.store.db_migrations as migrations
        from alembic.script import ScriptDirectory

        return ScriptDirectory(os.path.dirname(migrations.__file__)).get_current_head()
    except Exception:  # a layout this version does not know: skip the half-built check
        return None


def _move_away(db: Path, why: str) -> str:
    return f"move it away (mv {db} {db}.{why}) and rerun to start a new store, or give another --tracking-uri"


def _unreadable(db: Path, err: sqlite3.Error) -> StoreError:
    return StoreError(f"MLflow store {db} cannot be read ({err}); {_move_away(db, 'corrupt')}")


def _header_and_size(db: Path) -> tuple[bytes, int]:
    """The first 100 bytes and the size of `db`, read under a shared lock where SQLite can take one: a writer in
    another process (a report's worker, a study's helper) may otherwise be halfway through a commit, whose new
    page count is in the header before the file has grown, and the store would look truncated."""
    con = None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        con.execute("BEGIN")
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the shared lock, until close
    except sqlite3.Error:
        pass  # no lock on this file: it is judged on its bytes as they are (what is wrong is named below)
    try:
        with open(db, "rb") as f:
            header = f.read(100)
        return header, db.stat().st_size
    finally:
        if con is not None:
            con.close()


# one check after the other, in the order a broken store shows itself, each with its own fix: one list to read
def check_sqlite(db: Path) -> bool:
    """Raise StoreError unless `db` is absent/empty (returns False: to be created) or a complete, writable
    MLflow store (returns True)."""
    folder = db.parent
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"MLflow store {db}: {folder} is a file, not a folder; give another --tracking-uri")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the folder {folder} of MLflow store {db}: {err.strerror or err}; "
                "create it or give another --tracking-uri"
            ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(
            f"folder {folder} of MLflow store {db} is not writable (SQLite writes its journal next to the store); "
            f"make it writable (chmod u+w {folder}) or give --tracking-uri sqlite:////WRITABLE/FOLDER/mlflow.db"
        )
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return False
    except OSError as err:
        raise StoreError(f"cannot read MLflow store {db}: {err.strerror or err}") from None
    if db.is_dir():
        raise StoreError(f"MLflow store {db} is a folder; give a file path in --tracking-uri")
    if size == 0:
        return False
    if not os.access(db, os.R_OK | os.W_OK):
        raise StoreError(f"MLflow store {db} is read-only; make it writable (chmod u+w {db}) or give another --tracking-uri")
    _roll_back_hot_journal(db)
    header, size = _header_and_size(db)
    if len(header) < 100 or not header.startswith(_SQLITE_HEADER):
        raise StoreError(f"MLflow store {db} is not a SQLite database (overwritten or corrupt); {_move_away(db, 'corrupt')}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and size < pages * page_size:
        raise StoreError(
            f"MLflow store {db} is truncated ({size} of {pages * page_size} bytes); {_move_away(db, 'corrupt')}"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                version = row[0] if row else None
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.Error as err:
        raise _unreadable(db, err) from None
    head = _schema_head()
    if not tables:
        return False  # an empty database: MLflow creates the tables
    if head is not None and version != head and not runs:
        raise StoreError(
            f"MLflow store {db} is half-built (its tables were being created when a process was interrupted) and "
            f"holds no runs; {_move_away(db, 'broken')}"
        )
    return True  # an older schema with runs: MLflow itself says to run `mlflow db upgrade`


def _roll_back_hot_journal(db: Path) -> None:
    """Let SQLite roll back what a writer killed mid-transaction left in `<db>-journal`, before `db` is read.

    SQLite does that itself on a writable connection's first read; the checks below read the file's bytes and
    open it read-only, which would see the half-written pages (or fail with "attempt to write a readonly
    database") and call a sound store corrupt. A journal of a live writer is not touched: SQLite rolls back
    only a journal whose writer holds no lock, and otherwise this read waits for it (up to 30 s).
    """
    journal = db.with_name(db.name + "-journal")
    if not journal.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=30)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as err:
        raise _unreadable(db, err) from None


def check_store(uri: str) -> bool:
    """Raise StoreError unless the store at `uri` can be used (see the module docstring); returns False for a
    SQLite store still to be created (not created here), else True."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif (db := sqlite_path(uri)) is not None:
        return check_sqlite(db)
    return True


# -- 2. creation ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _folder_lock(db: Path) -> Iterator[None]:
    """An exclusive cross-process lock on the store's folder while a new store may be created.

    filelock's lock on the folder's own descriptor (flock): no lock file is left next to the store. Where a
    folder cannot be locked that way (Windows, filelock < 3.30), a FileLock on `.<store>.lock` beside it.
    """
    import filelock

    if os.name == "nt" or not hasattr(filelock, "lock_descriptor"):
        with filelock.FileLock(str(db.parent / f".{db.name}.lock")):
            yield
        return
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        filelock.lock_descriptor(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(db: Path, make_client):
    """Build a new store's tables in a temporary file, then rename it to `db` (under the folder lock)."""
    for stale in db.parent.glob(f".{db.name}{_BUILDING}*"):  # left by a creator that was SIGKILLed
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = db.parent / f".{db.name}{_BUILDING}{os.getpid()}-{uuid.uuid4().hex[:8]}"  # a new URI each time
    from .tracking import deferred_signals

    try:
        # Ctrl-C / SIGTERM wait until the tables exist and the store is in place (about 2 s): a signal that
        # arrived while SQLAlchemy ran could be swallowed in one of its garbage-collection callbacks ("Exception
        # ignored") and leave its connection broken, so the creation failed with an unrelated error.
        with deferred_signals():
            make_client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates every table
            os.replace(tmp, db)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def open_store(uri: str, make_client):
    """Check the store at `uri`, create it atomically when it is a new SQLite file, end dead runs; returns the
    client `make_client(uri)` made.

    Raises:
        StoreError: the store cannot be used (one line; see the module docstring).
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    exists = check_store(uri)
    try:
        if not exists:
            db = sqlite_path(uri)
            with _folder_lock(db):
                if not check_sqlite(db):  # another process may have created it meanwhile
                    _build(db, make_client)
        client = make_client(uri)
        client.search_experiments(max_results=1)  # opens (and checks) the store now, not mid-run
    except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as err:
        first = " ".join(str(err).split())[:300]
        raise StoreError(f"cannot open MLflow store {redact(uri)}: {redact(first)}") from None
    try:
        ended = end_dead_runs(client)
    except (MlflowException, SQLAlchemyError) as err:  # a clean-up must never stop the command
        log.warning("could not check for runs of dead processes: %s", redact(err))
    else:
        if ended:
            log.warning("ended %d run(s) left RUNNING by processes that are gone (status KILLED)", ended)
    return client


# -- 3. heartbeats ----------------------------------------------------------------------------------------
def heartbeat_tags() -> dict[str, str]:
    """The tags a run is created with: this process's host and pid, and the time (unix seconds)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), BEAT_TAG: f"{time.time():.0f}"}


def why_dead(tags: dict[str, str], now: float, host: str) -> str | None:
    """Why a RUNNING run with these tags is dead, or None while it may be alive (or records no heartbeat)."""
    pid, owner = tags.get(PID_TAG, ""), tags.get(HOST_TAG)
    if owner is None or not pid.isdigit():
        return None
    if owner == host:
        if not process_alive(int(pid)) and not _writer_alive(tags.get(WRITER_TAG, "")):
            return f"process {pid} on {host} is gone (killed or crashed) while the run was open"
        return None
    try:
        beat = float(tags.get(BEAT_TAG, "nan"))
    except ValueError:
        return None
    if now - beat > STALE_SECONDS:
        return f"no heartbeat from process {pid} on {owner} for {now - beat:.0f} s (limit {STALE_SECONDS:g} s)"
    return None


def _writer_alive(pid: str) -> bool:
    """Whether the run's helper writer still runs: it makes the writes its dead parent sent (among them, maybe
    the run's end) for a few seconds after; until it exits, the run is not ended here."""
    if not pid.isdigit() or not process_alive(int(pid)):
        return False
    try:  # a pid reused by another program does not keep the run open
        return b"experiments.writer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid


def end_dead_runs(client) -> int:
    """End (KILLED, tag stop_reason) every RUNNING run of the store whose process is dead; returns how many."""
    ids = [e.experiment_id for e in client.search_experiments(max_results=50000)]
    if not ids:
        return 0
    now, host, ended = time.time(), socket.gethostname(), 0
    for run in client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=5000):
        reason = why_dead(run.data.tags, now, host)
        if reason is None:
            continue
        client.set_tag(run.info.run_id, "stop_reason", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        ended += 1
    return ended
