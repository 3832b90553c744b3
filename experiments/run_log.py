"""A run's MLflow record while and after it fits: the buffered logger, the evaluation callback, the curves,
events.csv, the dataset input and the run's figures (experiments.run calls these; see its docstring).

Metrics are buffered and written with `log_batch` at most every _FLUSH_SECONDS while the fit runs (so a long
fit's curves grow in the UI) and once at the end; a store that stops answering during the fit only delays them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

import gmm
from gmm.options import lr_factor

from .config import ExperimentConfig
from .datasets import Dataset
from .redact import redact
from .tracking import (
    MAX_METRICS_PER_BATCH,
    csv_text,
    deferred_signals,
    finite_or_none,
    history_metrics,
    log_csv,
    log_curve,
    log_metrics_batched,
)
from .writer import WriteBehindClient

log = logging.getLogger(__name__)

_FLUSH_SECONDS = 5.0  # buffered metrics are written at most this often while a fit runs
_OUTAGE_RETRY_SECONDS = 10.0  # while the store does not answer, the next write is tried this much later
EVENT_COLUMNS = ("step", "component", "kind", "detail")
# MLflow metric names: curves share a prefix so the UI groups them into one section each ("nll", "events",
# "lr"); single final values go to "summary" and the timings to "time". The UI orders sections by name, so
# the curves come first; the run's Overview lists every metric's value, and the logged model its final ones.
TRAIN_CURVE, VAL_CURVE, EM_CURVE = "nll/train", "nll/val", "nll/em"
CLAMP_CURVE, RESET_CURVE = "events/clamps", "events/resets"


# -- buffered logging -----------------------------------------------------------------------------------
class RunLogger:
    """Buffers metrics; writes them with log_batch every _FLUSH_SECONDS and on flush(); times every call.
    Whole curves wait as numbers (`curves`) and are written with tracking.log_curve."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: list[Metric] = []
        self.curves: list[tuple[str, list[float], list[int], int]] = []  # (key, values, steps, timestamp ms)
        self.latest: dict[str, Metric] = {}  # the last point added of each key (the model links those at its step)
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

    def add(self, metrics: Mapping[str, float | None], step: int, flush: bool = True) -> None:
        """Buffer `metrics` at `step`; write the buffer when _FLUSH_SECONDS have passed (never when flush=False)."""
        now = int(time.time() * 1000)
        added = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if finite_or_none(v) is not None]
        self.pending.extend(added)
        self.latest.update((m.key, m) for m in added)
        every = _FLUSH_SECONDS if self.outage_since is None else _OUTAGE_RETRY_SECONDS
        if flush and time.perf_counter() - self.last_flush >= every:
            self.flush()

    def add_curve(self, key: str, values, steps) -> None:
        values, steps = [float(v) for v in values], [int(s) for s in steps]
        if len(values) != len(steps):
            raise ValueError(f"{key}: {len(values)} values but {len(steps)} steps; pass one step per value")
        if not values:
            return
        now = int(time.time() * 1000)
        self.curves.append((key, values, steps, now))
        last = max(range(len(steps)), key=steps.__getitem__)
        self.latest[key] = Metric(key, values[last], now, steps[last])

    def unsent(self) -> list[Metric]:
        """Every metric buffered and not written yet."""
        return self.pending + self._curve_points()

    def _curve_points(self) -> list[Metric]:
        return [m for key, vs, ss, t in self.curves for m in history_metrics(key, vs, ss, [t] * len(vs))]

    def flush(self) -> None:
        """Write the buffered metrics. While the fit runs, a store that fails (a server that dropped out,
        after MLflow's bounded retries) does not stop it: the unsent metrics stay buffered, in order, and the
        next flush tries again. Outside the fit the error propagates (the run then keeps its record locally)."""
        if not isinstance(self.client, WriteBehindClient):  # one log_batch for all, as points (see log_curve)
            self.pending.extend(self._curve_points())
            self.curves.clear()
        sent = curves = 0
        try:
            while sent < len(self.pending):
                chunk = self.pending[sent : sent + MAX_METRICS_PER_BATCH]
                try:
                    self.timed(log_metrics_batched, self.client, self.run_id, chunk)
                except KeyboardInterrupt:  # deferred until the write was complete: the chunk is in the store
                    sent += len(chunk)
                    raise
                sent += len(chunk)
            while curves < len(self.curves):
                try:
                    self.timed(log_curve, self.client, self.run_id, *self.curves[curves])
                except KeyboardInterrupt:  # as above: the curve is in the store
                    curves += 1
                    raise
                curves += 1
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
            del self.curves[:curves]
            self.last_flush = time.perf_counter()
        if (sent or curves) and self.outage_since is not None:
            log.warning(
                "the tracking store answers again after %.0f s; the buffered metrics are written",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None


class Evaluator:
    """The fit's callback: validation NLL, cumulative counts and learning rates every `eval_every` steps."""

    def __init__(self, model, val, config: ExperimentConfig, logger: RunLogger, on_eval):
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


def log_partial_record(logger: RunLogger, result, config: ExperimentConfig) -> None:
    """A failed or interrupted fit's record so far; a second Ctrl-C meanwhile must not lose it."""
    logger.in_fit = False
    logger.closing = True
    with deferred_signals(reraise=False):
        try:
            log_fit_record(logger, result, config)
        except Exception:
            log.exception("could not log the partial record of run %s", logger.run_id)


_DATASET_INPUT_TRIES = 5


def log_dataset_input(client, run_id: str, data: Dataset, config: ExperimentConfig) -> None:
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


def log_fit_record(logger: RunLogger, result: gmm.FitResult | None, config: ExperimentConfig, flush: bool = True) -> None:
    """The training-NLL curve (finite values only; steps not already logged during the fit) and events.csv of a
    finished or partial fit; the curve is written at once, or with the logger's next flush when flush=False."""
    if result is not None and len(result.nll_history):
        history = result.nll_history
        steps = [s for s in curve_steps(len(history), config.resolved_log_every) if s not in logger.train_steps]
        values = history[steps]
        keep = torch.isfinite(values)
        logger.add_curve(TRAIN_CURVE, values[keep].tolist(), [s for s, k in zip(steps, keep.tolist(), strict=True) if k])
    if flush:
        logger.flush()
    events = result.events if result is not None else ()
    logger.timed(log_csv, logger.client, logger.run_id, EVENT_COLUMNS, event_rows(events), "events.csv")


def event_rows(events) -> list[tuple]:
    """The events as rows of EVENT_COLUMNS (step, component, kind, detail)."""
    return [(e.step, e.component, e.kind, e.detail) for e in events]


def events_csv(events) -> str:
    """The events as CSV text with a header (step, component, kind, detail)."""
    return csv_text(EVENT_COLUMNS, event_rows(events))


def log_figure(client, run_id: str, fig, artifact: str) -> None:
    """`client.log_figure` of a PNG, the figure laid out once for the save (gmm.plot.laid_out: the same pixels,
    faster) and written with gmm.plot.FAST_PNG's compression."""
    from gmm.plot import FAST_PNG, laid_out

    with laid_out(fig):
        client.log_figure(run_id, fig, artifact, save_kwargs=FAST_PNG)


def log_figures(client, run_id: str, data: Dataset, model, result, em_result, true_nll: float, validation) -> None:
    from gmm.plot import plot_data_and_model, plot_nll_curve

    fig = plot_data_and_model(data.train, model, title=f"{model.family.name} fit: train NLL {result.final_nll:.4f}")
    log_figure(client, run_id, fig, "figures/fit.png")
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
    log_figure(client, run_id, fig, "figures/nll_curve.png")
