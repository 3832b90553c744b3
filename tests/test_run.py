"""experiments.run against a real MLflow store in a temporary folder: what a run logs, how it ends, the CLI."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import adjusted_rand_score

from experiments import ExperimentConfig, load_model, run_experiment
from experiments.metrics import adjusted_rand_index, recovery_error
from experiments.run import EVENT_COLUMNS, UNIT_PARAMS, curve_steps, main
from experiments.tracking import get_client

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(samples=200, components=3, iterations=60, eval_every=10, log_every=1, mixture_lr=1e-2)


def _history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in points], [m.value for m in points]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short tracked run with EM, shared by the read-back tests."""
    tmp = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = ExperimentConfig(**SMALL, em=True)
    result = run_experiment(config, uri, "test-run")
    return uri, config, result


def test_run_finishes_with_params_and_tags(finished):
    uri, config, result = finished
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {**config.flat(), **UNIT_PARAMS}  # what the learning rates and clamp mean
    tags = run.data.tags
    assert tags["dataset.fingerprint"] == result.fingerprint and len(result.fingerprint) == 64
    for key in ("git.commit", "git.dirty", "version.torch", "version.numpy", "version.mlflow", "platform", "command"):
        assert tags[key], key


def test_metric_curves_match_the_fit_record(finished):
    uri, config, result = finished
    client = MlflowClient(uri)
    steps, values = _history(client, result.run_id, "nll/train")
    assert steps == list(range(config.iterations + 1))  # log_every=1: the whole curve
    np.testing.assert_allclose(values, result.fit.nll_history.numpy(), rtol=0, atol=0)
    val_steps, val_values = _history(client, result.run_id, "nll/val")
    assert val_steps == list(range(10, config.iterations + 1, 10))
    assert val_values[-1] == pytest.approx(result.val_nll, abs=1e-12)
    assert all(math.isfinite(v) for v in val_values)
    for key in ("events/clamps", "events/resets", "lr/mixture", "lr/component"):
        assert [s for s, _ in zip(*_history(client, result.run_id, key), strict=True)][:6] == val_steps, key
    lr_steps, lrs = _history(client, result.run_id, "lr/component")
    assert lrs[0] > lrs[-1] >= 0  # cosine annealing


def test_final_metrics(finished):
    uri, config, result = finished
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    for key in (
        "summary/true_nll_train",
        "summary/true_nll_val",
        "summary/em_nll_train",
        "summary/em_nll_val",
        "summary/gd_em_gap",
        "summary/recovery_error",
        "summary/ari",
        "summary/em_recovery_error",
        "summary/em_ari",
        "time/wall_time",
        "time/iterations_per_second",
        "time/tracking_overhead",
        "time/figure_time",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["nll/train"] == pytest.approx(result.train_nll, abs=1e-12)  # the last point of the curve
    assert metrics["summary/em_nll_train"] == pytest.approx(result.em.final_nll, abs=1e-12)
    assert metrics["summary/num_iterations"] == config.iterations
    assert 0.0 <= metrics["summary/ari"] <= 1.0 and metrics["summary/recovery_error"] >= 0
    # each name once: curves under nll/, events/, lr/; single values under summary/ and time/
    assert {k.split("/")[0] for k in metrics} == {"nll", "events", "variance", "lr", "summary", "time"}
    # the single values are exactly these (experiments.metrics.METRICS; names older runs and reports share)
    assert {k for k in metrics if k.split("/")[0] in ("summary", "time")} == {
        *(f"summary/{k}" for k in ("true_nll_train", "true_nll_val", "em_nll_train", "em_nll_val", "gd_em_gap")),
        *(f"summary/{k}" for k in ("recovery_error", "ari", "em_recovery_error", "em_ari", "em_converged")),
        "summary/num_iterations", "summary/spike_count",
        *(f"time/{k}" for k in ("wall_time", "iterations_per_second", "init_time", "compile_time")),
        *(f"time/{k}" for k in ("tracking_time", "tracking_overhead", "figure_time")),
    }  # fmt: skip
    assert result.final_metrics()["ari"] == result.ari == metrics["summary/ari"]


def test_events_figures_and_model_artifacts(finished, tmp_path):
    uri, config, result = finished
    client = MlflowClient(uri)
    text = Path(client.download_artifacts(result.run_id, "events.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(csv.reader(io.StringIO(text)).__next__()) == EVENT_COLUMNS
    assert len(rows) == len(result.fit.events)
    figures = {Path(f.path).name: f.file_size for f in client.list_artifacts(result.run_id, "figures")}
    assert set(figures) == {"fit.png", "nll_curve.png", "smallest_variance.png"} and min(figures.values()) > 10_000
    model = load_model(result.run_id, uri)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.log_prob(x), result.model.log_prob(x), rtol=0, atol=0)


def test_events_are_logged_when_components_collapse(mlflow_uri):
    """A floor above every variance the data can support (the generated points lie within about +-12, so no
    weighted scatter reaches 1000): every component's variance is pushed below the floor at every step, so the
    clamp acts on each of them from step 1. The run must log exactly the fit's events and counts."""
    config = ExperimentConfig(**{**SMALL, "iterations": 20, "clamp": 1e3}, log_figures=False, log_model=False)
    result = run_experiment(config, mlflow_uri)
    first_step = {e.component for e in result.fit.events if e.step == 1 and e.kind == "clamp"}
    assert first_step == set(range(config.components))
    client = MlflowClient(mlflow_uri)
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(result.run_id, "events.csv", ".")).read_text())))
    assert [(int(r["step"]), int(r["component"]), r["kind"]) for r in rows] == [
        (e.step, e.component, e.kind) for e in result.fit.events
    ]
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["events/clamps"] == result.clamp_count and metrics["events/resets"] == result.reset_count


def test_a_raising_fit_ends_failed_and_keeps_its_curve(mlflow_uri):
    def boom(step, val_nll):
        if step >= 20:
            raise RuntimeError("boom at the third evaluation")

    with pytest.raises(RuntimeError, match="boom") as info:
        run_experiment(ExperimentConfig(**SMALL), mlflow_uri, on_eval=boom)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(info.value.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom at the third evaluation"
    steps, _ = _history(client, run.info.run_id, "nll/train")
    assert steps == list(range(0, 20))  # the curve up to the failure was not lost
    assert "Traceback" in Path(client.download_artifacts(run.info.run_id, "error.txt", ".")).read_text()


def test_a_nan_ends_failed_with_the_message(mlflow_uri):
    # Adam moves every raw parameter by about lr per step: 1e30 overflows the covariances at once
    config = ExperimentConfig(**{**SMALL, "component_lr": 1e30}, log_figures=False)
    with pytest.raises(FloatingPointError, match="non-finite") as info:
        run_experiment(config, mlflow_uri)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(info.value.run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["error"]
    assert all(math.isfinite(v) for _, v in zip(*_history(client, run.info.run_id, "nll/train"), strict=True))


def _wait_for_running(uri: str, proc: subprocess.Popen, timeout: float = 60.0):
    client = get_client(uri)  # may open the new store while the run creates its tables: must take turns
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        exp = client.get_experiment_by_name("gmm") if Path(uri[len("sqlite:///") :]).exists() else None
        if exp is not None:
            runs = client.search_runs([exp.experiment_id])
            if runs and runs[0].data.metrics.get("nll/val") is not None:
                return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("the run did not start logging in time")


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    # Unserialized, MLflow's table creation races: all but one process fail inside Alembic
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # in a folder that does not exist yet
    code = (
        "import sys; from experiments.tracking import ensure_experiment, get_client;"
        "c = get_client(sys.argv[1]); ensure_experiment(c, 'gmm', uri=sys.argv[1]); print(c.search_experiments())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [err[-500:] for rc, err in results if rc]
    assert [e.name for e in MlflowClient(uri).search_experiments()].count("gmm") == 1
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["mlflow.db"]  # no lock file left behind


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_ends_killed(tmp_path, sig):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--iterations",
        "50000000",
        "--eval-every",
        "200",
        "--log-every",
        "100",
        "--tracking-uri",
        uri,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = _wait_for_running(uri, proc)  # val_nll is flushed after 5 s of fitting
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"run {run_id} marked KILLED" in err and "Traceback" not in err
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["stop_reason"]
    assert len(MlflowClient(uri).get_metric_history(run_id, "nll/train")) > 10


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--family", "fulll"], "did you mean 'full'"),
        (["--iterations", "0"], "iterations"),
        (["--component_lr", "-1"], "component_lr"),
        (["--config", "missing.yaml"], "cannot read config file"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(mlflow_uri, capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--tracking-uri", mlflow_uri])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_cli_bad_config_file(mlflow_uri, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("family: full\ncomponnets: 3\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "--tracking-uri", mlflow_uri])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "componnets" in err and "components" in err and err.count("\n") == 1


def test_cli_prints_run_id_and_ui_command(mlflow_uri, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    ExperimentConfig(**SMALL, log_figures=False).to_file(path)
    assert main(["--config", str(path), "--seed", "7", "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out
    run_id = out.split("Run id: ")[1].split()[0]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.params["seed"] == "7" and run.data.params["samples"] == "200"  # flag over file over default
    assert "mlflow ui --backend-store-uri" in out and "Final Loss:" in out


def test_curve_steps_always_end_on_the_last_step():
    assert curve_steps(11, 5) == [0, 5, 10]
    assert curve_steps(12, 5) == [0, 5, 10, 11]
    assert curve_steps(1, 5) == [0]


def test_metrics_against_scikit_learn():
    g = np.random.default_rng(0)
    for _ in range(20):
        a, b = g.integers(0, 4, 60), g.integers(0, 5, 60)
        assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0
    truth = g.normal(size=(4, 3))
    assert recovery_error(truth[[2, 0, 3, 1]], truth) == pytest.approx(0.0, abs=1e-12)
    assert recovery_error(truth + [1.0, 0, 0], truth) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same D"):
        recovery_error(truth, truth[:, :2])


def test_mlflow_conventions_experiment_kind_logged_model_and_dataset(finished, tmp_path):
    import mlflow.pytorch

    from experiments.tracking import fluent_tracking_uri

    uri, config, result = finished
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3: a training view
    [output] = run.outputs.model_outputs  # the run's "Logged models"
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == result.run_id and output.step == config.iterations
    assert logged.experiment_id == run.info.experiment_id
    # the run's final values are linked to the model (its "Metrics" in the UI), at the final step
    linked = {m.key: m for m in logged.metrics}
    assert {"nll/train", "nll/val", "events/clamps"} <= set(linked), sorted(linked)
    for key, metric in linked.items():
        assert metric.step == config.iterations and metric.model_id == output.model_id
        assert metric.value == pytest.approx(run.data.metrics[key], nan_ok=True), key
    with fluent_tracking_uri(uri):
        model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model", dst_path=str(tmp_path))
        served = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.log_prob(x), result.model.log_prob(x), rtol=0, atol=0)
    np.testing.assert_allclose(served.predict(x.numpy()), result.model.log_prob(x).numpy(), rtol=0, atol=0)
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "generated" and result.fingerprint.startswith(dataset.dataset.digest)
    assert client.get_run(result.run_id).data.params["components"] == "3"  # each param once


def test_a_fluent_run_the_caller_has_open_does_not_take_the_model(mlflow_uri):
    # a notebook's `with mlflow.start_run():` around run_experiment: the model and its metrics go to the
    # experiment's own run, not to the caller's
    import mlflow

    from experiments.tracking import fluent_tracking_uri

    config = ExperimentConfig(**SMALL, log_figures=False)
    with fluent_tracking_uri(mlflow_uri), mlflow.start_run() as outer:
        result = run_experiment(config, mlflow_uri, "test-run")
    client = MlflowClient(mlflow_uri)
    caller = client.get_run(outer.info.run_id)
    assert not (caller.outputs and caller.outputs.model_outputs) and not caller.data.metrics
    [output] = client.get_run(result.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == result.run_id and output.step == config.iterations
    assert {"nll/train", "nll/val"} <= {m.key for m in logged.metrics}


def test_runs_after_their_experiment_was_deleted_land_in_it_restored(mlflow_uri):
    """tracked_run remembers each experiment's id (one store query per process, not per run); an experiment
    deleted meanwhile is looked up, and restored, again."""
    from experiments.tracking import tracked_run

    with tracked_run(mlflow_uri, "kept") as (client, first):
        pass
    experiment = client.get_run(first).info.experiment_id
    client.delete_experiment(experiment)
    with tracked_run(mlflow_uri, "kept") as (client, second):
        pass
    assert client.get_run(second).info.experiment_id == experiment
    assert client.get_experiment(experiment).lifecycle_stage == "active"
    assert client.get_run(second).info.status == "FINISHED"


def test_a_loggers_curves_wait_as_numbers_while_the_store_fails_and_are_written_whole_after(mlflow_uri, caplog):
    """RunLogger keeps whole curves as numbers: a flush during the fit that the store refuses keeps them (and
    `unsent()` lists them point by point, for keep_locally); the next flush writes every point."""
    from experiments.run_log import RunLogger
    from experiments.tracking import tracked_run

    with tracked_run(mlflow_uri, "logger") as (client, run_id):
        logger = RunLogger(client, "0" * 32)  # no such run: the store refuses every write
        logger.in_fit = True
        logger.add({"nll/val": 2.0}, 10, flush=False)
        logger.add_curve("nll/train", [3.0, 2.5, float(2)], range(3))
        logger.flush()
        assert "does not answer" in caplog.text
        assert [(m.key, m.step, m.value) for m in logger.unsent()] == [
            ("nll/val", 10, 2.0), ("nll/train", 0, 3.0), ("nll/train", 1, 2.5), ("nll/train", 2, 2.0)
        ]  # fmt: skip
        assert logger.latest["nll/train"].step == 2 and logger.latest["nll/train"].value == 2.0
        logger.run_id = run_id  # the store answers again
        logger.flush()
        assert logger.unsent() == [] and "answers again" in caplog.text
    train = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "nll/train"))
    assert train == [(0, 3.0), (1, 2.5), (2, 2.0)] and client.get_run(run_id).data.metrics["nll/val"] == 2.0
