"""Write-behind tracking (experiments.writer): a helper process makes a block's MLflow writes, in order, and
loses none of them when this process is killed, interrupted, or the helper itself dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from experiments import writer
from experiments.stores import PID_TAG, WRITER_TAG, why_dead
from experiments.tracking import get_client, runs_first, tracked_run, write_behind
from experiments.writer import WriteBehindClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("writer_on")


def _curve(n: int = 300) -> list[Metric]:
    return [Metric("nll/train", float(i) / 7, 1_700_000_000_000 + i, i) for i in range(n)]


def test_writes_inside_the_block_land_in_order_and_reads_see_them(mlflow_uri):
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb", run_name="a") as (client, run_id):
            assert isinstance(client, WriteBehindClient)
            client.log_batch(run_id, metrics=_curve())
            client.set_tag(run_id, "t", "1")
            client.set_tag(run_id, "t", "2")  # the later write wins: they are made in order
            client.log_text(run_id, "a,b\n", "events.csv")
            seen = client.get_run(run_id)  # a read waits for the writes before it
            assert seen.data.metrics["nll/train"] == pytest.approx(299 / 7) and seen.data.tags["t"] == "2"
    # after the block: every write made, the run ended, the helper gone; the client is a plain one again
    raw = MlflowClient(mlflow_uri)
    run = raw.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["t"] == "2"
    assert len(raw.get_metric_history(run_id, "nll/train")) == 300
    assert not isinstance(get_client(mlflow_uri), WriteBehindClient)
    assert client._proc.poll() == 0


def test_writes_that_fail_are_kept_and_counted_and_the_next_ones_go_on(mlflow_uri, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("GMM_UNSENT_DIR", str(tmp_path / "unsent"))
    gone = "0" * 32  # no such run: every write to it fails in the helper
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            client.log_batch(gone, metrics=_curve(3))
            client.set_tag(run_id, "between", "yes")  # made: the store itself works
            for k in range(5):  # after 3 failures in a row the helper stops retrying them
                client.set_tag(gone, "k", str(k))
            client.set_tag(run_id, "after", "yes")
            assert client.drain() == 6
            assert client.drain() == 0  # each failure is counted once
    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags["between"] == "yes" and tags["after"] == "yes"
    (kept,) = (tmp_path / "unsent").glob("writes-*.jsonl")
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [r["method"] for r in records] == ["log_batch"] + ["set_tag"] * 5 and records[0]["args"][0] == gone
    assert len(records[0]["kwargs"]["metrics"]) == 3 and records[0]["kwargs"]["metrics"][2]["step"] == 2
    assert [r["args"][2] for r in records[1:]] == ["0", "1", "2", "3", "4"]  # in the order they were made
    assert f"log_batch of run {gone} was not made" in capfd.readouterr().err
    assert "6 MLflow writes" in caplog.text and str(kept) in caplog.text


@pytest.mark.parametrize("when", ["starting", "writing"])
def test_a_dead_helper_is_noticed_and_its_unmade_writes_are_made_here(mlflow_uri, caplog, when):
    curve = _curve(300)
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            if when == "starting":
                client._proc.kill()  # before the helper made anything (a stray kill, OOM)
            for start in range(0, 300, 10):
                client.log_batch(run_id, metrics=curve[start : start + 10])
            if when == "writing":
                client._proc.kill()  # with writes in the pipe, some made, some not
            client._proc.wait(timeout=30)
            client.set_tag(run_id, "after", "yes")  # noticed here: the unmade writes and this one are made here
            client.log_batch(run_id, metrics=[Metric("x", 1.0, 0, 0)])
    assert "the MLflow writer process ended" in caplog.text
    raw = MlflowClient(mlflow_uri)
    run = raw.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["after"] == "yes" and run.data.metrics["x"] == 1.0
    assert {m.step for m in raw.get_metric_history(run_id, "nll/train")} == set(range(300))  # the whole curve


_PARENT = """
import faulthandler, os, signal, sys, time
from mlflow.entities import Metric
from experiments import writer
from experiments.tracking import runs_first, tracked_run, write_behind
faulthandler.dump_traceback_later(90)  # a hang shows every thread's stack in the test's failure
uri, how = sys.argv[1], sys.argv[2]
if how == "kill":  # a helper that waits for its turn this long would miss the test's deadline
    writer.TURN_WAIT = 600.0
with write_behind(uri):
    with tracked_run(uri, "wb") as (client, run_id):
        print(run_id, flush=True)
        if how == "kill":  # dies holding the store's turn (runs_first): the kernel drops it, and the helper goes on
            turn = runs_first(uri)  # kept: a dropped block would give the turn back when collected
            turn.__enter__()
        for k in range(40):  # about 0.5 MB of curves: most are still in the pipe when this process dies
            client.log_batch(run_id, metrics=[Metric(f"c{k}", float(i), 0, i) for i in range(250)])
        client.set_tag(run_id, "sent", "all")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os.killpg(0, signal.SIGINT)  # Ctrl-C at the terminal: its group gets it (the helper has its own session)
        while True:  # not signal.pause(): a signal taken before pause() starts (by another thread) never wakes it
            time.sleep(0.05)
"""


@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_a_killed_or_interrupted_parent_loses_no_write_it_sent(mlflow_uri, tmp_path, how):
    get_client(mlflow_uri)  # the store exists before the parent starts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_PARENT), mlflow_uri, how],
            capture_output=True, text=True, env=env, timeout=120, start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:  # its stderr holds the stacks faulthandler dumped at 90 s
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        pytest.fail(f"the parent did not end in 120 s; its stderr:\n{stderr[-6000:]}")
    run_id = proc.stdout.split()[0]
    raw = MlflowClient(mlflow_uri)
    deadline = time.monotonic() + 60  # SIGKILL: the orphaned helper finishes what the pipe holds, then exits
    while time.monotonic() < deadline and raw.get_run(run_id).data.tags.get("sent") != "all":
        time.sleep(0.2)
    run = raw.get_run(run_id)
    assert run.data.tags.get("sent") == "all", proc.stderr[-2000:]
    assert all(len(raw.get_metric_history(run_id, f"c{k}")) == 250 for k in range(40))
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL and run.info.status == "RUNNING"  # ended KILLED by the next command
    else:
        assert proc.returncode != 0 and run.info.status == "KILLED"
        assert run.data.tags["stop_reason"].startswith("interrupted")


def test_the_helper_waits_while_this_process_opens_runs_first_and_a_read_there_gives_the_turn_back(mlflow_uri, monkeypatch):
    monkeypatch.setattr(writer, "TURN_WAIT", 120.0)  # the helper's longest wait, far beyond this test's waits
    raw = MlflowClient(mlflow_uri)
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            client.set_tag(run_id, "s", "0")
            assert client.get_run(run_id).data.tags["s"] == "0"  # the helper is up (its start takes seconds)
            with runs_first(mlflow_uri):
                client.set_tag(run_id, "t", "1")
                with tracked_run(mlflow_uri, "wb", run_name="opened first") as (_, other):
                    time.sleep(1.0)  # the helper had time to make the tag, had it not waited for its turn
                    assert "t" not in raw.get_run(run_id).data.tags and raw.get_run(other).info.status == "RUNNING"
                    t0 = time.monotonic()
                    assert client.get_run(run_id).data.tags["t"] == "1"  # a read drains: the turn is given back
                    assert time.monotonic() - t0 < 60  # not after the helper's longest wait
                client.set_tag(run_id, "u", "2")
            assert client.get_run(run_id).data.tags["u"] == "2"  # after the block, the helper's turn again
    assert raw.get_run(other).info.status == "FINISHED" and client._proc.poll() == 0


_FULL_PIPE = """
import faulthandler, sys
from experiments.tracking import runs_first, tracked_run, write_behind
faulthandler.dump_traceback_later(90)
uri = sys.argv[1]
with write_behind(uri):
    with tracked_run(uri, "wb") as (client, run_id):
        print(run_id, flush=True)
        with runs_first(uri):  # 2.4 MB of writes: the pipe (1 MiB) fills while the helper waits for its turn
            for k in range(24):
                client.log_text(run_id, f"{k:02d}" * 50_000, f"blobs/{k:02d}.txt")
        client.set_tag(run_id, "sent", "all")
"""


def test_writes_that_fill_the_pipe_inside_runs_first_do_not_stop_the_helper(mlflow_uri):
    # the helper waits for its turn at most TURN_WAIT, then writes without it: the pipe empties, nothing hangs
    get_client(mlflow_uri)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_FULL_PIPE), mlflow_uri], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        pytest.fail(f"the parent did not end in 120 s; its stderr:\n{stderr[-6000:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = MlflowClient(mlflow_uri)
    run = raw.get_run(proc.stdout.split()[0])
    assert run.info.status == "FINISHED" and run.data.tags["sent"] == "all"
    assert [a.path for a in raw.list_artifacts(run.info.run_id, "blobs")] == [f"blobs/{k:02d}.txt" for k in range(24)]


def test_a_run_stays_open_while_the_helper_of_its_dead_process_still_writes(mlflow_uri):
    # a dead parent's helper makes what the pipe holds (maybe the run's end): the next command's sweep of dead
    # runs waits for it rather than ending the run KILLED under it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
            assert tags[WRITER_TAG] == str(client.pid)
            orphaned = {**tags, PID_TAG: dead.stdout.strip()}  # as if this process had been killed
            assert why_dead(orphaned, time.time(), host) is None  # its helper runs
    assert client._proc.poll() is not None  # the block ended: the helper is gone
    assert "is gone" in why_dead(orphaned, time.time(), host)
    assert why_dead({**orphaned, WRITER_TAG: str(os.getpid())}, time.time(), host)  # a live pid of another program
