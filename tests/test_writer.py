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
from experiments.tracking import get_client, log_csv, log_curve, real_run_id, tracked_run, write_behind
from experiments.writer import WriteBehindClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("writer_on")


def _curve(n: int = 300) -> list[Metric]:
    return [Metric("nll/train", float(i) / 7, 1_700_000_000_000 + i, i) for i in range(n)]


def test_writes_inside_the_block_land_in_order_and_reads_see_them(mlflow_uri, tmp_path):
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb", run_name="a") as (client, run_id):
            assert isinstance(client, WriteBehindClient)
            client.log_batch(run_id, metrics=_curve())
            client.set_tag(run_id, "t", "1")
            client.set_tag(run_id, "t", "2")  # the later write wins: they are made in order
            client.log_text(run_id, "a,b\n", "events.csv")
            # writes whose entities the helper builds (`later`): a curve's Metrics, a CSV text
            log_curve(client, run_id, "nll/val", [0.5, 0.25, 0.125], [0, 10, 20], timestamp=1_700_000_000_000)
            log_csv(client, run_id, ("step", "kind"), [(3, "clamp"), (4, 'reset, then "more"')], "events2.csv")
            seen = client.get_run(run_id)  # a read waits for the writes before it
            assert seen.data.metrics["nll/train"] == pytest.approx(299 / 7) and seen.data.tags["t"] == "2"
            assert seen.data.metrics["nll/val"] == 0.125
            run_id = real_run_id(client, run_id)
    # after the block: every write made, the run ended, the helper gone; the client is a plain one again
    raw = MlflowClient(mlflow_uri)
    run = raw.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["t"] == "2"
    assert len(raw.get_metric_history(run_id, "nll/train")) == 300
    val = [(m.step, m.value, m.timestamp) for m in raw.get_metric_history(run_id, "nll/val")]
    assert sorted(val) == [(0, 0.5, 1_700_000_000_000), (10, 0.25, 1_700_000_000_000), (20, 0.125, 1_700_000_000_000)]
    text = Path(raw.download_artifacts(run_id, "events2.csv", str(tmp_path))).read_text()
    assert text == 'step,kind\n3,clamp\n4,"reset, then ""more"""\n'
    assert not isinstance(get_client(mlflow_uri), WriteBehindClient)
    assert client._proc.poll() == 0


def test_writes_that_fail_are_kept_and_counted_and_the_next_ones_go_on(mlflow_uri, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.setenv("GMM_UNSENT_DIR", str(tmp_path / "unsent"))
    monkeypatch.setattr(writer, "RETRY_SECONDS", 0.01)  # the helper's too: it is read when the helper starts
    gone = "0" * 32  # no such run: every write to it fails in the helper
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            client.log_batch(gone, metrics=_curve(3))
            client.set_tag(run_id, "between", "yes")  # made: the store itself works
            for k in range(5):  # after 3 failures in a row the helper stops retrying them
                client.set_tag(gone, "k", str(k))
            log_curve(client, gone, "c", [1.5], [7], timestamp=5)  # a write the helper builds: kept as its numbers
            client.set_tag(run_id, "after", "yes")
            client.log_param(run_id, "p", "1")
            client.log_param(run_id, "p", "2")  # refused (params do not change): kept under the run's real id
            assert client.drain() == 8
            run_id = real_run_id(client, run_id)
            assert client.drain() == 0  # each failure is counted once
    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags["between"] == "yes" and tags["after"] == "yes"
    (kept,) = (tmp_path / "unsent").glob("writes-*.jsonl")
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    methods = ["log_batch"] + ["set_tag"] * 5 + ["experiments.tracking._log_curve_now", "log_param"]
    assert [r["method"] for r in records] == methods and records[0]["args"][0] == gone
    assert len(records[0]["kwargs"]["metrics"]) == 3 and records[0]["kwargs"]["metrics"][2]["step"] == 2
    assert [r["args"][2] for r in records[1:6]] == ["0", "1", "2", "3", "4"]  # in the order they were made
    assert records[6]["args"] == [gone, "c", [1.5], [7], 5] and records[7]["args"] == [run_id, "p", "2"]
    err = capfd.readouterr().err
    assert f"log_batch of run {gone} was not made" in err and f"_log_curve_now of run {gone} was not made" in err
    assert "8 MLflow writes" in caplog.text and str(kept) in caplog.text


@pytest.mark.parametrize("when", ["starting", "writing"])
def test_a_dead_helper_is_noticed_and_its_unmade_writes_are_made_here(mlflow_uri, caplog, when):
    curve = _curve(300)
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            if when == "starting":
                client._proc.kill()  # before the helper made anything (a stray kill, OOM)
            for start in range(0, 300, 10):
                client.log_batch(run_id, metrics=curve[start : start + 10])
            log_curve(client, run_id, "built", [2.0, 3.0], [0, 1])  # a `later` write, made here when unmade there
            if when == "writing":
                client._proc.kill()  # with writes in the pipe, some made, some not
            client._proc.wait(timeout=30)
            client.set_tag(run_id, "after", "yes")  # noticed here: the unmade writes and this one are made here
            client.log_batch(run_id, metrics=[Metric("x", 1.0, 0, 0)])
            run_id = real_run_id(client, run_id)  # "starting": the run too was created here
    assert "the MLflow writer process ended" in caplog.text
    raw = MlflowClient(mlflow_uri)
    run = raw.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["after"] == "yes" and run.data.metrics["x"] == 1.0
    assert {m.step for m in raw.get_metric_history(run_id, "nll/train")} == set(range(300))  # the whole curve
    assert sorted(m.value for m in raw.get_metric_history(run_id, "built")) == [2.0, 3.0]


_PARENT = """
import faulthandler, os, signal, sys, time
from mlflow.entities import Metric
from experiments.tracking import tracked_run, write_behind
faulthandler.dump_traceback_later(90)  # a hang shows every thread's stack in the test's failure
uri, how = sys.argv[1], sys.argv[2]
with write_behind(uri):
    with tracked_run(uri, "wb", run_name="ended " + how):
        pass
    with tracked_run(uri, "wb", run_name="parent " + how) as (client, run_id):
        print(run_id, flush=True)  # a stand-in: the helper creates the run, maybe after this process is dead
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
    assert proc.stdout.startswith(writer.STAND_IN), proc.stderr[-2000:]
    raw = MlflowClient(mlflow_uri)
    experiment = raw.get_experiment_by_name("wb").experiment_id

    def run_of_parent():  # SIGKILL: the orphaned helper makes what the pipe holds (the run's creation too), then exits
        runs = raw.search_runs([experiment], f"attributes.run_name = 'parent {how}'")
        return runs[0] if runs and runs[0].data.tags.get("sent") == "all" else None

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run_of_parent() is None:
        time.sleep(0.2)
    run = run_of_parent()
    assert run is not None, proc.stderr[-2000:]
    assert all(len(raw.get_metric_history(run.info.run_id, f"c{k}")) == 250 for k in range(40))
    if how == "kill":  # the helper, which created the run, ends it once the pipe is empty
        assert proc.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and raw.get_run(run.info.run_id).info.status == "RUNNING":
            time.sleep(0.2)
        run = raw.get_run(run.info.run_id)
        assert run.info.status == "KILLED" and run.data.tags["stop_reason"].endswith("died while the run was open")
    else:
        assert proc.returncode != 0 and run.info.status == "KILLED"
        assert run.data.tags["stop_reason"].startswith("interrupted")
    (ended,) = raw.search_runs([experiment], f"attributes.run_name = 'ended {how}'")
    assert ended.info.status == "FINISHED"  # ended before the parent died: the helper leaves it so


def test_runs_opened_in_the_block_are_made_by_the_helper_and_their_stand_in_ids_work_everywhere(mlflow_uri, tmp_path):
    raw = MlflowClient(mlflow_uri)
    with write_behind(mlflow_uri):
        t0 = int(time.time() * 1000)
        with tracked_run(mlflow_uri, "wb", run_name="parent") as (client, parent):
            with tracked_run(mlflow_uri, "wb", run_name="child", parent_run_id=parent) as (_, child):
                assert parent.startswith(writer.STAND_IN) and child.startswith(writer.STAND_IN)
                client.set_tag(child, "t", "1")  # a write: the helper maps the stand-in
                (tmp_path / "a.txt").write_text("artifact")
                client.log_artifact(child, str(tmp_path / "a.txt"))  # a direct call: mapped here, once the run is made
                assert client.get_run(child).data.tags["t"] == "1"  # a read: mapped after the drain
                real_child = real_run_id(client, child)
                t1 = int(time.time() * 1000)
            real_parent = real_run_id(client, parent)
            ended = int(time.time() * 1000)
            time.sleep(0.05)  # the helper ends the run later than this process did
    assert real_child != child and not real_child.startswith(writer.STAND_IN)
    run = raw.get_run(real_child)
    assert run.info.run_name == "child" and run.data.tags["mlflow.parentRunId"] == real_parent
    assert run.data.tags["t"] == "1" and [a.path for a in raw.list_artifacts(real_child)] == ["a.txt"]
    assert t0 <= run.info.start_time <= t1 and t1 <= run.info.end_time <= ended  # the times this process saw
    assert raw.get_run(real_parent).info.status == "FINISHED" and real_run_id(raw, real_parent) == real_parent


def test_a_run_the_helper_could_not_create_keeps_its_writes_and_one_whose_experiment_was_deleted_is_restored(
    mlflow_uri, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("GMM_UNSENT_DIR", str(tmp_path / "unsent"))
    monkeypatch.setattr(writer, "RETRY_SECONDS", 0.01)
    raw = MlflowClient(mlflow_uri)
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb", run_name="first") as (client, first):
            raw.delete_experiment(raw.get_experiment_by_name("wb").experiment_id)  # tracked_run remembers its id
            with tracked_run(mlflow_uri, "wb", run_name="after the delete") as (_, restored):
                pass
            nowhere = client.create_run_later("987654", int(time.time() * 1000), {}, "in no experiment")
            client.set_tag(nowhere, "k", "v")
            assert real_run_id(client, nowhere) is None and client.drain() == 2  # the creation and the write
            assert real_run_id(client, restored) is not None
    assert raw.get_run(real_run_id(client, restored)).info.status == "FINISHED"
    assert raw.get_experiment_by_name("wb").lifecycle_stage == "active"
    (kept,) = (tmp_path / "unsent").glob("writes-*.jsonl")
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [r["method"] for r in records] == ["create_run", "set_tag"] and records[1]["args"] == [nowhere, "k", "v"]
    assert "its run was not created" in capfd.readouterr().err


def test_a_run_stays_open_while_the_helper_of_its_dead_process_still_writes(mlflow_uri):
    # a dead parent's helper makes what the pipe holds (maybe the run's end): the next command's sweep of dead
    # runs waits for it rather than ending the run KILLED under it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb") as (client, run_id):
            tags = MlflowClient(mlflow_uri).get_run(real_run_id(client, run_id)).data.tags
            assert tags[WRITER_TAG] == str(client.pid)
            orphaned = {**tags, PID_TAG: dead.stdout.strip()}  # as if this process had been killed
            assert why_dead(orphaned, time.time(), host) is None  # its helper runs
    assert client._proc.poll() is not None  # the block ended: the helper is gone
    assert "is gone" in why_dead(orphaned, time.time(), host)
    assert why_dead({**orphaned, WRITER_TAG: str(os.getpid())}, time.time(), host)  # a live pid of another program


def test_a_message_whose_send_fails_is_made_once_here_and_the_helper_is_stopped(mlflow_uri):
    # a pipe that fails while the helper still runs: the message sent last (a run's creation) was kept before
    # the send, so it is made here once; the helper is killed so that it cannot write beside this process
    raw = MlflowClient(mlflow_uri)
    with write_behind(mlflow_uri):
        with tracked_run(mlflow_uri, "wb", run_name="first") as (client, first):
            assert client.get_run(first).info.run_name == "first"  # the helper is up
            client._send.close()  # the next send fails
            with tracked_run(mlflow_uri, "wb", run_name="once") as (_, once):
                client.set_tag(once, "t", "1")  # made here
            assert client._proc.poll() is not None
    experiment = raw.get_experiment_by_name("wb").experiment_id
    (run,) = raw.search_runs([experiment], "attributes.run_name = 'once'")
    assert run.info.status == "FINISHED" and run.data.tags["t"] == "1" and real_run_id(client, once) == run.info.run_id


def test_once_the_helper_is_gone_a_write_to_a_run_not_created_is_kept_and_a_read_of_it_raises(
    mlflow_uri, tmp_path, monkeypatch
):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("GMM_UNSENT_DIR", str(tmp_path / "unsent"))
    monkeypatch.setattr(writer, "RETRY_SECONDS", 0.01)
    with write_behind(mlflow_uri):
        client = get_client(mlflow_uri)
        client._proc.kill()  # before it made anything: this process makes the creation, which fails
        client._proc.wait(timeout=30)
        nowhere = client.create_run_later("987654", int(time.time() * 1000), {}, "in no experiment")
        client.set_tag(nowhere, "k", "v")  # kept, not raised, as the helper would
        assert client.drain() == 2 and real_run_id(client, nowhere) is None
        with pytest.raises(MlflowException, match="was not created"):
            client.get_run(nowhere)
    (kept,) = (tmp_path / "unsent").glob("writes-*.jsonl")
    assert [json.loads(line)["method"] for line in kept.read_text().splitlines()] == ["create_run", "set_tag"]
