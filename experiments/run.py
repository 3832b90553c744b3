"""Run one experiment: load its data, fit by gradient descent (and EM), log everything to one MLflow run.

    python -m experiments.run --family full --components 5 --seed 42
    python -m experiments.run --config studies/best/full-v1.json --em
    make run FAMILY=full SEED=42 [CONFIG=FILE]     then     make ui

What one run holds (read back with `MlflowClient`, or `load_model(run_id)` for the model):
- params: the whole config, flattened (`ExperimentConfig.flat`);
- metric curves with steps: `train_nll` every `log_every` steps (and at the last), `val_nll`,
  `clamp_count`, `reset_count` (cumulative), `min_variance` (smallest variance of any component),
  `lr_mixture`, `lr_component` every `eval_every` steps;
- final metrics: `train_nll`/`val_nll` (last points of their curves), `true_nll_train`/`true_nll_val`
  (the generating parameters), `em_nll_train`/`em_nll_val` and `gd_em_gap` (with `em`),
  `recovery_error` (mean distance of Hungarian-matched means), `ari` (adjusted Rand index on all points),
  `wall_time`, `iterations_per_second`, `num_iterations`, `init_time`, `compile_time`, and the cost of the
  tracking itself: `tracking_time` (every MLflow call but figures), `tracking_overhead` (its fraction of
  the fit's wall time) and `figure_time`;
- artifacts: `events.csv` (every clamp and reset), `figures/fit.png`, `figures/nll_curve.png`,
  `figures/smallest_variance.png` (each component's smallest variance at every evaluation, log scale, the
  clamp as a line, clamp events and resets marked),
  `model/model.pt` (state dict + config) and `model/config.json`;
- tags: `dataset.fingerprint` (sha256 of the data), `dataset.name`, git commit and dirtiness, versions,
  platform and the exact command line (experiments.tracking.repro_tags).

Metrics are buffered and written with `log_batch` at most every few seconds while the fit runs (so a long
fit's curves grow in the UI) and once at the end. If the fit raises (a non-finite NLL, a failed
factorization, Ctrl-C, SIGTERM), what was measured until then is logged before the run ends FAILED or
KILLED (experiments.tracking.tracked_run).

Exit status: 0 done, 1 the fit failed (run marked FAILED), 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.entities import Metric

import gmm
from gmm._cli import OneLineParser
from gmm.fit import lr_factor

from .config import ExperimentConfig, add_arguments, from_args
from .datasets import Dataset, load_dataset
from .metrics import adjusted_rand_index, recovery_error
from .tracking import (
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
MODEL_ARTIFACT = "model/model.pt"
EVENT_COLUMNS = ("step", "component", "kind", "detail")


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
        self.last_flush = time.perf_counter()

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
        if time.perf_counter() - self.last_flush >= _FLUSH_SECONDS:
            self.flush()

    def add_curve(self, key: str, values, steps) -> None:
        self.pending.extend(history_metrics(key, values, steps))

    def flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.timed(log_metrics_batched, self.client, self.run_id, batch)
        self.last_flush = time.perf_counter()


class _Evaluator:
    """The fit's callback: validation NLL, cumulative counts and learning rates every `eval_every` steps."""

    def __init__(self, model, val, config: ExperimentConfig, logger: _Logger, on_eval):
        self.model, self.val, self.config, self.logger, self.on_eval = model, val, config, logger, on_eval
        self.clamps = self.resets = 0
        self.last_step = -1
        self.steps: list[int] = []  # eval steps, and each covariance's smallest variance there (the figure)
        self.smallest: list[torch.Tensor] = []

    def __call__(self, step: int, nll: float, new_events: list) -> None:
        self.clamps += sum(e.kind == "clamp" for e in new_events)
        self.resets += sum(e.kind == "reset" for e in new_events)
        if step == self.last_step:  # the fit's closing call repeats the last step when events arrived
            return
        self.last_step = step
        cfg = self.config
        factor = lr_factor(cfg.lr_schedule, max(step - 1, 0), cfg.iterations)
        val_nll = self.model.nll(self.val) if self.val.shape[0] else float("nan")
        with torch.no_grad():
            smallest = self.model.family.variances_of(self.model.raw_cov.detach()).amin(-1).double().cpu()  # (K',)
        self.steps.append(step)
        self.smallest.append(smallest)
        if self.val.shape[0] and not math.isfinite(val_nll):
            raise FloatingPointError(
                f"the validation NLL became non-finite ({val_nll}) at step {step}; lower the learning rates or raise clamp"
            )
        self.logger.add(
            {
                "val_nll": val_nll,
                "clamp_count": self.clamps,
                "reset_count": self.resets,
                "min_variance": float(smallest.min()),
                "lr_mixture": cfg.mixture_lr * factor,
                "lr_component": cfg.component_lr * factor,
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
    run_tags = {
        "dataset.fingerprint": data.fingerprint,
        "dataset.name": config.dataset or "generated",
        "family": config.family,
        **(tags or {}),
    }
    name = run_name or f"{config.family} seed {config.seed}"
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


def _run(config: ExperimentConfig, data: Dataset, client, run_id: str, on_eval) -> ExperimentResult:
    logger = _Logger(client, run_id)
    logger.timed(log_params, client, run_id, {**config.flat(), **UNIT_PARAMS})
    device, dtype = torch.device(config.device), config.torch_dtype
    train, val = data.train.to(device, dtype), data.val.to(device, dtype)
    model = gmm.make_model(config.family, config.model_components, config.model_dims, dtype=dtype, device=device)
    evaluator = _Evaluator(model, val, config, logger, on_eval)
    try:
        result = gmm.fit(model, train, **config.fit_options(), log_freq=config.resolved_eval_every, callback=evaluator)
    except BaseException:
        logger.closing = True
        with deferred_signals(reraise=False):  # a second Ctrl-C must not lose what the first one left
            try:
                _log_fit_record(logger, model.fit_result_, config)
            except Exception:
                log.exception("could not log the partial record of run %s", run_id)
        raise

    train_nll = result.final_nll
    val_nll = model.nll(val) if val.shape[0] else float("nan")
    truth = data.mock.true_model(dtype=torch.float64)
    true_train = truth.nll(data.train.double())
    true_val = truth.nll(data.val.double()) if data.val.shape[0] else float("nan")
    all_points = data.mock.data.to(device, dtype)
    em_model, em_result, em_train, em_val = None, None, float("nan"), float("nan")
    em_recovery, em_ari = float("nan"), float("nan")
    if config.em:
        em_model = gmm.make_model(config.family, config.model_components, config.model_dims, dtype=dtype, device=device)
        from gmm.em import fit_em

        with warnings.catch_warnings():  # not converging is logged as em_converged = 0 instead
            warnings.simplefilter("ignore", UserWarning)
            em_result = fit_em(em_model, train, **config.em_options())
        em_train = em_result.final_nll
        em_val = em_model.nll(val) if val.shape[0] else float("nan")
        em_recovery = recovery_error(em_model.means, data.mock.means)
        em_ari = adjusted_rand_index(data.mock.labels, em_model.predict(all_points).cpu())
    recovery = recovery_error(model.means, data.mock.means)
    ari = adjusted_rand_index(data.mock.labels, model.predict(all_points).cpu())

    _log_fit_record(logger, result, config)
    if val.shape[0] and evaluator.last_step != result.num_iterations:
        logger.add({"val_nll": val_nll}, result.num_iterations)
    if em_result is not None:
        logger.add_curve("em_nll", em_result.nll_history.tolist(), range(len(em_result.nll_history)))
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
    finals = {k: v for k, v in partial.final_metrics().items() if k not in ("train_nll", "val_nll")}
    finals["em_converged"] = float(em_result.converged) if em_result is not None else None
    finals["spike_count"] = float(result.spike_count)
    if result.warnings:  # gmm's ConvergenceWarnings, also on stderr; the spikes are in events.csv
        logger.timed(client.set_tag, run_id, "fit.warnings", " | ".join(result.warnings)[:5000])
    logger.add(finals, result.num_iterations)
    logger.flush()

    figure_time = 0.0
    if config.log_figures:
        t0 = time.perf_counter()
        _log_figures(client, run_id, data, model, result, em_result, true_train)
        if evaluator.steps:
            from gmm.plot import plot_smallest_variances

            smallest = torch.stack(evaluator.smallest)
            fig = plot_smallest_variances(evaluator.steps, smallest, config.clamp, result.events)
            client.log_figure(run_id, fig, "figures/smallest_variance.png")
        figure_time = time.perf_counter() - t0
    if config.log_model:
        logger.timed(_log_model, client, run_id, model, config)
    tracking_time = logger.seconds
    overhead = tracking_time / result.wall_time if result.wall_time > 0 else None
    logger.add({"tracking_time": tracking_time, "tracking_overhead": overhead, "figure_time": figure_time}, 0)
    logger.flush()
    return dataclasses.replace(partial, tracking_time=tracking_time, figure_time=figure_time)


def curve_steps(num_points: int, every: int) -> list[int]:
    """Steps of the logged training curve: 0, every, 2 every, ... and always the last step."""
    if num_points <= 0:
        return []
    steps = list(range(0, num_points, every))
    if steps[-1] != num_points - 1:
        steps.append(num_points - 1)
    return steps


def _log_fit_record(logger: _Logger, result: gmm.FitResult | None, config: ExperimentConfig) -> None:
    """The training-NLL curve (finite values only) and events.csv of a finished or partial fit."""
    if result is not None and len(result.nll_history):
        history = result.nll_history
        steps = curve_steps(len(history), config.resolved_log_every)
        values = history[steps]
        keep = torch.isfinite(values)
        logger.add_curve("train_nll", values[keep].tolist(), [s for s, k in zip(steps, keep.tolist(), strict=True) if k])
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


def _log_figures(client, run_id: str, data: Dataset, model, result, em_result, true_nll: float) -> None:
    from gmm.plot import plot_data_and_model, plot_nll_curve

    fig = plot_data_and_model(data.train, model, title=f"{model.family.name} fit: train NLL {result.final_nll:.4f}")
    client.log_figure(run_id, fig, "figures/fit.png")
    curves = {"gradient descent": result} if em_result is None else {"gradient descent": result, "EM": em_result}
    reference = {"true parameters": true_nll} if math.isfinite(true_nll) else None
    fig = plot_nll_curve(curves, log_x=True, reference=reference)
    client.log_figure(run_id, fig, "figures/nll_curve.png")


def _log_model(client, run_id: str, model: gmm.MixtureModel, config: ExperimentConfig) -> None:
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "family": model.family.name,
        "num_components": model.num_components,
        "num_dims": model.num_dims,
        "variance": model.variance,
        "dtype": config.dtype,
        "config": config.to_dict(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "model.pt")
        (Path(tmp) / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        client.log_artifacts(run_id, tmp, "model")


def load_model(run_id: str, tracking_uri: str | None = None, *, device: str | torch.device = "cpu") -> gmm.MixtureModel:
    """Rebuild the fitted model a run logged (its `model/model.pt` artifact).

    Raises:
        ValueError: the run does not exist or logged no model (config log_model = false).
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = get_client(uri)
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id!r} in {uri}; check the run id and the tracking URI") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, MODEL_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} logged no model ({MODEL_ARTIFACT}); rerun it with log_model: true") from None
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


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on `uri`."""
    from .tracking import PROJECT_ROOT

    if uri == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}":
        return "make ui   (http://127.0.0.1:5000)"
    return f"mlflow ui --backend-store-uri '{uri}' --host 127.0.0.1 --port 5000"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = from_args(args)
        uri = resolve_tracking_uri(args.tracking_uri)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(
        f"Fitting {config.family} (K={config.model_components}, D={config.model_dims}, {config.iterations} steps), "
        f"data: {config.dataset or 'generated'}; tracking to {uri}",
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
    print(format_summary(result))
    print(f"Run id: {result.run_id}")
    print(f"Open the UI: {ui_command(uri)}")
    return 0


def format_summary(r: ExperimentResult) -> str:
    """A few lines on the run's outcome."""
    lines = [
        f"Final Loss: {r.train_nll:.2f}",
        f"train NLL {r.train_nll:.6f}, validation NLL {r.val_nll:.6f}, true parameters {r.true_nll_train:.6f} / "
        f"{r.true_nll_val:.6f}",
        f"{r.fit.num_iterations} steps in {r.fit.wall_time:.2f} s ({r.fit.iterations_per_second:.0f} it/s); "
        f"{r.clamp_count} clamps, {r.reset_count} resets; recovery error {r.recovery_error:.4f}, ARI {r.ari:.4f}",
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
