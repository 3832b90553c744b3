"""Studies: search space, storage heartbeats, the objective, and `python -m studies.run` end to end.

Real Optuna storages (journal file, SQLite) and a real MLflow store in tmp_path; fits are a few dozen steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import gmm
from studies import space as space_mod
from studies.space import FloatParam, load_space
from studies.storage import (
    BEAT_KEY,
    OWNER_KEY,
    HeartbeatJournalStorage,
    HeartbeatRDBStorage,
    fail_stale_trials,
    open_storage,
    trial_id,
)

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- search space -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_default_space_has_log_learning_rates_and_clamp(family):
    space = load_space(family)
    params = {p.name: p for p in space.params}
    assert params["component_lr"].log and params["mixture_lr"].log
    assert params["mixture_lr"].frozen and not params["component_lr"].frozen
    if family == "constant":
        assert "clamp" not in params  # constant covariances are not trained: nothing to floor
    else:
        assert params["clamp"] == FloatParam("clamp", 1e-8, 1e-1, log=True)


def test_space_suggest_and_to_config_agree_and_frozen_means_zero():
    space = load_space("full")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_frozen = seen_free = False
    for _ in range(20):
        trial = study.ask()
        overrides = space.suggest(trial)
        study.tell(trial, 0.0)
        assert space.to_config(study.trials[-1].params) == overrides
        assert 1e-8 <= overrides["clamp"] <= 1e-1
        if trial.params["mixture_lr_frozen"]:
            seen_frozen = True
            assert overrides["mixture_lr"] == 0.0 and "mixture_lr" not in trial.params
        else:
            seen_free = True
            assert 1e-3 <= overrides["mixture_lr"] <= 0.3
    assert seen_frozen and seen_free


def test_space_override_file_replaces_entries_one_by_one(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "default:\n  clamp: {low: 1.0e-6, high: 1.0e-2, log: true}\n"
        "full:\n  init: {choices: [kmeans++, random]}\n  mixture_lr: null\n  iterations: 300\n"
    )
    full = load_space("full", path)
    assert [p.name for p in full.params] == ["clamp", "component_lr", "reset", "init"]
    assert full.params[0] == FloatParam("clamp", 1e-6, 1e-2, log=True)
    assert full.fixed == {"iterations": 300}
    tied = load_space("tied", path)  # the default section reaches every family; the full section does not
    assert [p.name for p in tied.params] == ["clamp", "component_lr", "mixture_lr", "reset"] and tied.fixed == {}
    json_path = tmp_path / "space.json"
    json_path.write_text(json.dumps({"constant": {"component_lr": {"low": 0.01, "high": 0.1}}}))
    assert load_space("constant", json_path).params[0] == FloatParam("component_lr", 0.01, 0.1)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fulll:\n  clamp: 1.0e-3\n", "unknown section 'fulll'.*'full'"),
        ("default:\n  clampp: {low: 1.0e-3, high: 1.0e-2}\n", "unknown parameter 'clampp'.*'clamp'"),
        ("default:\n  clamp: {low: 1.0e-2, high: 1.0e-3}\n", "low must be below high"),
        ("default:\n  clamp: {low: 0, high: 1.0e-3, log: true}\n", "log range needs low > 0"),
        ("default:\n  clamp: {low: 1.0e-3}\n", "needs 'low' and 'high'"),
        ("default:\n  init: {choices: []}\n", "non-empty list"),
        ("- clamp\n", "must map sections"),
    ],
)
def test_space_file_errors_say_what_is_wrong(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_space("full", path)


def test_unknown_family_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'diagonal'"):
        load_space("diagonl")
    with pytest.raises(ValueError, match="cannot read"):
        load_space("full", "/nonexistent/space.yaml")


def test_checked_in_space_file_is_the_default():
    assert space_mod.DEFAULT_SPACE_FILE == ROOT / "studies" / "space.yaml"


# -- storage and heartbeats ---------------------------------------------------------------------------------
def test_storage_urls(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "a.log")), HeartbeatJournalStorage)
    assert isinstance(open_storage(f"journal:{tmp_path / 'b.jsonl'}"), HeartbeatJournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path / 'c.db'}"), HeartbeatRDBStorage)
    for bad, match in [
        ("nosuch://host/db", "cannot open storage"),
        (str(tmp_path / "studies.db"), "unknown storage"),
        (str(tmp_path / "missing" / "a.log"), "does not exist"),
        (f"sqlite:///{tmp_path / 'missing' / 'c.db'}", "cannot open storage"),
    ]:
        with pytest.raises(ValueError, match=match):
            open_storage(bad)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_stale_trials_of_dead_or_silent_workers_fail(tmp_path, kind):
    url = str(tmp_path / "s.log") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url, heartbeat_interval=1, grace_period=5)
    study = optuna.create_study(study_name="s", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists (reaped)
    ids = [trial_id(storage, study.ask()) for _ in range(3)]
    storage.set_trial_system_attr(ids[0], OWNER_KEY, f"{os.uname().nodename}:{dead.pid}")
    storage.record_heartbeat(ids[1])  # this live process: not stale
    if kind == "journal":  # another host, silent for longer than the grace period
        storage.set_trial_system_attr(ids[2], OWNER_KEY, "elsewhere:1")
        storage.set_trial_system_attr(ids[2], BEAT_KEY, time.time() - 100)
    fail_stale_trials(study)
    states = {t.number: t for t in study.get_trials()}
    assert states[0].state == optuna.trial.TrialState.FAIL
    assert f"worker process {dead.pid} died" in states[0].user_attrs["fail_reason"]
    assert states[1].state == optuna.trial.TrialState.RUNNING
    if kind == "journal":
        assert states[2].state == optuna.trial.TrialState.FAIL
        assert "no heartbeat" in states[2].user_attrs["fail_reason"]


def test_optuna_private_heartbeat_api():
    """studies.storage subclasses Optuna's private `optuna.storages._heartbeat.BaseHeartbeat` and overrides its
    `_get_stale_trial_ids` (no public API adds heartbeats to a storage): say so loudly when Optuna changes them."""
    import inspect

    try:
        from optuna.storages._heartbeat import BaseHeartbeat
        from optuna.storages._heartbeat import fail_stale_trials as optuna_fail_stale_trials
    except ImportError as err:
        pytest.fail(
            f"Optuna {optuna.__version__} moved or removed optuna.storages._heartbeat.BaseHeartbeat ({err}); "
            "studies/storage.py subclasses it to give JournalStorage heartbeats: port HeartbeatJournalStorage"
        )
    hooks = {"record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    assert BaseHeartbeat.__abstractmethods__ == hooks, (
        f"Optuna {optuna.__version__} changed the abstract methods of optuna.storages._heartbeat.BaseHeartbeat "
        f"to {sorted(BaseHeartbeat.__abstractmethods__)}; studies/storage.py implements {sorted(hooks)}: port it"
    )
    assert "_get_stale_trial_ids" in inspect.getsource(optuna_fail_stale_trials), (
        f"Optuna {optuna.__version__}'s fail_stale_trials no longer calls BaseHeartbeat._get_stale_trial_ids, which "
        "studies/storage.py overrides to fail dead workers' trials: port HeartbeatJournalStorage/HeartbeatRDBStorage"
    )
    assert optuna.storages.fail_stale_trials is optuna_fail_stale_trials
    assert issubclass(HeartbeatJournalStorage, BaseHeartbeat) and issubclass(HeartbeatRDBStorage, BaseHeartbeat)


# -- command line: bad input --------------------------------------------------------------------------------
def _main(argv):
    from studies.run import main

    return main(argv)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--family", "ful"], "unknown family 'ful'.*did you mean 'full'"),
        (["--family", "full", "--storage", "nosuch://x"], "cannot open storage"),
        (["--family", "full", "--storage", "/nonexistent-dir/studies.log"], "does not exist"),
        (["--family", "full", "--trials", "-1"], "--trials must be >= 0"),
        (["--family", "all", "--study", "mine"], "needs '{family}'"),
        (["--family", "full", "--jobs", "two"], "invalid int value"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) if "two" in argv else _no_raise():
        rc = _main([*argv, "--best-dir", str(tmp_path)])
        assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m studies.run: error:")
    import re

    assert re.search(match, err), err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_bad_family_subprocess_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "studies.run", "--family", "nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown family 'nope'" in proc.stderr


# -- pruning and partial values ------------------------------------------------------------------------------
def _finished(study: optuna.Study, values: dict[int, float], state=optuna.trial.TrialState.COMPLETE) -> None:
    dist = optuna.distributions.FloatDistribution(1e-8, 1e-1, log=True)
    study.add_trial(
        optuna.trial.create_trial(
            params={"clamp": 1e-4},
            distributions={"clamp": dist},
            intermediate_values=values,
            value=values[max(values)],
            state=state,
        )
    )


def test_margin_pruner_compares_trials_at_the_same_step_and_ignores_small_differences():
    from studies.sampling import MarginPruner

    study = optuna.create_study(pruner=MarginPruner(margin=0.05, min_trials=3, warmup_steps=2))
    for offset in (0.0, 0.01, 0.02):
        _finished(study, {1: 9.0 + offset, 2: 5.0 + offset, 3: 4.0 + offset})
    trial = study.ask()
    trial.report(100.0, 1)  # far worse, but before the warm-up: kept
    assert not trial.should_prune()
    trial.report(5.04, 2)  # above the median (5.01) by less than the margin: kept
    assert not trial.should_prune()
    trial.report(4.1, 3)  # above the median of step 3 (4.01) by more than the margin: pruned
    assert trial.should_prune()


def test_trials_csv_keeps_pruned_values_apart_as_partial():
    from studies.artifacts import trials_csv

    study = optuna.create_study()
    _finished(study, {1: 3.0, 2: 2.5})
    _finished(study, {1: 1.0}, state=optuna.trial.TrialState.PRUNED)  # better, but only one dataset
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(trials_csv(study))))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"]
    assert float(rows[0]["value"]) == 2.5 and rows[0]["partial_value"] == ""
    assert rows[1]["value"] == "" and float(rows[1]["partial_value"]) == 1.0


# -- process-wide state ------------------------------------------------------------------------------------
def test_imports_change_no_process_state_and_get_client_turns_telemetry_off(tmp_path):
    """Importing the tracking and study modules sets no environment variable, warning filter or logger level;
    the first get_client turns MLflow telemetry off (MLflow reads the variable at import and before each report)
    and restores the logger levels it lowered while the store opened."""
    code = f"""
import logging, os, warnings
theirs = lambda: {{k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_TELEMETRY")}}  # MLflow's own
import mlflow  # sets levels and variables of its own at import
env = theirs()
levels = {{n: logging.getLogger(n).level for n in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")}}
ours = lambda: [f for f in warnings.filters if f[1] is not None and "noload" in f[1].pattern]
import experiments.tracking, experiments.stores, studies.run, studies.worker
assert theirs() == env, set(theirs()) ^ set(env)
assert not ours() and {{n: logging.getLogger(n).level for n in levels}} == levels
from mlflow.telemetry import get_telemetry_client
experiments.tracking.get_client("sqlite:///{tmp_path / "m.db"}")
assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and get_telemetry_client() is None
assert "_MLFLOW_TELEMETRY_SESSION_ID" not in os.environ  # the client MLflow made at import is gone
assert not ours() and {{n: logging.getLogger(n).level for n in levels}} == levels
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "Creating initial MLflow database tables" not in proc.stderr and "noload" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("searched_lr", [True, False])
@pytest.mark.parametrize(
    ("values", "scale"),
    [((10.0, 12.0, 15.0), "linear"), ((10.0, 12.0, 3e5), "log"), ((-5.0, -4.0, 3e5), "symlog")],
)
def test_nll_vs_clamp_shows_every_trial_and_goes_logarithmic_when_a_collapsed_one_would_flatten_the_others(
    values, scale, searched_lr
):
    """A collapsed trial's validation NLL (1e5 and more) against the good ones' (about 10): on a linear axis
    every good trial would sit on one line at the bottom. With component_lr fixed (not searched) the points
    are drawn in one colour (a NaN colour would hide them)."""
    from optuna.distributions import FloatDistribution

    from studies.artifacts import plot_nll_vs_clamp

    study = optuna.create_study(study_name="s")
    dist = FloatDistribution(1e-8, 1e-1, log=True)
    for i, value in enumerate(values):
        params = {"clamp": 10.0 ** -(i + 2), **({"component_lr": 10.0 ** -(i + 1)} if searched_lr else {})}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dict.fromkeys(params, dist), value=value))
    fig = plot_nll_vs_clamp(study)
    ax = fig.axes[0]
    assert ax.get_yscale() == scale
    assert len(fig.axes) == (2 if searched_lr else 1)  # the component_lr colour bar
    assert len(ax.collections[0].get_offsets().compressed()) == 2 * len(values)  # no point masked out
    low, high = ax.get_ylim()
    assert low <= min(values) and high >= max(values)  # every trial is on the plot


def test_a_journal_trial_is_created_with_its_owner_in_one_record(tmp_path):
    # the owner used to follow in a second record: a worker SIGKILLed between the two (CI hit it under load,
    # with --batch asking 16 trials) left a RUNNING trial without owner, which only the 60-s grace period ended
    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.log")), study_name="s")
    study.ask()
    records = [json.loads(line) for line in (tmp_path / "j.log").read_text().splitlines()]
    created = [r for r in records if "datetime_start" in r]
    assert len(created) == 1 and created[0]["state"] == optuna.trial.TrialState.RUNNING.value
    assert created[0]["system_attrs"] == {OWNER_KEY: f"{socket.gethostname()}:{os.getpid()}"}
    assert [r for r in records if OWNER_KEY in json.dumps(r)] == created  # and in no later record
