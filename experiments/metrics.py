"""The tracked metrics of a run, each defined once, and the quality measures they use (numpy/scipy; no MLflow).

    METRICS                                      # one Metric per tracked measure, in runs.csv column order
    measure(Measured(...))                       # {name: value} of every metric of a finished run
    recovery_error(fitted_means, true_means)     # mean distance after Hungarian matching
    adjusted_rand_index(true_labels, predicted)  # 1 = same partition, ~0 = chance

Adding a tracked metric is one entry of METRICS: its name, its glossary text, how it is computed from the run's
record (`Measured`), for gradient descent and for EM. From there the runner logs it to MLflow
(`<section>/<name>`, experiments.run), `ExperimentResult` carries it (`result.<name>`, `final_metrics()`), and
the seed report (experiments.report) gives it a runs.csv column, summary rows and a glossary line when it has
a `column`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    import torch

    import gmm

    from .config import ExperimentConfig
    from .datasets import Dataset

NAN = float("nan")


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def recovery_error(fitted_means, true_means) -> float:
    """Mean Euclidean distance between fitted and true means, matched one to one by the Hungarian algorithm.

    Args:
        fitted_means: (K_fit, D).
        true_means: (K_true, D). With K_fit != K_true only min(K_fit, K_true) pairs are matched.

    Returns:
        The mean distance of the matched pairs (0 when every true mean is recovered exactly).
    """
    a, b = _as_array(fitted_means), _as_array(true_means)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"means must be (K, D) arrays of the same D; got shapes {a.shape} and {b.shape}")
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # (K_fit, K_true)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _comb2(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2.0


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index of two labelings of the same points (Hubert and Arabie, 1985).

    1.0 for identical partitions (up to renaming), about 0 for independent ones; equals scikit-learn's
    `adjusted_rand_score`.
    """
    t, p = np.asarray(_as_array(labels_true), dtype=np.int64), np.asarray(_as_array(labels_pred), dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels must be two 1-D arrays of the same length; got shapes {t.shape} and {p.shape}")
    n = t.size
    if n < 2:
        return 1.0
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1))
    np.add.at(table, (ti, pi), 1.0)
    index = _comb2(table).sum()
    rows, cols = _comb2(table.sum(1)).sum(), _comb2(table.sum(0)).sum()
    expected = rows * cols / _comb2(np.float64(n))
    maximum = (rows + cols) / 2.0
    if maximum == expected:  # both partitions trivial (one cluster each, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


# -- the registry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What a finished run's metrics are computed from; `train` and `val` are on the fit's device and dtype.

    `em` and `em_model` are None without EM; `data.mock` is None for a data file (no generating parameters).
    """

    config: ExperimentConfig
    data: Dataset
    fit: gmm.FitResult
    model: gmm.MixtureModel
    em: gmm.FitResult | None
    em_model: gmm.MixtureModel | None
    train: torch.Tensor
    val: torch.Tensor

    def val_nll(self, model: gmm.MixtureModel | None) -> float:
        return model.nll(self.val) if model is not None and self.val.shape[0] else NAN

    def true_nll(self, split: str) -> float:
        return self.data.true_nll(split)

    def recovery_error(self, model: gmm.MixtureModel | None) -> float:
        truth = self.data.mock
        return NAN if truth is None or model is None else recovery_error(model.means, truth.means)

    def ari(self, model: gmm.MixtureModel | None) -> float:
        truth = self.data.mock
        if truth is None or model is None:
            return NAN
        predicted = model.predict(truth.data.to(self.train.device, self.train.dtype)).cpu()
        return adjusted_rand_index(truth.labels, predicted)

    def em_final_nll(self) -> float:
        return self.em.final_nll if self.em is not None else NAN


@dataclass(frozen=True)
class Metric:
    """One tracked measure of a run, for gradient descent (`gd`) and optionally for EM (`em`).

    Attributes:
        name: the GD value's name: `result.<name>`, the key in `final_metrics()`, MLflow `<section>/<name>`.
        description: what it means, with units; the report's glossary prints it for `column`.
        gd: its value for the gradient-descent fit, from the run's record (`Measured`; a sweep's metrics,
            experiments.sweep_plan.SWEEP_METRICS, take a `SweepFit`).
        em: its value for the EM fit (None: none, NaN in the report's EM rows).
        section: MLflow key prefix ("summary", or "time" for timings); None: not logged as a single value (the
            last point of a curve of the same measure, or a report column only).
        em_name: the EM value's name (default `em_<name>`); em_section: its MLflow prefix (None: not logged).
        report: whether the seed report has it: a runs.csv `column` (`column_name`, default `name`) whose rows
            hold `gd` (method gd) and `em` (method em), summary rows and a glossary line.
        kind: "count" (an integer; --verify compares it exactly), "timing" (left out of --verify and the
            sha256), else "value".
    """

    name: str
    description: str
    gd: Callable[[Any], float]
    em: Callable[[Measured], float] | None = None
    section: str | None = "summary"
    em_name: str | None = None
    em_section: str | None = None
    report: bool = False
    column_name: str | None = None
    kind: Literal["value", "count", "timing"] = "value"

    @property
    def column(self) -> str | None:
        """Its runs.csv column, or None when the report leaves it out."""
        return (self.column_name or self.name) if self.report else None

    @property
    def em_key(self) -> str:
        return self.em_name or f"em_{self.name}"

    def mlflow_keys(self) -> dict[str, str]:
        """{value name: MLflow key} of the values logged as single metrics."""
        keys = {self.name: f"{self.section}/{self.name}"} if self.section else {}
        if self.em is not None and self.em_section:
            keys[self.em_key] = f"{self.em_section}/{self.em_key}"
        return keys


def _of_fits(attr: str, cast: Callable[[Any], float] = float) -> dict[str, Callable[[Measured], float]]:
    """gd and em reading the same attribute of each method's FitResult."""
    return {"gd": lambda m: cast(getattr(m.fit, attr)), "em": lambda m: cast(getattr(m.em, attr))}


def _of_models(measure_of: Callable[[Measured, Any], float]) -> dict[str, Callable[[Measured], float]]:
    """gd and em applying one measure of `Measured` to each method's fitted model."""
    return {"gd": lambda m: measure_of(m, m.model), "em": lambda m: measure_of(m, m.em_model)}


def _same(value: Callable[[Measured], float]) -> dict[str, Callable[[Measured], float]]:
    """gd and em both `value`: a measure of the data, not of a fit (the EM row repeats it)."""
    return {"gd": value, "em": value}


_TRUTH = "the parameters that generated the data"
# The order is runs.csv's column order (tests and --verify of older reports depend on it): append new metrics.
# section=None on train_nll, val_nll and the counts: their final value is the last point of their curve
# (nll/train, nll/val, events/clamps, events/resets); GD's `converged` is a report column only.
METRICS: tuple[Metric, ...] = (
    Metric("train_nll", "final mean negative log-likelihood on the training split, nats per sample (lower is better)",
           gd=lambda m: m.fit.final_nll, em=lambda m: m.em_final_nll(), section=None, em_name="em_nll_train",
           em_section="summary", report=True),
    Metric("val_nll", "the same on the held-out validation split (- without one)", **_of_models(Measured.val_nll),
           section=None, em_name="em_nll_val", em_section="summary", report=True),
    Metric("true_nll_train", f"NLL of {_TRUTH}, on the training split (- for a data file)",
           **_same(lambda m: m.true_nll("train")), report=True),
    Metric("true_nll_val", "the same on the validation split", **_same(lambda m: m.true_nll("val")), report=True),
    Metric("gd_em_gap", "GD's train_nll minus EM's, same seed (gd rows only): > 0 means EM found the better "
           "optimum, < 0 gradient descent did", gd=lambda m: m.fit.final_nll - m.em_final_nll(), report=True),
    Metric("recovery_error", "mean Euclidean distance between fitted and true means after one-to-one Hungarian "
           "matching, in data units (0 = every true mean recovered; - for a data file)",
           **_of_models(Measured.recovery_error), em_section="summary", report=True),
    Metric("ari", "adjusted Rand index of the most responsible component against the true labels, all points "
           "(1 = same partition, about 0 = chance; - for a data file)", **_of_models(Measured.ari),
           em_section="summary", report=True),
    Metric("clamp_count", "variance-floor events: steps at which a covariance diagonal was raised to clamp",
           **_of_fits("clamp_count", int), section=None, report=True, kind="count"),
    Metric("reset_count", "collapsed components moved to a badly explained point (gmm.fit)",
           **_of_fits("reset_count", int), section=None, report=True, kind="count"),
    Metric("num_iterations", "Adam steps (gd) or EM iterations (em) run", **_of_fits("num_iterations", int),
           report=True, column_name="iterations", kind="count"),
    Metric("converged", "1 when the method's tolerance stopped it early (gd: tol, off by default, so 0; em: "
           "em_tol), else 0; its mean is the converged fraction, so 0 ± 0 means no seed stopped early",
           **_of_fits("converged", int), section=None, em_section="summary", report=True, kind="count"),
    Metric("wall_time", "seconds in the fit loop (not compared by --verify)", **_of_fits("wall_time"), section="time",
           report=True, kind="timing"),
    Metric("iterations_per_second", "fit steps per second of wall time", gd=lambda m: m.fit.iterations_per_second,
           section="time", kind="timing"),
    Metric("init_time", "seconds spent initializing the fit", gd=lambda m: m.fit.init_time, section="time",
           kind="timing"),
    Metric("compile_time", "seconds spent compiling the step (0 without compile)", gd=lambda m: m.fit.compile_time,
           section="time", kind="timing"),
    Metric("spike_count", "NLL spikes the fit detected (they are in events.csv)", gd=lambda m: int(m.fit.spike_count)),
)  # fmt: skip


def measure(measured: Measured, metrics: tuple[Metric, ...] | None = None) -> dict[str, float]:
    """Every metric's values by name: `name` for gradient descent, `em_key` for EM (NaN without EM)."""
    values: dict[str, float] = {}
    for metric in METRICS if metrics is None else metrics:
        values[metric.name] = _number(metric.gd(measured))
        if metric.em is not None:
            values[metric.em_key] = _number(metric.em(measured)) if measured.em is not None else NAN
    return values


def _number(value: Any) -> float:
    """A metric value as a Python number (int for counts, float otherwise)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def report_metrics() -> tuple[Metric, ...]:
    """The metrics with a runs.csv column, in column order."""
    return tuple(m for m in METRICS if m.column is not None)


def mlflow_values(values: dict[str, float]) -> dict[str, float]:
    """{MLflow key: value} of the values `measure` gave that are logged as single metrics."""
    return {key: values[name] for metric in METRICS for name, key in metric.mlflow_keys().items()}
