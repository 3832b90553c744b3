"""A tiny study end to end: real Optuna storage and a real MLflow store in a temporary folder.

Trials land in the storage, nested MLflow runs sit under one parent per invocation with the trial's params,
the parent holds best_params.json, trials.csv and Optuna's plots, the best-parameter file is a valid
experiment config, a second invocation resumes the study, two worker processes share it, and a worker
killed with SIGKILL leaves no trial RUNNING once the next invocation starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import ExperimentConfig
from experiments.datasets import datasets_for_family
from studies.run import main

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "isotropic"
STUDY = f"{FAMILY}-v4"
TINY = ["--iterations", "40", "--eval-every", "20", "--no-progress"]
pytestmark = pytest.mark.usefixtures("writer_on")  # the product's default: the helper makes the MLflow writes


def _args(tmp: Path, uri: str, trials: int, *extra: str) -> list[str]:
    return [
        "--family", FAMILY, "--trials", str(trials), "--storage", str(tmp / "journal.log"),
        "--tracking-uri", uri, "--best-dir", str(tmp / "best"), *TINY, *extra,
    ]  # fmt: skip


def _study(tmp: Path) -> optuna.Study:
    from studies.storage import open_storage

    return optuna.load_study(study_name=STUDY, storage=open_storage(str(tmp / "journal.log")))


def _runs(uri: str, kind: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"study-{STUDY}")
    return client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'", max_results=1000)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert main(_args(tmp, uri, 3)) == 0
    return tmp, uri


def test_trials_are_recorded_in_the_storage(tiny_study):
    tmp, _ = tiny_study
    trials = _study(tmp).get_trials(deepcopy=False)
    assert len(trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done, "no trial completed"
    for t in done:
        assert {"clamp", "component_lr"} <= set(t.params)
        assert all(f"val_nll/{name}" in t.user_attrs for name in datasets_for_family(FAMILY))
        assert t.intermediate_values  # reported for pruning


def test_nested_mlflow_runs_under_one_parent(tiny_study):
    tmp, uri = tiny_study
    (parent,) = _runs(uri, "study")
    trial_runs = _runs(uri, "trial")
    assert len(trial_runs) == 3 and parent.info.status == "FINISHED"
    study = _study(tmp)
    for run in trial_runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        trial = study.trials[int(run.data.tags["trial"])]
        assert float(run.data.params["clamp"]) == pytest.approx(trial.params["clamp"], rel=1e-12)
    fits = _runs(uri, "fit")
    trial_ids = {r.info.run_id for r in trial_runs}
    assert fits and all(r.data.tags["mlflow.parentRunId"] in trial_ids for r in fits)
    assert all(len(MlflowClient(uri).get_metric_history(r.info.run_id, "nll/train")) > 2 for r in fits[:3])


def test_study_artifacts_and_best_file(tiny_study, tmp_path):
    tmp, uri = tiny_study
    (parent,) = _runs(uri, "study")
    client = MlflowClient(uri)
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"best_params.json", "trials.csv", "plots"} <= names
    plots = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert "optimization_history.png" in plots
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "best_params.json", str(tmp_path))).read_text())
    study = _study(tmp)
    assert best["value"] == pytest.approx(study.best_value)
    config = ExperimentConfig.from_file(tmp / "best" / f"{STUDY}.json")  # `make run CONFIG=...` takes it
    assert config.family == FAMILY and config.clamp == pytest.approx(study.best_params["clamp"])


def test_rerunning_resumes_the_same_study(tmp_path):
    """Its own study (the module's shared one must stay as the other tests expect it, whatever the order)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(_args(tmp_path, uri, 1)) == 0
    assert main(_args(tmp_path, uri, 2)) == 0
    trials = _study(tmp_path).trials
    assert len(trials) == 3 and [t.number for t in trials] == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len(_runs(uri, "study")) == 2  # one parent per invocation


@pytest.mark.slow
def test_two_worker_processes_account_for_every_trial(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(_args(tmp_path, uri, 4, "--jobs", "2")) == 0
    trials = _study(tmp_path).trials
    assert len(trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert any(t.state == TrialState.COMPLETE for t in trials)
    assert len(_runs(uri, "trial")) == 4
    assert all(r.info.status != "RUNNING" for r in _runs(uri, "trial") + _runs(uri, "fit"))


def _kill_worker_when(tmp: Path, args: list[str], ready, settle: float = 0.0) -> None:
    """Start `studies.run args` in a process and SIGKILL it once `ready(trials)` holds (`settle` s later)."""
    cmd = [sys.executable, "-m", "studies.run", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the study ended before it could be killed"
            if (tmp / "journal.log").exists():
                try:
                    if ready(_study(tmp).trials):
                        break
                except KeyError:  # the study is not created yet
                    pass
            time.sleep(0.3)
        else:
            raise AssertionError("the trials did not start in time")
        time.sleep(settle)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_killed_worker_leaves_no_running_trial(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _args(tmp_path, uri, 50)
    args[args.index("40")] = "100000"  # long fits: the worker is surely mid-trial when it dies
    _kill_worker_when(tmp_path, args, lambda trials: any(t.state == TrialState.RUNNING for t in trials))
    assert any(t.state == TrialState.RUNNING for t in _study(tmp_path).trials)
    args[args.index("50")] = "0"  # the next invocation fails the dead worker's trial before adding any
    assert main(args) == 0
    trials = _study(tmp_path).trials
    assert not any(t.state == TrialState.RUNNING for t in trials)
    assert trials[0].state == TrialState.FAIL
    assert all(r.info.status != "RUNNING" for r in _runs(uri, "trial") + _runs(uri, "fit"))


@pytest.mark.slow
def test_the_best_trial_of_an_unpruned_study_survives_the_pruner(tmp_path):
    # 40 unpruned trials find a best; enqueued into a pruned study of the same family after 15 other trials,
    # those parameters complete with the same value (the pruner compares means over the same datasets)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*_args(tmp_path, uri, 40), "--datasets", f"{FAMILY}-quantized,{FAMILY}-separated", "--no-plots"]
    common[common.index("40", common.index("--iterations"))] = "30"
    assert main([*common, "--pruner", "none"]) == 0
    best = _study(tmp_path).best_trial
    pruned_args = [*common, "--study", "pruned-{family}", "--pruner", "median"]
    pruned_args[pruned_args.index("40")] = "15"
    assert main(pruned_args) == 0
    from studies.storage import open_storage

    pruned = optuna.load_study(study_name=f"pruned-{FAMILY}", storage=open_storage(str(tmp_path / "journal.log")))
    pruned.enqueue_trial(best.params)
    pruned_args[pruned_args.index("15")] = "1"
    assert main(pruned_args) == 0
    trials = pruned.get_trials(deepcopy=False)
    assert len(trials) == 16 and trials[15].params == best.params
    assert trials[15].state == TrialState.COMPLETE and trials[15].value == pytest.approx(best.value, rel=1e-6)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_batch_written_behind_links_each_trial_to_its_real_run_and_no_stand_in_id_reaches_a_record(tmp_path):
    # the helper creates the runs (stand-in ids in this process): Optuna's mlflow_run_id, the fit runs' parent
    # tags and every other tag hold the store's ids, for a trial pruned after its first dataset too
    from experiments.tracking import write_behind
    from experiments.writer import STAND_IN
    from studies.objective import Objective, StudySettings
    from studies.space import load_space

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = (f"{FAMILY}-separated", f"{FAMILY}-overlapping")
    settings = StudySettings(FAMILY, names, load_space(FAMILY), iterations=20, eval_every=10)
    study = optuna.create_study(pruner=_AlwaysPrune())
    trials = [study.ask() for _ in range(2)]
    with write_behind(uri):
        outcomes = Objective(settings, uri, "behind").run_batch(trials)
    assert [state for state, _ in outcomes] == [TrialState.PRUNED] * 2
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("behind").experiment_id], max_results=100)
    ids = {r.info.run_id for r in runs}
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)  # 2 trial runs, a fit run each
    assert not any(STAND_IN in v for r in runs for v in (*r.data.tags.values(), *r.data.params.values()))
    for trial in trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert run_id in ids and client.get_run(run_id).data.tags["trial"] == str(trial.number)
        (fit,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
        assert fit.data.tags["kind"] == "fit" and fit.data.tags["dataset"] == names[0]


def test_a_pruned_trial_ends_finished_in_mlflow_with_a_pruned_tag(tmp_path):
    from studies.objective import Objective, StudySettings
    from studies.space import load_space

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = (f"{FAMILY}-separated", f"{FAMILY}-overlapping")
    settings = StudySettings(FAMILY, names, load_space(FAMILY), iterations=20, eval_every=10)
    study = optuna.create_study(pruner=_AlwaysPrune())
    study.optimize(Objective(settings, uri, "pruned"), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and trial.intermediate_values.keys() == {1}
    client = MlflowClient(uri)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"  # KILLED is kept for interrupts
    assert run.data.tags["pruned"].startswith(f"after 1 of 2 datasets ({FAMILY}-separated)")
    (fit,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert fit.info.status == "FINISHED" and fit.data.tags["dataset"] == f"{FAMILY}-separated"


def test_batched_and_one_at_a_time_studies_record_every_trial_and_agree(tmp_path):
    # --batch 3 fits the three trials of each dataset as one population; --batch 1 one trial at a time, each as a
    # population of one: every trial is recorded whole either way, and a trial's value does not depend on the
    # batch it ran in (a member's arithmetic does not depend on B), so the same parameters give the same value
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    datasets = ["--datasets", f"{FAMILY}-point-mass,{FAMILY}-separated", "--no-plots", "--pruner", "none"]
    assert main([*_args(tmp_path, uri, 3), *datasets, "--study", "batched-{family}", "--batch", "3"]) == 0
    from studies.storage import open_storage

    storage = open_storage(str(tmp_path / "journal.log"))
    batched = optuna.load_study(study_name=f"batched-{FAMILY}", storage=storage)
    one = optuna.create_study(study_name=f"one-{FAMILY}", storage=storage)
    one.enqueue_trial(batched.trials[1].params)
    assert main([*_args(tmp_path, uri, 2), *datasets, "--study", "one-{family}", "--batch", "1"]) == 0
    for study in (batched, optuna.load_study(study_name=f"one-{FAMILY}", storage=storage)):
        trials = study.get_trials(deepcopy=False)
        assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
        assert all({f"val_nll/{FAMILY}-point-mass", f"val_nll/{FAMILY}-separated"} <= set(t.user_attrs) for t in trials)
        assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    again = optuna.load_study(study_name=f"one-{FAMILY}", storage=storage).trials[0]
    assert again.params == batched.trials[1].params and again.value == batched.trials[1].value
    client = MlflowClient(uri)
    for study_name in (f"batched-{FAMILY}", f"one-{FAMILY}"):
        exp = client.get_experiment_by_name(f"study-{study_name}")
        fits = client.search_runs([exp.experiment_id], "tags.kind = 'fit'", max_results=100)
        trial_runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=100)
        assert len(fits) == 2 * len(trial_runs) and all(r.info.status == "FINISHED" for r in fits + trial_runs)
        assert all(len(client.get_metric_history(r.info.run_id, "nll/val")) >= 2 for r in fits)


@pytest.mark.slow
def test_a_killed_batch_is_failed_and_retried_whole(tmp_path):
    # a worker killed while it fits a batch of 3 leaves 3 RUNNING trials; the next invocation with --retries 1
    # fails each of them as stale, queues a copy of each (same parameters) and fits the copies as its batch
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*_args(tmp_path, uri, 3), "--batch", "3", "--retries", "1", "--pruner", "none"]
    args[args.index("40")] = "6000"  # a batch's fit takes seconds: it is surely running when the worker dies
    args += ["--datasets", f"{FAMILY}-separated", "--no-plots"]
    batch_running = lambda trials: sum(t.state == TrialState.RUNNING for t in trials) == 3  # noqa: E731
    _kill_worker_when(tmp_path, args, batch_running, settle=0.5)  # 0.5 s into the batch's fit
    killed = {t.number: t.params for t in _study(tmp_path).trials}
    assert len(killed) == 3 and all(t.state == TrialState.RUNNING for t in _study(tmp_path).trials)
    assert main(args) == 0
    trials = _study(tmp_path).trials
    assert not any(t.state == TrialState.RUNNING for t in trials)
    assert [t.state for t in trials[:3]] == [TrialState.FAIL] * 3
    try:  # Optuna >= 4.9 renamed it
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:
        from optuna.storages import RetryFailedTrialCallback as Retry
    retried = {Retry.retried_trial_number(t): t for t in trials[3:]}
    assert sorted(retried) == [0, 1, 2], [t.system_attrs for t in trials]
    assert all(retried[n].params == params for n, params in killed.items())
    assert all(t.state == TrialState.COMPLETE for t in retried.values()), [t.state for t in retried.values()]
    assert all(r.info.status != "RUNNING" for r in _runs(uri, "trial") + _runs(uri, "fit"))
