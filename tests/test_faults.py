"""Fault injection with real stores, real processes and real signals: nothing lost, nothing hung, nothing leaked.

- store creation interrupted at random points (SIGINT >= 20 times in one process, SIGKILL in fresh ones):
  every store is afterwards absent or complete, and usable by the next command;
- a run and a report SIGKILLed mid-fit: the next command ends their runs KILLED (tag stop_reason), and the
  training curve written during the fit is there;
- a refused and a silent tracking server / database server: one line within 15 s, exit status 2;
- `report --out` over a folder of user files: refused, nothing deleted;
- a corrupt mlflow.db, a corrupt study journal, a read-only store folder, a half-built store: one line each;
- the search space checked whole before the first trial; credentials redacted in tags, params, errors.

Servers are sockets on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments import stores
from experiments.redact import redact
from experiments.run import TRAIN_CURVE
from experiments.stores import StoreError, check_sqlite

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
HOST = "127.0.0.1"
LIMIT = 15.0  # seconds within which a dead or silent server must be reported
TINY_RUN = ["--samples", "100", "--iterations", "5", "--no-log-figures", "--no-log-model"]


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kwargs)


def _main(module: str, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`python -m module *argv`, run in this process (faster than a new interpreter): status, stdout, stderr."""
    import importlib

    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def _one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a command that failed as it should (no traceback)."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# -- store creation under signals --------------------------------------------------------------------------
_CREATOR = """
import sys
from mlflow.tracking import MlflowClient
from experiments.stores import open_store

root = sys.argv[1]
while True:
    i = None
    try:
        line = sys.stdin.readline()
        if not line:
            break
        i = int(line)
        open_store(f"sqlite:///{root}/s{i}/mlflow.db", lambda u: MlflowClient(tracking_uri=u))
        print(f"done {i}", flush=True)
    except KeyboardInterrupt:
        if i is not None:  # a signal while idle (it came just after the reply) has nothing to report
            print(f"interrupted {i}", flush=True)
"""
REPLY_TIMEOUT = 300  # seconds for one store (an interpreter start and MLflow's import on a loaded machine)


class _Creator:
    """The _CREATOR process: create store i on request, optionally interrupted; replies read by a thread
    (a queue, so that no reply waits in a reader's buffer), stderr in a file (never a pipe that could fill)."""

    def __init__(self, root: Path):
        self.err = root / "creator.err"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CREATOR, str(root)],
                cwd=ROOT,
                env=ENV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line.strip())
        self.replies.put("")  # end of output: the process died

    def ask(self, i: int, delay: float | None) -> str:
        """Create store i; send SIGINT after `delay` s unless it finished first; 'done' or 'interrupted'."""
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        reply = None
        if delay is not None:
            try:
                reply = self.replies.get(timeout=delay)
            except queue.Empty:
                self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while reply is None or not reply.endswith(f" {i}"):
            try:
                reply = self.replies.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"store {i}: no answer in {REPLY_TIMEOUT} s; stderr: {self.err.read_text()[-2000:]}")
            assert reply, f"the creator died: {self.err.read_text()[-2000:]}"
        return reply.split()[0]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=60)


def _assert_absent_or_complete(db: Path) -> bool:
    """check_sqlite raises on a half-built or corrupt store; True when the store exists (complete)."""
    return check_sqlite(db)


@pytest.mark.slow
def test_store_creation_interrupted_at_random_points_leaves_usable_stores(tmp_path):
    rng = random.Random(15)
    creator = _Creator(tmp_path)
    try:
        assert creator.ask(0, None) == "done"  # imports are warm after it
        t0 = time.monotonic()
        assert creator.ask(1, None) == "done"
        creation = max(0.3, time.monotonic() - t0)
        outcomes = {}
        i = 2
        # 14 random points of the creation (each costs up to a store creation, seconds of CPU), bounded
        while sum(o == "interrupted" for o in outcomes.values()) < 14 and i < 45:
            outcomes[i] = creator.ask(i, rng.uniform(0.0, creation))
            i += 1
    finally:
        creator.close()
    interrupted = [i for i, o in outcomes.items() if o == "interrupted"]
    assert len(interrupted) >= 14, outcomes
    complete = 0
    for i in outcomes:
        folder = tmp_path / f"s{i}"
        complete += _assert_absent_or_complete(folder / "mlflow.db")
        assert not list(folder.glob(".mlflow.db.building-*")), list(folder.iterdir())  # cleaned on the way out
    # SIGKILL cannot be caught: the temporary file stays behind, the store itself is never half-built
    for delay in (0.3, 0.9):
        folder = tmp_path / f"k{delay}"
        folder.mkdir()
        killed = _Creator(folder)
        try:
            assert killed.ask(0, None) == "done"  # imports done: the next creation starts at once
            killed.proc.stdin.write("1\n")
            killed.proc.stdin.flush()
            time.sleep(delay * creation)
            killed.proc.kill()
        finally:
            killed.close()
        _assert_absent_or_complete(folder / "s1" / "mlflow.db")
        interrupted.append(f"k{delay}")
    # every store is usable by the next command: a run in one interrupted, one killed and one complete store
    usable = [tmp_path / f"s{interrupted[0]}", tmp_path / "k0.9" / "s1", tmp_path / "s0"]
    for folder in usable:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = stores.open_store(uri, lambda u: MlflowClient(tracking_uri=u))
        run = client.create_run(client.create_experiment("x"))
        client.set_terminated(run.info.run_id)
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # SIGKILL's leftover removed
    print(f"{len(interrupted)} interrupts ({len(interrupted) - 2} SIGINT, 2 SIGKILL); {complete} stores complete")


def test_a_half_built_store_is_named_with_the_fix(tmp_path, complete_store, capsys):
    import mlflow.store.db_migrations as migrations
    from alembic.script import ScriptDirectory

    db = tmp_path / "mlflow.db"
    shutil.copy(complete_store, db)
    older = ScriptDirectory(os.path.dirname(migrations.__file__)).get_current_head()
    older = ScriptDirectory(os.path.dirname(migrations.__file__)).get_revision(older).down_revision
    with contextlib.closing(sqlite3.connect(db)) as con:  # what an interrupted migration leaves
        con.execute("UPDATE alembic_version SET version_num = ?", (older,))
        con.commit()
    err = _one_line(_main("experiments.run", [*TINY_RUN, "--tracking-uri", f"sqlite:///{db}"], capsys))
    assert "half-built" in err and f"mv {db} {db}.broken" in err


# -- dead runs --------------------------------------------------------------------------------------------
def _running_with_curve(uri: str) -> str | None:
    """The id of a RUNNING run that has logged a training-curve point, or None yet."""
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return _running_with_curve_at(MlflowClient(uri))  # None while the child is still creating the store


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "report"])
def test_a_sigkilled_run_is_ended_killed_by_the_next_command_and_keeps_its_curve(tmp_path, command):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    long_fit = ["--samples", "200", "--iterations", "50000000", "--eval-every", "100", "--tracking-uri", uri]
    if command == "report":
        long_fit += ["--seeds", "2", "--out", str(tmp_path / "report")]
    proc = subprocess.Popen(
        [sys.executable, "-m", f"experiments.{command}", *long_fit],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = _wait_until(lambda: _running_with_curve(uri), 90, "a curve point", proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nothing could end it
    next_command = _python("-m", "experiments.run", *TINY_RUN, "--tracking-uri", uri, timeout=120)
    assert next_command.returncode == 0, next_command.stderr[-2000:]
    killed = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.info.run_id != ""]
    dead = [r for r in killed if r.data.tags.get("heartbeat.pid") == str(proc.pid)]
    assert dead and all(r.info.status == "KILLED" for r in dead), [(r.info.run_name, r.info.status) for r in dead]
    assert all(f"process {proc.pid}" in r.data.tags["stop_reason"] for r in dead)
    # a report: its parent run and both seeds' runs (a family's seeds fit together as one population)
    assert len(dead) == (3 if command == "report" else 1)
    history = client.get_metric_history(run_id, TRAIN_CURVE)
    assert history and all(h.step >= 0 for h in history)  # the curve written during the fit survived
    assert not (tmp_path / "report").exists()


def test_why_dead_names_a_gone_process_and_a_silent_host():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    host = socket.gethostname()
    now = time.time()
    assert "is gone" in stores.why_dead({"heartbeat.host": host, "heartbeat.pid": str(gone.pid)}, now, host)
    assert stores.why_dead({"heartbeat.host": host, "heartbeat.pid": str(os.getpid())}, now, host) is None
    other = {"heartbeat.host": "elsewhere", "heartbeat.pid": "1", "heartbeat.time": str(now - 10)}
    assert stores.why_dead(other, now, host) is None
    other["heartbeat.time"] = str(now - stores.STALE_SECONDS - 1)
    assert "no heartbeat" in stores.why_dead(other, now, host)
    assert stores.why_dead({}, now, host) is None  # runs of older versions record no heartbeat


# -- dead and silent servers ------------------------------------------------------------------------------
@contextlib.contextmanager
def _silent_server():
    """A socket on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen(16)
        yield s.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]  # nothing listens once it is closed: connections are refused


@pytest.mark.slow
def test_dead_and_silent_servers_fail_within_15_s_with_one_line(tmp_path, monkeypatch, capsys):
    # each command runs in this process (imports done): the time measured is the command's own, not the
    # start of an interpreter on a loaded machine
    monkeypatch.chdir(tmp_path)
    closed = _closed_port()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = str(tmp_path / "studies.log")
    study = ["--trials", "1", "--best-dir", str(tmp_path / "best"), "--no-progress"]
    with _silent_server() as silent:
        for kind, port in (("refused", closed), ("silent", silent)):
            server = f"http://{HOST}:{port}"
            database = f"postgresql+psycopg://optuna:SECRETPW@{HOST}:{port}/optuna"
            commands = {
                "experiments.run": ([*TINY_RUN, "--tracking-uri", server], server),
                "experiments.report": ([*TINY_RUN, "--seeds", "1", "--tracking-uri", server, "--out", "r"], server),
                "studies.run": ([*study, "--storage", journal, "--tracking-uri", server], server),
                "studies.run storage": ([*study, "--storage", database, "--tracking-uri", store], database),
            }
            for name, (argv, url) in commands.items():
                t0 = time.monotonic()
                proc = _main(name.split()[0], argv, capsys)
                elapsed = time.monotonic() - t0
                err = _one_line(proc)
                assert elapsed < LIMIT, f"{name} ({kind}): {elapsed:.1f} s"
                assert "SECRETPW" not in err + proc.stdout, name
                assert redact(url).split("://")[1] in err, (name, kind, err)
                if "storage" not in name:
                    assert ("refused" if kind == "refused" else "did not answer") in err, err
    assert not (tmp_path / "r").exists() and "full-v1" not in Path(journal).read_text()


# -- report --out -----------------------------------------------------------------------------------------
def test_report_over_a_folder_of_user_files_is_refused_and_deletes_nothing(tmp_path, capsys):
    from experiments.report import MARKER

    user = tmp_path / "d"
    user.mkdir()
    (user / "manifest.json").write_text("{}")  # looks like a report to the old check
    (user / "notes.txt").write_text("precious")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    base = [*TINY_RUN, "--seeds", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]

    def report(*argv):
        return _main("experiments.report", [*base, *argv], capsys)

    for extra in ([], ["--force"]):
        err = _one_line(report("--out", str(user), *extra))
        assert "not a report" in err and str(user) in err
        assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    # an earlier report: replaced with --force only; never while it holds a file the report did not write
    earlier = tmp_path / "earlier"
    assert report("--out", str(earlier)).returncode == 0
    assert json.loads((earlier / MARKER).read_text())["files"]
    assert "--force" in _one_line(report("--out", str(earlier)))
    (earlier / "figures" / "mine.png").write_bytes(b"mine")
    err = _one_line(report("--out", str(earlier), "--force"))
    assert "figures/mine.png" in err and (earlier / "figures" / "mine.png").read_bytes() == b"mine"
    (earlier / "figures" / "mine.png").unlink()
    assert report("--out", str(earlier), "--force").returncode == 0
    assert not list(tmp_path.glob(".earlier*"))  # no temporary or old folder left


# -- broken stores ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def complete_store(tmp_path_factory) -> Path:
    """A complete MLflow store, made once (copy it: never open it in a test)."""
    db = tmp_path_factory.mktemp("good") / "mlflow.db"
    stores.open_store(f"sqlite:///{db}", lambda u: MlflowClient(tracking_uri=u))
    return db


_KILLED_MID_WRITE = """
import os, signal, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size = 2")  # the transaction spills pages into the database file: its journal is hot
con.execute("BEGIN IMMEDIATE")
con.execute("CREATE TABLE half_written (x BLOB)")
con.executemany("INSERT INTO half_written VALUES (randomblob(4096))", [()] * 64)
con.execute("UPDATE experiments SET name = 'half-renamed'")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_another_process_is_writing_is_never_judged_truncated(tmp_path):
    # a report's workers open the store while the others commit: read without a lock, a commit's new page
    # count could be in the header before the file had grown (CI saw "is truncated" with --jobs 3; this loop
    # saw it in 203 of 318 checks)
    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE runs (x BLOB)")
        con.execute("INSERT INTO runs VALUES (1)")
        con.commit()
    grow = f"""
import os, sqlite3
con = sqlite3.connect({str(db)!r}, timeout=30)
while True:
    con.execute("INSERT INTO runs VALUES (?)", (os.urandom(200000),))
    con.commit()
"""
    writer = subprocess.Popen([sys.executable, "-c", grow])
    try:
        # count the checks a commit overlapped (the file grew while they ran), not the checks a clock allowed:
        # a loaded 2-core CI machine ran only 13 checks in 4 s
        overlapped, checks, deadline = 0, 0, time.monotonic() + 120
        while overlapped < 15 and time.monotonic() < deadline:
            before = db.stat().st_size
            assert check_sqlite(db)  # raises StoreError on a false "truncated"
            checks += 1
            overlapped += db.stat().st_size != before
        assert writer.poll() is None, "the writer died"
    finally:
        writer.kill()
        writer.wait()
    assert overlapped >= 15, f"only {overlapped} of {checks} checks ran while the store grew"


def test_a_store_whose_writer_was_killed_mid_transaction_is_rolled_back_and_used(tmp_path, complete_store):
    # a SIGKILL inside one of MLflow's write transactions leaves a hot journal next to the store; the next
    # command must roll it back (as any SQLite writer does), not call the store corrupt or read-only
    db = tmp_path / "mlflow.db"
    shutil.copy(complete_store, db)
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(db)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    journal = db.with_name("mlflow.db-journal")
    assert journal.exists() and journal.stat().st_size > 0  # the state under test: a hot journal
    assert check_sqlite(db) is True
    client = stores.open_store(f"sqlite:///{db}", lambda u: MlflowClient(tracking_uri=u))
    assert client.get_experiment("0").name == "Default"  # the killed transaction's changes are gone
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'half_written'").fetchall()
    run = client.create_run("0")
    client.set_terminated(run.info.run_id)
    assert not journal.exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_corrupt_mlflow_db_gives_one_line(tmp_path, complete_store, damage, capsys):
    db = tmp_path / "bad" / "mlflow.db"
    db.parent.mkdir()
    data = complete_store.read_bytes()
    db.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"not a database\n" * 100)
    with pytest.raises(StoreError, match=f"mv {db} {db}.corrupt"):
        check_sqlite(db)
    err = _one_line(_main("experiments.run", [*TINY_RUN, "--tracking-uri", f"sqlite:///{db}"], capsys))
    assert str(db) in err and ("truncated" in err or "not a SQLite database" in err)


def test_a_report_on_a_corrupt_store_fails_before_it_starts_workers(tmp_path, capsys, monkeypatch):
    # a report with two jobs spawns its worker early (its start overlaps the store's opening): a store that
    # cannot be used must fail first, with its one line, not after a worker's seconds-long start
    from experiments import seeds

    pools = []
    new_pool = seeds._new_pool
    monkeypatch.setattr(seeds, "_new_pool", lambda workers: pools.append(workers) or new_pool(workers))
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database\n" * 100)
    argv = ["--family", "all", "--seeds", "2", *TINY_RUN, "--jobs", "2", "--out", str(tmp_path / "report")]
    err = _one_line(_main("experiments.report", [*argv, "--tracking-uri", f"sqlite:///{db}"], capsys))
    assert "not a SQLite database" in err and f"mv {db} {db}.corrupt" in err
    assert pools == []


def test_a_corrupt_study_journal_gives_one_line(tmp_path, capsys):
    journal = tmp_path / "studies.log"
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n{broken\n{"op_code": 1}\n')
    err = _one_line(_main("studies.run", ["--trials", "1", "--storage", str(journal)], capsys))
    assert "corrupt" in err and f"mv {journal} {journal}.corrupt" in err


@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` made unwritable, for root too (chattr +i where chmod does not stop root)."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
            immutable = done.returncode == 0
            if not immutable:
                pytest.fail(f"cannot make {folder} read-only as root here (chattr: {done.stderr.strip()})")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("existing", [True, False])
def test_a_read_only_store_folder_gives_one_line(tmp_path, complete_store, existing, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    if existing:
        shutil.copy(complete_store, folder / "mlflow.db")
    with _read_only(folder):
        err = _one_line(_main("experiments.run", [*TINY_RUN, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"], capsys))
    assert "not writable" in err and str(folder) in err


# -- search space, secrets --------------------------------------------------------------------------------
def test_a_bad_search_space_value_fails_before_the_first_trial(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("default:\n  init: {choices: [kmeans++, randm]}\n  clamp: {low: 1e-8, high: 1e-1, log: true}\n")
    journal = tmp_path / "studies.log"
    argv = [
        "--trials",
        "2",
        "--space",
        str(space),
        "--storage",
        str(journal),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    ]
    err = _one_line(_main("studies.run", argv, capsys))
    assert "'randm'" in err and "random" in err
    assert "full-v1" not in journal.read_text()  # no study was created: fixing the file needs no new study name
    from studies.space import load_space

    space.write_text("default:\n  clamp: {low: 1e-8, high: 1e-1, log: true}\n")  # YAML reads 1e-1 as a string
    assert load_space("full", space).params[0].high == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql+psycopg://optuna:SECRETPW@db:5432/optuna", "SECRETPW"),
        ("--storage mysql://root:p@ss:w0rd@db/x --trials 3", "p@ss:w0rd"),
        ("sqlite:///x.db?password=SECRETPW&mode=ro", "SECRETPW"),
        ("PGPASSWORD=SECRETPW python -m studies.run --password SECRETPW", "SECRETPW"),
    ],
)
def test_redact_removes_passwords_and_keeps_the_rest(text, secret):
    clean = redact(text)
    assert secret not in clean and "***" in clean
    assert redact(clean) == clean
    assert redact("postgresql://optuna@db/optuna clamp=1e-6") == "postgresql://optuna@db/optuna clamp=1e-6"


def test_params_tags_and_errors_of_a_run_are_redacted(tmp_path, monkeypatch):
    from experiments.tracking import log_params, tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = "postgresql://optuna:SECRETPW@db/optuna"
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "studies.run", "--storage", url])
    with pytest.raises(ValueError), tracked_run(uri, "x", tags={"storage": url}) as (client, run_id):
        log_params(client, run_id, {"storage": url})
        raise ValueError(f"cannot open storage {url}")
    run = MlflowClient(uri).get_run(run_id)
    everything = json.dumps([run.data.params, run.data.tags])
    everything += Path(MlflowClient(uri).download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert "SECRETPW" not in everything and "optuna:***@db" in run.data.tags["command"]


def test_a_device_this_torch_build_cannot_use_is_a_one_line_error(capsys):
    import torch

    from experiments.config import ExperimentConfig

    with pytest.raises(ValueError, match="meta"):
        ExperimentConfig(device="meta")
    if torch.cuda.is_available():
        assert ExperimentConfig(device="cuda").device == "cuda"
    else:  # a CPU build: was an AssertionError traceback from inside torch
        err = _one_line(_main("experiments.run", [*TINY_RUN, "--device", "cuda"], capsys))
        assert "device 'cuda' is not available" in err and "cpu" in err


# -- a tracking server that drops out during a run ------------------------------------------------------------
def _start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store in `folder`, at a fixed port (so it can come back at the same URL)."""
    folder.mkdir(exist_ok=True)
    log = open(folder / "mlflow-server.log", "a")  # noqa: SIM115  (the child holds it; closed with the test)
    cmd = [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"), "--host", HOST,
           "--port", str(port), "--workers", "1"]  # fmt: skip
    # no job runner: its 7 helper processes (about 8 s of CPU per start) serve nothing these tests use
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=folder)


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _kill_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_server_that_drops_out_loses_nothing_and_one_that_stays_away_leaves_the_fit_on_disk(tmp_path):
    """A real `mlflow server` under a running fit. (1) It hangs (SIGSTOP: connections accepted, nothing
    answered) and comes back (SIGCONT): the fit never stopped, and the curve points computed meanwhile reach
    the store. (2) It is SIGKILLed: the fit finishes, the command ends with one line (exit 1) naming the
    folder that holds its record."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    url, folder = f"http://{HOST}:{port}", tmp_path / "server"
    env = {**ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
           "GMM_UNSENT_DIR": str(tmp_path / "unsent")}  # fmt: skip
    fit = ["-m", "experiments.run", "--samples", "200", "--eval-every", "100", "--tracking-uri", url,
           "--no-log-figures", "--no-log-model"]  # fmt: skip
    server = _start_server(folder, port)
    try:
        _wait_until(lambda: _healthy(url), 90, "the mlflow server")
        # (1) a brief outage
        stderr = tmp_path / "run1.err"
        with open(stderr, "w") as err:
            proc = subprocess.Popen([sys.executable, *fit, "--iterations", "50000000"], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            client = MlflowClient(url)
            run_id = _wait_until(lambda: _running_with_curve_at(client), 90, "a curve point", proc)
            os.killpg(server.pid, signal.SIGSTOP)
            try:
                _wait_until(lambda: "does not answer" in stderr.read_text(), 60, "the run noticing the outage", proc)
                time.sleep(1.0)  # the fit goes on meanwhile
            finally:
                os.killpg(server.pid, signal.SIGCONT)
            _wait_until(lambda: "answers again" in stderr.read_text(), 60, "the buffered metrics written", proc)
            assert proc.poll() is None  # the fit never stopped
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        steps = sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, TRAIN_CURVE))
        assert len(steps) > 10 and all(b - a <= 100 for a, b in zip(steps, steps[1:], strict=False)), steps  # no gap
        # (2) the server goes away for good
        stderr = tmp_path / "run2.err"
        with open(stderr, "w") as err:
            proc = subprocess.Popen([sys.executable, *fit, "--iterations", "20000"], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            _wait_until(lambda: _running_with_curve_at(MlflowClient(url), other_than=run_id), 90, "a curve point", proc)
            _kill_server(server)
            assert proc.wait(timeout=240) == 1
        finally:
            proc.kill()
    finally:
        _kill_server(server)
    lines = [ln for ln in stderr.read_text().splitlines() if ln.startswith("python -m experiments.run:")]
    assert len(lines) == 1 and "Traceback" not in stderr.read_text(), stderr.read_text()[-3000:]
    kept = Path(lines[0].split("its record is kept in ")[1].split(";")[0])
    assert kept.parent == tmp_path / "unsent" and not list(kept.parent.glob(".*building-*"))
    record = json.loads((kept / "record.json").read_text())
    history = (kept / "nll_history.csv").read_text().splitlines()
    # a header, then the NLL before every step and after the last
    assert record["num_iterations"] == 20000 and len(history) == 1 + 20001
    assert float(history[-1].split(",")[1]) == pytest.approx(record["final_nll"], abs=1e-5)
    import torch

    import gmm

    model = gmm.make_model(record["model"]["family"], record["model"]["num_components"], record["model"]["num_dims"])
    model.load_state_dict(torch.load(kept / "model.pt"))
    assert (kept / "events.csv").read_text().startswith("step,component,kind,detail")


def _running_with_curve_at(client: MlflowClient, other_than: str | None = None) -> str | None:
    try:
        ids = [e.experiment_id for e in client.search_experiments()]
        for run in client.search_runs(ids, "attributes.status = 'RUNNING'"):
            if run.info.run_id != other_than and TRAIN_CURVE in run.data.metrics:
                return run.info.run_id
    except Exception:  # the server is starting
        return None
    return None


def test_keeping_a_fit_locally_is_whole_or_absent(tmp_path, monkeypatch):
    """keep_locally builds the folder under a temporary name: a failure (here the target already exists)
    leaves neither a half-written folder nor the temporary one."""
    import torch

    import gmm
    from experiments.config import ExperimentConfig
    from experiments.run import keep_locally

    monkeypatch.setenv("GMM_UNSENT_DIR", str(tmp_path))
    model = gmm.make_model("diagonal", 2, 2)
    result = gmm.fit(model, torch.randn(40, 2, generator=torch.Generator().manual_seed(0)), num_iterations=3)
    config = ExperimentConfig(family="diagonal", components=2, iterations=3)
    kept = keep_locally("r1", config, model, result, [], RuntimeError("gone"))
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        ["record.json", "nll_history.csv", "events.csv", "metrics.csv", "model.pt"]
    )
    with pytest.raises(OSError):
        keep_locally("r1", config, model, result, [], RuntimeError("gone again"))  # r1 holds files already
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1"]  # no .r1.building-* left behind
    assert json.loads((kept / "record.json").read_text())["why"] == "gone"  # the first record is untouched
