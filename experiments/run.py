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
- single values (`metric_key`): `summary/true_nll_train`, `summary/true_nll_val` (the generating
  parameters; not for a data file), `summary/em_nll_train`, `summary/em_nll_val`, `summary/gd_em_gap`,
  `summary/em_converged` (with `em`), `summary/recovery_error` (mean distance of Hungarian-matched means),
  `summary/ari` (adjusted Rand index on all points), `summary/num_iterations`; timings `time/wall_time`,
  `time/iterations_per_second`, `time/init_time`, `time/compile_time`, and the cost of the tracking itself:
  `time/tracking_time` (every MLflow call but figures), `time/tracking_overhead` (its fraction of the fit's
  wall time) and `time/figure_time`;
- artifacts: `events.csv` (every clamp and reset), `config.json`, `figures/fit.png`, `figures/nll_curve.png`
  (train NLL of GD and EM, validation NLL over them), `figures/smallest_variance.png` (each component's
  smallest variance at every evaluation, log scale, the clamp as a line, clamp events and resets marked);
- the fitted model as an MLflow model (pytorch flavor, signature, input example): `runs:/<run_id>/model`,
  the run's "Logged models", with the final metrics linked to it;
- the data as the run's dataset input; tags: `dataset.fingerprint` (sha256 of the data), `dataset.name`,
  `dataset.shape`, `dataset.split` (and `dataset.file`, `dataset.file_sha256` for a file), git commit and
  dirtiness, versions, platform and the exact command line (experiments.tracking.repro_tags).

Metrics are buffered and written with `log_batch` at most every few seconds while the fit runs (so a long
fit's curves grow in the UI) and once at the end. If the fit raises (a non-finite NLL, a failed
factorization, Ctrl-C, SIGTERM), what was measured until then is logged before the run ends FAILED or
KILLED (experiments.tracking.tracked_run).

Exit status: 0 done, 1 the fit failed (run marked FAILED), 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

import gmm
from gmm.cli import OneLineParser
from gmm.options import lr_factor

from .commands import module
from .config import ExperimentConfig, add_arguments, from_args
from .datasets import Dataset, load_dataset
from .metrics import adjusted_rand_index, recovery_error
from .redact import install_log_redaction, redact
from .tracking import (
    MAX_METRICS_PER_BATCH,
    StopRun,
    add_tracking_arguments,
    deferred_signals,
    finite_or_none,
    get_client,
    history_metrics,
    log_metrics_batched,
    log_params,
    resolve_tracking_uri,
    tracked_run,
)

__all__ = ["ExperimentResult", "StopRun", "load_model", "run_experiment", "main"]

log = logging.getLogger(__name__)

_FLUSH_SECONDS = 5.0  # buffered metrics are written at most this often while a fit runs
_OUTAGE_RETRY_SECONDS = 10.0  # while the store does not answer, the next write is tried this much later
MODEL_NAME = "model"  # the logged MLflow model: runs:/<run_id>/model
LEGACY_MODEL_ARTIFACT = "model/model.pt"  # what runs logged before the model became an MLflow model
EVENT_COLUMNS = ("step", "component", "kind", "detail")
# MLflow metric names: curves share a prefix so the UI groups them into one section each ("nll", "events",
# "lr"); single final values go to "summary" and the timings to "time". The UI orders sections by name, so
# the curves come first; the run's Overview lists every metric's value, and the logged model its final ones.
TRAIN_CURVE, VAL_CURVE, EM_CURVE = "nll/train", "nll/val", "nll/em"
CLAMP_CURVE, RESET_CURVE = "events/clamps", "events/resets"
TIME_METRICS = frozenset(
    {"wall_time", "iterations_per_second", "init_time", "compile_time", "tracking_time", "tracking_overhead", "figure_time"}
)


def metric_key(name: str) -> str:
    """The MLflow key of a final value of `ExperimentResult.final_metrics()` (e.g. ari -> summary/ari)."""
    return f"time/{name}" if name in TIME_METRICS else f"summary/{name}"


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment measured. NLLs are mean nats per sample; NaN where not measured.

    Attributes:
        run_id: the MLflow run.
        config: the experiment's config.
        fit: the gradient-descent FitResult (history, events, timings).
        em: the EM FitResult when `config.em`, else None.
        train_nll, val_nll: final NLL on the training and validation splits (val NaN without a split).
        true_nll_train, true_nll_val: NLL of the generating parameters on the same splits.
        em_nll_train, em_nll_val: EM's final NLL (NaN without EM).
        recovery_error: mean distance between fitted and true means after Hungarian matching.
        ari: adjusted Rand index of the model's predicted components against the true labels (all points).
        fingerprint: sha256 of the dataset.
        tracking_time: seconds spent in MLflow calls (figures excluded); figure_time: drawing + logging them.
        model: the fitted model.
    """

    run_id: str
    config: ExperimentConfig
    fit: gmm.FitResult = field(repr=False)
    em: gmm.FitResult | None = field(repr=False)
    train_nll: float
    val_nll: float
    true_nll_train: float
    true_nll_val: float
    em_nll_train: float
    em_nll_val: float
    recovery_error: float
    ari: float
    fingerprint: str
    tracking_time: float
    figure_time: float
    model: gmm.MixtureModel = field(repr=False)
    em_recovery_error: float = float("nan")  # the same measures of EM's model (NaN without EM)
    em_ari: float = float("nan")
    em_model: gmm.MixtureModel | None = field(default=None, repr=False)

    @property
    def clamp_count(self) -> int:
        return self.fit.clamp_count

    @property
    def reset_count(self) -> int:
        return self.fit.reset_count

    @property
    def wall_time(self) -> float:
        return self.fit.wall_time

    @property
    def gd_em_gap(self) -> float:
        """train NLL of gradient descent minus EM's (positive: EM found a better optimum)."""
        return self.train_nll - self.em_nll_train

    @property
    def tracking_overhead(self) -> float:
        return self.tracking_time / self.fit.wall_time if self.fit.wall_time > 0 else float("nan")

    def final_metrics(self) -> dict[str, float]:
        """The run's final scalar metrics (the values logged to MLflow; non-finite ones are left out there)."""
        return {
            "train_nll": self.train_nll,
            "val_nll": self.val_nll,
            "true_nll_train": self.true_nll_train,
            "true_nll_val": self.true_nll_val,
            "em_nll_train": self.em_nll_train,
            "em_nll_val": self.em_nll_val,
            "gd_em_gap": self.gd_em_gap,
            "recovery_error": self.recovery_error,
            "ari": self.ari,
            "em_recovery_error": self.em_recovery_error,
            "em_ari": self.em_ari,
            "clamp_count": float(self.clamp_count),
            "reset_count": float(self.reset_count),
            "num_iterations": float(self.fit.num_iterations),
            "wall_time": self.fit.wall_time,
            "iterations_per_second": self.fit.iterations_per_second,
            "init_time": self.fit.init_time,
            "compile_time": self.fit.compile_time,
        }


# -- buffered logging -----------------------------------------------------------------------------------
class _Logger:
    """Buffers metrics; writes them with log_batch every _FLUSH_SECONDS and on flush(); times every call."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list[Metric] = []
        self.seconds = 0.0
        self.closing = False  # True while a failed run's record is written: signals are then dropped
        self.last_flush = -math.inf  # the first evaluation is written at once: a killed run keeps a curve
        self.train_steps: set[int] = set()  # train_nll steps already logged during the fit
        self.in_fit = False  # while the fit runs, a store that does not answer only delays the metrics
        self.outage_since: float | None = None  # monotonic time of the first failed write of an outage

    def timed(self, fn: Callable, *args, **kwargs):
        """Call fn, timed; Ctrl-C / SIGTERM arriving meanwhile waits until the store write is complete."""
        t0 = time.perf_counter()
        try:
            with deferred_signals(reraise=not self.closing):
                return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def add(self, metrics: Mapping[str, float | None], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items() if finite_or_none(v) is not None)
        every = _FLUSH_SECONDS if self.outage_since is None else _OUTAGE_RETRY_SECONDS
        if time.perf_counter() - self.last_flush >= every:
            self.flush()

    def add_curve(self, key: str, values, steps) -> None:
        self.pending.extend(history_metrics(key, values, steps))

    def flush(self) -> None:
        """Write the buffered metrics. While the fit runs, a store that fails (a server that dropped out,
        after MLflow's bounded retries) does not stop it: the unsent metrics stay buffered, in order, and the
        next flush tries again. Outside the fit the error propagates (the run then keeps its record locally)."""
        sent = 0
        try:
            while sent < len(self.pending):
                chunk = self.pending[sent : sent + MAX_METRICS_PER_BATCH]
                try:
                    self.timed(log_metrics_batched, self.client, self.run_id, chunk)
                except KeyboardInterrupt:  # deferred until the write was complete: the chunk is in the store
                    sent += len(chunk)
                    raise
                sent += len(chunk)
        except MlflowException as err:
            if not self.in_fit or self.closing:
                raise
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning(
                    "the tracking store does not answer (%s); the fit goes on and its metrics wait to be written",
                    redact(" ".join(str(err).split()))[:200],
                )
        finally:
            del self.pending[:sent]
            self.last_flush = time.perf_counter()
        if sent and self.outage_since is not None:
            log.warning(
                "the tracking store answers again after %.0f s; the buffered metrics are written",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None


class _Evaluator:
    """The fit's callback: validation NLL, cumulative counts and learning rates every `eval_every` steps."""

    def __init__(self, model, val, config: ExperimentConfig, logger: _Logger, on_eval):
        self.model, self.val, self.config, self.logger, self.on_eval = model, val, config, logger, on_eval
        self.clamps = self.resets = 0
        self.last_step = -1
        self.val_steps: list[int] = []  # the validation curve, for the NLL figure
        self.val_values: list[float] = []
        self.steps: list[int] = []  # eval steps, and each covariance's smallest variance there (the figure)
        self.smallest: list[torch.Tensor] = []

    def __call__(self, step: int, nll: float, new_events: list) -> None:
        if self.counts(step, new_events):
            with torch.no_grad():
                val_nll = self.model.nll(self.val) if self.val.shape[0] else float("nan")
                smallest = self.model.family.variances_of(self.model.raw_cov.detach()).amin(-1).double().cpu()  # (K',)
            self.record(step, nll, val_nll, smallest)

    def counts(self, step: int, new_events: list) -> bool:
        """Count the new events; False when this call repeats the last step (nothing more to record)."""
        self.clamps += sum(e.kind == "clamp" for e in new_events)
        self.resets += sum(e.kind == "reset" for e in new_events)
        if step == self.last_step:  # the fit's closing call repeats the last step when events arrived
            return False
        self.last_step = step
        return True

    def record(self, step: int, nll: float, val_nll: float, smallest: torch.Tensor) -> None:
        """Log the evaluation at `step`: the NLL the fit reports, the validation NLL, (K',) smallest variances."""
        cfg = self.config
        if math.isfinite(nll) and step % cfg.resolved_eval_every == 0 and cfg.tol is None:
            # a call from inside the fit loop reports history[step - 1] (the NLL before update `step`); the
            # fit's closing call (another step, or a convergence with tol) is left to the final curve
            self.logger.train_steps.add(step - 1)
            self.logger.add({TRAIN_CURVE: nll}, step - 1)
        factor = lr_factor(cfg.lr_schedule, max(step - 1, 0), cfg.iterations)
        self.steps.append(step)
        self.smallest.append(smallest)
        if self.val.shape[0] and not math.isfinite(val_nll):
            raise FloatingPointError(
                f"the validation NLL became non-finite ({val_nll}) at step {step}; lower the learning rates or raise clamp"
            )
        if self.val.shape[0]:
            self.val_steps.append(step)
            self.val_values.append(val_nll)
        self.logger.add(
            {
                VAL_CURVE: val_nll,
                CLAMP_CURVE: self.clamps,
                RESET_CURVE: self.resets,
                "variance/min": float(smallest.min()),
                "lr/mixture": cfg.mixture_lr * factor,
                "lr/component": cfg.component_lr * factor,
            },
            step,
        )
        if self.on_eval is not None:
            self.on_eval(step, val_nll if self.val.shape[0] else nll)


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


def start_logging(config: ExperimentConfig, data: Dataset, client, run_id: str) -> _Logger:
    """A run's logger, after its params and dataset input are logged."""
    logger = _Logger(client, run_id)
    logger.timed(log_params, client, run_id, {**config.flat(), **UNIT_PARAMS})
    logger.timed(_log_dataset_input, client, run_id, data, config)
    logger.last_flush = time.perf_counter()  # the first flush comes _FLUSH_SECONDS into the fit, not into the setup
    return logger


def _run(config: ExperimentConfig, data: Dataset, client, run_id: str, on_eval) -> ExperimentResult:
    logger = start_logging(config, data, client, run_id)
    device, dtype = torch.device(config.device), config.torch_dtype
    train, val = data.train.to(device, dtype), data.val.to(device, dtype)
    model = gmm.make_model(config.family, config.model_components, config.model_dims, dtype=dtype, device=device)
    evaluator = _Evaluator(model, val, config, logger, on_eval)
    logger.in_fit = True
    try:
        result = gmm.fit(model, train, **config.fit_options(), log_freq=config.resolved_eval_every, callback=evaluator)
    except BaseException:
        log_partial_record(logger, model.fit_result_, config)
        raise
    logger.in_fit = False
    return finish_run(config, data, logger, model, result, evaluator, train, val)


def log_partial_record(logger: _Logger, result, config: ExperimentConfig) -> None:
    """A failed or interrupted fit's record so far; a second Ctrl-C meanwhile must not lose it."""
    logger.in_fit = False
    logger.closing = True
    with deferred_signals(reraise=False):
        try:
            _log_fit_record(logger, result, config)
        except Exception:
            log.exception("could not log the partial record of run %s", logger.run_id)


def finish_run(config, data, logger, model, result, evaluator, train, val) -> ExperimentResult:
    """`_finish`, and a store that is gone for longer than the retries does not take the fit's result with it."""
    try:
        return _finish(config, data, logger, model, result, evaluator, train, val)
    except MlflowException as err:
        try:
            err.kept_at = keep_locally(logger.run_id, config, model, result, logger.pending, err)
        except Exception as keep_err:  # the store's error stays the one reported
            log.error("could not keep run %s's fit locally either: %s", logger.run_id, keep_err)
        raise


def _finish(config, data, logger, model, result, evaluator, train, val) -> ExperimentResult:
    """After the fit: the measures, EM, and everything the run logs at its end (curves, figures, model)."""
    client, run_id = logger.client, logger.run_id
    device, dtype = train.device, train.dtype
    train_nll = result.final_nll
    val_nll = model.nll(val) if val.shape[0] else float("nan")
    nan = float("nan")
    truth = data.mock  # None for a data file: nothing to compare with, so the truth-based measures are NaN
    true_train, true_val = nan, nan
    if truth is not None:
        true_model = truth.true_model(dtype=torch.float64)
        true_train = true_model.nll(data.train.double())
        true_val = true_model.nll(data.val.double()) if data.val.shape[0] else nan

    def recovery_and_ari(fitted: gmm.MixtureModel) -> tuple[float, float]:
        if truth is None:
            return nan, nan
        predicted = fitted.predict(truth.data.to(device, dtype)).cpu()
        return recovery_error(fitted.means, truth.means), adjusted_rand_index(truth.labels, predicted)

    em_model, em_result, em_train, em_val = None, None, nan, nan
    em_recovery, em_ari = nan, nan
    if config.em:
        em_model = gmm.make_model(config.family, config.model_components, config.model_dims, dtype=dtype, device=device)
        from gmm.em import fit_em

        with warnings.catch_warnings():  # not converging is logged as em_converged = 0 instead
            warnings.simplefilter("ignore", UserWarning)
            em_result = fit_em(em_model, train, **config.em_options())
        em_train = em_result.final_nll
        em_val = em_model.nll(val) if val.shape[0] else nan
        em_recovery, em_ari = recovery_and_ari(em_model)
    recovery, ari = recovery_and_ari(model)

    _log_fit_record(logger, result, config)
    if val.shape[0] and evaluator.last_step != result.num_iterations:
        logger.add({VAL_CURVE: val_nll}, result.num_iterations)
        evaluator.val_steps.append(result.num_iterations)
        evaluator.val_values.append(val_nll)
    if em_result is not None:
        logger.add_curve(EM_CURVE, em_result.nll_history.tolist(), range(len(em_result.nll_history)))
    partial = ExperimentResult(  # timings of the tracking itself are filled in at the end
        run_id,
        config,
        result,
        em_result,
        train_nll,
        val_nll,
        true_train,
        true_val,
        em_train,
        em_val,
        recovery,
        ari,
        data.fingerprint,
        0.0,
        0.0,
        model,
        em_recovery,
        em_ari,
        em_model,
    )
    # the NLLs and counts are the last points of their curves; the rest are single values
    finals = {
        metric_key(k): v
        for k, v in partial.final_metrics().items()
        if k not in ("train_nll", "val_nll", "clamp_count", "reset_count")
    }
    finals["summary/em_converged"] = float(em_result.converged) if em_result is not None else None
    finals["summary/spike_count"] = float(result.spike_count)
    if result.warnings:  # gmm's ConvergenceWarnings, also on stderr; the spikes are in events.csv
        logger.timed(client.set_tag, run_id, "fit.warnings", " | ".join(result.warnings)[:5000])
    if evaluator.last_step != result.num_iterations:
        finals[CLAMP_CURVE], finals[RESET_CURVE] = result.clamp_count, result.reset_count
    logger.add(finals, result.num_iterations)
    logger.flush()

    figure_time = 0.0
    if config.log_figures:
        t0 = time.perf_counter()
        validation = (evaluator.val_steps, evaluator.val_values)
        _log_figures(client, run_id, data, model, result, em_result, true_train, validation)
        if evaluator.steps:
            from gmm.plot import plot_smallest_variances

            smallest = torch.stack(evaluator.smallest)
            fig = plot_smallest_variances(evaluator.steps, smallest, config.clamp, result.events)
            client.log_figure(run_id, fig, "figures/smallest_variance.png")
        figure_time = time.perf_counter() - t0
    logger.timed(client.log_dict, run_id, config.to_dict(), "config.json")
    if config.log_model:
        logger.timed(_log_model, client, run_id, model, train, result.num_iterations)
    tracking_time = logger.seconds
    overhead = tracking_time / result.wall_time if result.wall_time > 0 else None
    timings = {"tracking_time": tracking_time, "tracking_overhead": overhead, "figure_time": figure_time}
    logger.add({metric_key(k): v for k, v in timings.items()}, result.num_iterations)
    logger.flush()
    return dataclasses.replace(partial, tracking_time=tracking_time, figure_time=figure_time)


UNSENT_DIR = "unsent"  # <project>/unsent/<run_id>/ ($GMM_UNSENT_DIR): runs whose store went away before the end


def keep_locally(run_id: str, config: ExperimentConfig, model, result: gmm.FitResult, pending, err) -> Path:
    """Write a finished fit whose tracking store stopped answering to <project>/unsent/<run_id>/ (or
    $GMM_UNSENT_DIR/<run_id>/; built in a
    temporary folder and renamed into place, so it is whole or absent): record.json (config, final NLL,
    counts, the error), nll_history.csv, events.csv, metrics.csv (the metrics the store never received) and
    model.pt (`torch.load` it and `MixtureModel.load_state_dict`). Returns the folder."""
    from .tracking import PROJECT_ROOT

    root = Path(os.environ.get("GMM_UNSENT_DIR") or PROJECT_ROOT / UNSENT_DIR)
    root.mkdir(parents=True, exist_ok=True)
    final = root / run_id
    building = Path(tempfile.mkdtemp(prefix=f".{run_id}.building-", dir=root))
    try:
        _write_unsent(building, run_id, config, model, result, pending, err)
        building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)  # whole or absent
        raise
    return final


def _write_unsent(building: Path, run_id: str, config: ExperimentConfig, model, result, pending, err) -> None:
    record = {
        "run_id": run_id,
        "why": redact(" ".join(str(err).split()))[:2000],
        "config": config.to_dict(),
        "final_nll": result.final_nll,
        "num_iterations": result.num_iterations,
        "clamp_count": result.clamp_count,
        "reset_count": result.reset_count,
        "wall_time": result.wall_time,
        "model": {"family": config.family, "num_components": config.model_components, "num_dims": config.model_dims},
    }
    (building / "record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    history = result.nll_history.double().cpu().tolist()
    (building / "nll_history.csv").write_text("step,nll\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(history)))
    (building / "events.csv").write_text(events_csv(result.events))
    rows = "".join(f"{m.key},{m.step},{m.value!r},{m.timestamp}\n" for m in pending)
    (building / "metrics.csv").write_text("key,step,value,timestamp\n" + rows)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, building / "model.pt")


_DATASET_INPUT_TRIES = 5


def _log_dataset_input(client, run_id: str, data: Dataset, config: ExperimentConfig) -> None:
    """The data as the run's MLflow dataset input (the runs table's Dataset column): name, fingerprint, source."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag

    if config.data_file is not None:
        source_type, source = "local", {"uri": str(Path(config.data_file).resolve())}
    else:
        source_type, source = "code", {"generator": "experiments.datasets.load_dataset", **data.spec.as_dict()}
    entity = DatasetEntity(
        name=data.name or config.dataset or "generated",
        digest=data.fingerprint[:12],
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps({"num_train": len(data.train), "num_val": len(data.val), "num_dims": data.num_dims}),
    )
    inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])]
    for attempt in range(_DATASET_INPUT_TRIES):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as error:
            # Workers that start together race to insert the same dataset row; the store's get-or-create is not
            # atomic, so the loser sees a unique-constraint error. The row exists now: the next try links it.
            if "UNIQUE constraint" not in str(error) and "duplicate key" not in str(error):
                raise
            if attempt == _DATASET_INPUT_TRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def curve_steps(num_points: int, every: int) -> list[int]:
    """Steps of the logged training curve: 0, every, 2 every, ... and always the last step."""
    if num_points <= 0:
        return []
    steps = list(range(0, num_points, every))
    if steps[-1] != num_points - 1:
        steps.append(num_points - 1)
    return steps


def _log_fit_record(logger: _Logger, result: gmm.FitResult | None, config: ExperimentConfig) -> None:
    """The training-NLL curve (finite values only; steps not already logged during the fit) and events.csv of a
    finished or partial fit."""
    if result is not None and len(result.nll_history):
        history = result.nll_history
        steps = [s for s in curve_steps(len(history), config.resolved_log_every) if s not in logger.train_steps]
        values = history[steps]
        keep = torch.isfinite(values)
        logger.add_curve(TRAIN_CURVE, values[keep].tolist(), [s for s, k in zip(steps, keep.tolist(), strict=True) if k])
    logger.flush()
    events = result.events if result is not None else ()
    logger.timed(logger.client.log_text, logger.run_id, events_csv(events), "events.csv")


def events_csv(events) -> str:
    """The events as CSV text with a header (step, component, kind, detail)."""
    import csv

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EVENT_COLUMNS)
    for e in events:
        writer.writerow([e.step, e.component, e.kind, e.detail])
    return out.getvalue()


def _log_figures(client, run_id: str, data: Dataset, model, result, em_result, true_nll: float, validation) -> None:
    from gmm.plot import plot_data_and_model, plot_nll_curve

    fig = plot_data_and_model(data.train, model, title=f"{model.family.name} fit: train NLL {result.final_nll:.4f}")
    client.log_figure(run_id, fig, "figures/fit.png")
    curves = {"gradient descent, train": result}
    if em_result is not None:
        curves["EM, train"] = em_result
    reference = {"true parameters, train": true_nll} if math.isfinite(true_nll) else None
    fig = plot_nll_curve(curves, log_x=True, reference=reference)
    steps, values = validation
    if steps:  # the validation NLL, measured every eval_every steps, over the training curves
        ax = fig.axes[0]
        ax.plot(steps, values, "o-", color="tab:red", markersize=3, linewidth=1.2, label="gradient descent, validation")
        ax.legend(fontsize="small")
    client.log_figure(run_id, fig, "figures/nll_curve.png")


def _log_model(client, run_id: str, model: gmm.MixtureModel, train: torch.Tensor, step: int) -> None:
    """Log the fitted model as an MLflow model (flavor pytorch): the run's "Logged models", loadable with
    `mlflow.pytorch.load_model("runs:/<run_id>/model")` (a gmm.MixtureModel) or served by pyfunc, which maps
    rows (N, D) to their log densities (N,). The final metrics (logged at `step`) are linked to it."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from .tracking import fluent_tracking_uri

    snapshot = copy.deepcopy(model).cpu()
    snapshot.fit_result_ = None  # the fit record (curves, events) is the run's, not the model's
    example = train[:5].detach().cpu().numpy()
    with torch.no_grad():
        signature = infer_signature(example, snapshot(torch.as_tensor(example)).numpy())
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", "gmm-gd"]
    experiment_id = client.get_run(run_id).info.experiment_id
    # created here, so it belongs to the run's experiment (log_model alone would file it under the active one)
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="gmm")
    pytorch_log = logging.getLogger("mlflow.pytorch")
    level = pytorch_log.level
    pytorch_log.setLevel(logging.ERROR)  # its warning on pickled models: this project's own module, by design
    try:
        with fluent_tracking_uri(client.tracking_uri), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pytorch.log_model(
                snapshot,
                name=MODEL_NAME,
                run_id=run_id,
                model_id=logged.model_id,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
                step=step,
                serialization_format="pickle",  # the module itself, so load_model gives back a gmm.MixtureModel
            )
    finally:
        pytorch_log.setLevel(level)


def load_model(run_id: str, tracking_uri: str | None = None, *, device: str | torch.device = "cpu") -> gmm.MixtureModel:
    """The fitted model a run logged (`mlflow.pytorch.load_model("runs:/<run_id>/model")`, with the URI resolved).

    Raises:
        ValueError: the run does not exist or logged no model (config log_model = false).
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = get_client(uri)
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id!r} in {uri}; check the run id and the tracking URI") from None
    if run.outputs is not None and run.outputs.model_outputs:
        import mlflow.pytorch

        from .tracking import fluent_tracking_uri

        with fluent_tracking_uri(uri):
            model = mlflow.pytorch.load_model(f"runs:/{run_id}/{MODEL_NAME}", map_location="cpu")
        return model.to(device)
    return _load_legacy_model(client, run_id, device)


def _load_legacy_model(client, run_id: str, device) -> gmm.MixtureModel:
    """A model logged as a `model/model.pt` state dict (runs made before the MLflow model)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, LEGACY_MODEL_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} logged no model; rerun it with log_model: true") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
    dtype = {"float32": torch.float32, "float64": torch.float64}[state["dtype"]]
    model = gmm.make_model(
        state["family"], state["num_components"], state["num_dims"], variance=state["variance"], dtype=dtype
    )
    model.load_state_dict(state["state_dict"])
    return model.to(device)


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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
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
    sys.exit(main())
