"""Run one experiment: load its data, fit by gradient descent (and EM), log everything to one MLflow run.

    .venv/bin/python -m experiments.run --family full --components 5 --seed 42
    .venv/bin/python -m experiments.run --data points.csv --columns x,y --components 3
    make run FAMILY=full SEED=42 [DATA_SEED=0] [DATA=FILE] [CONFIG=FILE]     then     make ui

What one run holds (read back with `MlflowClient`, or `load_model(run_id)` for the model):
- params: each setting once, with the value in effect (`ExperimentConfig.flat`); the exact config is the
  artifact `config.json`;
- metric curves with steps (the prefix groups them in the UI): `nll/train` every `log_every` steps (and at
  the last), `nll/val`, `events/clamps`, `events/resets` (cumulative), `variance/min` (smallest variance of
  any component), `lr/mixture`, `lr/component` every `eval_every` steps, `nll/em` (EM's iterations);
- single values (experiments.metrics.METRICS: one definition each): `summary/true_nll_train`,
  `summary/true_nll_val` (the generating parameters; not for a data file), `summary/em_nll_train`,
  `summary/em_nll_val`, `summary/gd_em_gap`, `summary/em_converged` (with `em`), `summary/recovery_error`
  (mean distance of Hungarian-matched means), `summary/ari` (adjusted Rand index on all points), EM's
  `summary/em_recovery_error` and `summary/em_ari`, `summary/num_iterations`, `summary/spike_count`; timings
  `time/wall_time`, `time/iterations_per_second`, `time/init_time`, `time/compile_time`, and the cost of the
  tracking itself: `time/tracking_time` (every MLflow call but figures), `time/tracking_overhead` (its
  fraction of the fit's wall time) and `time/figure_time`;
- artifacts: `events.csv` (every clamp and reset), `config.json`, `figures/fit.png`, `figures/nll_curve.png`
  (train NLL of GD and EM, validation NLL over them), `figures/smallest_variance.png` (each component's
  smallest variance at every evaluation, log scale, the clamp as a line, clamp events and resets marked);
- the fitted model as an MLflow model (pytorch flavor, signature, input example): `runs:/<run_id>/model`,
  the run's "Logged models", with the final metrics linked to it;
- the data as the run's dataset input; tags: `dataset.fingerprint` (sha256 of the data), `dataset.name`,
  `dataset.shape`, `dataset.split` (and `dataset.file`, `dataset.file_sha256` for a file), git commit and
  dirtiness, versions, platform and the exact command line (experiments.tracking.repro_tags).

Metrics are buffered and written with `log_batch` at most every few seconds while the fit runs (so a long
fit's curves grow in the UI) and once at the end (experiments.run_log); the model is logged and loaded by
experiments.models, and a fit whose store went away is kept on disk by experiments.unsent. If the fit raises
(a non-finite NLL, a failed factorization, Ctrl-C, SIGTERM), what was measured until then is logged before the
run ends FAILED or KILLED (experiments.tracking.tracked_run).

Exit status: 0 done, 1 the fit failed (run marked FAILED), 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException

import gmm
from gmm.cli import OneLineParser

from .commands import module
from .config import ExperimentConfig, add_arguments, from_args
from .datasets import Dataset, load_dataset
from .metrics import Measured, measure, mlflow_values
from .models import LEGACY_MODEL_ARTIFACT, MODEL_NAME, load_model, log_model
from .redact import redact
from .run_log import (
    CLAMP_CURVE,
    EM_CURVE,
    EVENT_COLUMNS,
    RESET_CURVE,
    TRAIN_CURVE,
    VAL_CURVE,
    Evaluator,
    RunLogger,
    curve_steps,
    events_csv,
    log_dataset_input,
    log_figure,
    log_figures,
    log_fit_record,
    log_partial_record,
)
from .tracking import (
    StopRun,
    add_tracking_arguments,
    get_client,
    log_params,
    real_run_id,
    resolve_tracking_uri,
    start_command,
    tracked_run,
)
from .unsent import UNSENT_DIR, keep_locally

__all__ = [
    "ExperimentResult", "StopRun", "load_model", "run_experiment", "main",
    # importable from here as before the split into run_log, models and unsent (tests, studies, users)
    "EVENT_COLUMNS", "LEGACY_MODEL_ARTIFACT", "MODEL_NAME", "TRAIN_CURVE", "UNSENT_DIR", "curve_steps", "events_csv",
    "keep_locally",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment measured. NLLs are mean nats per sample; NaN where not measured.

    Every metric of experiments.metrics.METRICS is an attribute by its name (`result.train_nll`, `result.ari`,
    and EM's `result.em_nll_train`, `result.em_ari`, ...), read from `metrics`.

    Attributes:
        run_id: the MLflow run.
        config: the experiment's config.
        fit: the gradient-descent FitResult (history, events, timings).
        em: the EM FitResult when `config.em`, else None.
        model: the fitted model; em_model: EM's (None without EM).
        fingerprint: sha256 of the dataset.
        metrics: every metric's value by name (experiments.metrics.measure).
        tracking_time: seconds spent in MLflow calls (figures excluded); figure_time: drawing + logging them.
    """

    run_id: str
    config: ExperimentConfig
    fit: gmm.FitResult = field(repr=False)
    em: gmm.FitResult | None = field(repr=False)
    model: gmm.MixtureModel = field(repr=False)
    fingerprint: str
    metrics: Mapping[str, float]
    tracking_time: float = 0.0
    figure_time: float = 0.0
    em_model: gmm.MixtureModel | None = field(default=None, repr=False)

    def __getattr__(self, name: str):
        # only reached for names that are not fields: the metrics (guarded, as unpickling probes attributes
        # before `metrics` exists)
        metrics = self.__dict__.get("metrics")
        if metrics is not None and name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or metric {name!r}")

    @property
    def tracking_overhead(self) -> float:
        return self.tracking_time / self.fit.wall_time if self.fit.wall_time > 0 else float("nan")

    def final_metrics(self) -> dict[str, float]:
        """The run's final scalar metrics as floats (MLflow gets those with a section; non-finite ones are left out)."""
        return {name: float(value) for name, value in self.metrics.items()}


# what the learning rates and the clamp mean since gmm fits in standardized coordinates (gmm.standardize)
UNIT_PARAMS = {
    "lr_units": "per data std: Adam runs on (x - mean) / std (per axis; one RMS std for isotropic families)",
    "clamp_units": "variance in the data's units",
}


# -- the experiment ---------------------------------------------------------------------------------------
def run_experiment(
    config: ExperimentConfig,
    tracking_uri: str | None = None,
    experiment_name: str = "gmm",
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> ExperimentResult:
    """Fit `config`'s model to its data and log the run to MLflow (see the module docstring).

    Args:
        config: the experiment.
        tracking_uri: MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db.
        experiment_name: MLflow experiment (created when missing).
        parent_run_id: nest the run under this one.
        run_name: default "<family> seed <seed>".
        tags: extra run tags.
        on_eval: called as on_eval(step, val_nll) every `eval_every` steps (the training NLL stands in when
            there is no validation split); it may raise `StopRun` to end the run early (e.g. pruning).

    Returns:
        An ExperimentResult; `result.run_id` names the run.

    Raises:
        TypeError / ValueError: a bad config or tracking URI (raised before any run is created).
        gmm.NonFiniteNLLError / FloatingPointError: the NLL went non-finite (the run ends FAILED).
        StopRun, KeyboardInterrupt: the run ends with the status they carry / KILLED.
    """
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig; got {type(config).__name__}")
    uri = resolve_tracking_uri(tracking_uri)
    data = load_dataset(config.data_spec())  # bad data fails here, before a run exists
    run_tags = run_tags_of(config, data, tags)
    name = run_name or default_run_name(config, data)
    with tracked_run(uri, experiment_name, run_name=name, parent_run_id=parent_run_id, tags=run_tags) as (
        client,
        run_id,
    ):
        try:
            return _run(config, data, client, run_id, on_eval)
        except BaseException as err:
            try:
                err.run_id = run_id  # the CLI names the run it marked FAILED / KILLED
            except AttributeError:
                pass
            raise


def run_tags_of(config: ExperimentConfig, data: Dataset, tags: Mapping[str, str] | None) -> dict[str, str]:
    """The tags of a run: what the data is (fingerprint, name, shape, split, file), the family, then `tags`."""
    run_tags = {
        "dataset.fingerprint": data.fingerprint,
        "dataset.name": data.name or config.dataset or "generated",
        "dataset.shape": f"{len(data.train) + len(data.val)} x {data.num_dims}",
        "dataset.split": f"{len(data.train)} train / {len(data.val)} validation, seed {data.spec.seed + 1}",
        "family": config.family,
        **(tags or {}),
    }
    if config.data_file is not None:
        from .userdata import file_sha256

        run_tags["dataset.file"] = str(Path(config.data_file).resolve())
        run_tags["dataset.file_sha256"] = file_sha256(config.data_file)
    return run_tags


def default_run_name(config: ExperimentConfig, data: Dataset) -> str:
    return f"{config.family}{f' {data.name}' if config.data_file else ''} seed {config.seed}"


def start_logging(config: ExperimentConfig, data: Dataset, client, run_id: str) -> RunLogger:
    """A run's logger, after its params and dataset input are logged."""
    logger = RunLogger(client, run_id)
    logger.timed(log_params, client, run_id, {**config.flat(), **UNIT_PARAMS})
    logger.timed(log_dataset_input, client, run_id, data, config)
    logger.last_flush = time.perf_counter()  # the first flush comes _FLUSH_SECONDS into the fit, not into the setup
    return logger


def _run(config: ExperimentConfig, data: Dataset, client, run_id: str, on_eval) -> ExperimentResult:
    logger = start_logging(config, data, client, run_id)
    device, dtype = torch.device(config.device), config.torch_dtype
    train, val = data.train.to(device, dtype), data.val.to(device, dtype)
    model = gmm.make_model(config.family, config.model_components, config.model_dims, dtype=dtype, device=device)
    evaluator = Evaluator(model, val, config, logger, on_eval)
    logger.in_fit = True
    try:
        result = gmm.fit(model, train, **config.fit_options(), log_freq=config.resolved_eval_every, callback=evaluator)
    except BaseException:
        log_partial_record(logger, model.fit_result_, config)
        raise
    logger.in_fit = False
    return finish_run(config, data, logger, model, result, evaluator, train, val)


def finish_run(config, data, logger, model, result, evaluator, train, val) -> ExperimentResult:
    """`_finish`, and a store that is gone for longer than the retries does not take the fit's result with it."""
    try:
        return _finish(config, data, logger, model, result, evaluator, train, val)
    except MlflowException as err:
        try:
            run_id = real_run_id(logger.client, logger.run_id, wait=False) or logger.run_id  # a stand-in if not made
            err.kept_at = keep_locally(run_id, config, model, result, logger.unsent(), err)
        except Exception as keep_err:  # the store's error stays the one reported
            log.error("could not keep run %s's fit locally either: %s", logger.run_id, keep_err)
        raise


def _finish(config, data, logger, model, result, evaluator, train, val) -> ExperimentResult:
    """After the fit: EM, the metrics (experiments.metrics), and everything the run logs at its end (curves,
    single values, figures, config, model)."""
    client, run_id = logger.client, logger.run_id
    em_model, em_result = _fit_em(config, train) if config.em else (None, None)
    values = measure(Measured(config, data, result, model, em_result, em_model, train, val))
    log_fit_record(logger, result, config, flush=False)  # its curve goes with the one write below
    if val.shape[0] and evaluator.last_step != result.num_iterations:
        logger.add({VAL_CURVE: values["val_nll"]}, result.num_iterations, flush=False)
        evaluator.val_steps.append(result.num_iterations)
        evaluator.val_values.append(values["val_nll"])
    if em_result is not None:
        logger.add_curve(EM_CURVE, em_result.nll_history.tolist(), range(len(em_result.nll_history)))
    finals = mlflow_values(values)
    if result.warnings:  # gmm's ConvergenceWarnings, also on stderr; the spikes are in events.csv
        logger.timed(client.set_tag, run_id, "fit.warnings", " | ".join(result.warnings)[:5000])
    if evaluator.last_step != result.num_iterations:  # the counts are the last points of their curves
        finals[CLAMP_CURVE], finals[RESET_CURVE] = result.clamp_count, result.reset_count
    logger.add(finals, result.num_iterations, flush=False)
    if config.log_figures or config.log_model:  # seconds of work follow: a kill meanwhile keeps what is measured
        logger.flush()
    try:
        figure_time = _log_run_figures(config, data, logger, model, result, em_result, evaluator, values["true_nll_train"])
        logger.timed(client.log_dict, run_id, config.to_dict(), "config.json")
        if config.log_model:
            linked = [m for m in logger.latest.values() if m.step == result.num_iterations]  # the final values
            logger.timed(log_model, client, run_id, model, train, result.num_iterations, linked)
    except BaseException:
        logger.flush()  # the curves and values are written before the error ends the run
        raise
    tracking_time = logger.seconds  # every store call of the run but this last write
    overhead = tracking_time / result.wall_time if result.wall_time > 0 else None
    timings = {"tracking_time": tracking_time, "tracking_overhead": overhead, "figure_time": figure_time}
    logger.add({f"time/{k}": v for k, v in timings.items()}, result.num_iterations)
    logger.flush()
    return ExperimentResult(
        run_id=run_id, config=config, fit=result, em=em_result, model=model, fingerprint=data.fingerprint,
        metrics=values, tracking_time=tracking_time, figure_time=figure_time, em_model=em_model,
    )  # fmt: skip


def _fit_em(config: ExperimentConfig, train: torch.Tensor) -> tuple[gmm.MixtureModel, gmm.FitResult]:
    """EM from the config's initialization, on the fit's device and dtype."""
    from gmm.em import fit_em

    em_model = gmm.make_model(
        config.family, config.model_components, config.model_dims, dtype=train.dtype, device=train.device
    )
    with warnings.catch_warnings():  # not converging is logged as em_converged = 0 instead
        warnings.simplefilter("ignore", UserWarning)
        em_result = fit_em(em_model, train, **config.em_options())
    return em_model, em_result


def _log_run_figures(config, data, logger, model, result, em_result, evaluator, true_nll: float) -> float:
    """The run's figures (config.log_figures); returns the seconds spent drawing and logging them."""
    if not config.log_figures:
        return 0.0
    client, run_id = logger.client, logger.run_id
    t0 = time.perf_counter()
    validation = (evaluator.val_steps, evaluator.val_values)
    log_figures(client, run_id, data, model, result, em_result, true_nll, validation)
    if evaluator.steps:
        from gmm.plot import plot_smallest_variances

        smallest = torch.stack(evaluator.smallest)
        fig = plot_smallest_variances(evaluator.steps, smallest, config.clamp, result.events)
        log_figure(client, run_id, fig, "figures/smallest_variance.png")
    return time.perf_counter() - t0


# -- command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m experiments.run",
        description="Fit one Gaussian mixture by gradient descent and track it in MLflow.",
        epilog="Flags override the --config file, which overrides the defaults.",
    )
    add_arguments(parser)
    add_tracking_arguments(parser, "gmm")
    parser.add_argument("--run-name", "--run_name", dest="run_name", default=None, help="MLflow run name")
    return parser


UI_URL = "http://127.0.0.1:5000"
# MLflow 3's UI opens experiments in its GenAI view unless told otherwise; this URL parameter picks the
# model-training view (runs, charts, logged models), which the UI then remembers
UI_VIEW = "workflowType=machine_learning"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on `uri`."""
    from .tracking import PROJECT_ROOT

    if uri == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}":
        return "make ui"
    return module("mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5000")


def run_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the UI that `ui_command` starts."""
    return f"{UI_URL}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start_command()
    try:
        config = from_args(args)
        uri = resolve_tracking_uri(args.tracking_uri)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(
        f"Fitting {config.family} (K={config.model_components}, D={config.model_dims}, {config.iterations} steps, "
        f"seed {config.seed}) to {describe_data(config)}; tracking to {redact(uri)}",
        flush=True,
    )
    try:
        result = run_experiment(config, uri, args.experiment, run_name=args.run_name)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    except (FloatingPointError, torch.linalg.LinAlgError) as err:
        run = getattr(err, "run_id", None)
        print(
            f"{parser.prog}: fit failed: {' '.join(str(err).split())}" + (f" (run {run} marked FAILED)" if run else ""),
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as err:
        run = getattr(err, "run_id", None)
        print(f"{parser.prog}: interrupted" + (f" (run {run} marked KILLED)" if run else ""), file=sys.stderr)
        return 130
    except MlflowException as err:  # the store failed mid-run (a server gone for longer than the retries)
        kept = getattr(err, "kept_at", None)
        print(
            f"{parser.prog}: lost the tracking store {redact(uri)}: {redact(' '.join(str(err).split()))[:300]}; "
            + (f"the fit finished and its record is kept in {kept}; " if kept else "")
            + "check the store and rerun (the next command ends the open run KILLED)",
            file=sys.stderr,
        )
        return 1
    print(format_summary(result))
    print(f"Run id: {result.run_id}")
    experiment_id = get_client(uri).get_run(result.run_id).info.experiment_id
    print(f"Open the UI: {ui_command(uri)}   then {run_url(experiment_id, result.run_id)}")
    return 0


def describe_data(config: ExperimentConfig) -> str:
    """What data a run fits, in words (so that a config without data fields says it fits generated data)."""
    if config.data_file is not None:
        n, d = config.data_spec().shape
        columns = f", columns {config.columns}" if config.columns else ""
        scaled = ", standardized" if config.standardize else ""
        return f"the file {config.data_file} ({n} x {d}{columns}{scaled}; split with data_seed {config.data_seed})"
    spec = config.data_spec()
    what = (
        f"{spec.num_samples} points of {spec.num_components} {spec.family} clusters in {spec.num_dims}-D, radius "
        f"{spec.radius:g}{f', {spec.perturbation}' if spec.perturbation else ''}, data_seed {spec.seed}"
    )
    if config.dataset is not None:
        return f"the named dataset {config.dataset} ({what})"
    return f"generated data ({what}; --dataset NAME or --data FILE fit other data)"


def format_summary(r: ExperimentResult) -> str:
    """A few lines on the run's outcome."""
    truth = math.isfinite(r.true_nll_train)  # False for a data file: no generating parameters to compare with
    lines = [
        f"Final Loss: {r.train_nll:.2f}",
        f"train NLL {r.train_nll:.6f}, validation NLL {r.val_nll:.6f}"
        + (f", true parameters {r.true_nll_train:.6f} / {r.true_nll_val:.6f}" if truth else ""),
        f"{r.fit.num_iterations} steps in {r.fit.wall_time:.2f} s ({r.fit.iterations_per_second:.0f} it/s); "
        f"{r.clamp_count} clamps, {r.reset_count} resets"
        + (f"; recovery error {r.recovery_error:.4f}, ARI {r.ari:.4f}" if truth else ""),
    ]
    if r.em is not None:
        lines.append(
            f"EM NLL {r.em_nll_train:.6f} (GD - EM: {r.gd_em_gap:+.6f} nats/sample, {r.em.num_iterations} "
            f"iterations, {r.em.wall_time:.3f} s)"
        )
    lines.append(
        f"tracking: {r.tracking_time:.3f} s ({100 * r.tracking_overhead:.1f}% of the fit), figures {r.figure_time:.2f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from experiments.commands import leave

    leave(main())
