"""The collapse benchmark (experiments.datasets): every collapse dataset collapses, the controls do not, and a
validation NLL punishes collapse.

The point-mass, outlier and quantized datasets put exact point masses (30 copies, a far point, the points of a
coarse grid) where k-means starts a component exactly. Its mean then has an exactly zero gradient (the other
points' responsibilities are below float32's resolution there, or balance exactly), while the gradient of its log
variance is a constant, so Adam lowers the log variance by the learning rate at every step until the clamp stops
it: nothing chaotic, the same on every CPU. `diagonal-subspace` does the same along its flat axis.

The others (over-specified K, a full or tied covariance on a line) never reach the 1e-8 floor under Adam (their
means jitter by about the learning rate), but their smallest variance runs away by orders of magnitude: they are
asserted to run away (`RUNAWAY`) with a margin.
"""

from __future__ import annotations

import math

import pytest
import torch

import gmm
from experiments import collapse, datasets
from experiments.collapse import COLLAPSE_PROTOCOL, RUNAWAY, CollapseMeasure, measure_collapse, relative_min_variance
from experiments.datasets import collapse_datasets, control_datasets, load_dataset
from gmm.options import lr_factor

ALL_COLLAPSE = [name for family in gmm.FAMILIES for name in collapse_datasets(family)]
ALL_CONTROLS = [name for family in gmm.FAMILIES for name in control_datasets(family)]
STRUCTURAL = [name for name in ALL_COLLAPSE if datasets.DATASETS[name].cause in ("point_mass", "outliers", "quantized")] + [
    "diagonal-subspace"
]
RUNS_AWAY = [name for name in ALL_COLLAPSE if name not in STRUCTURAL]  # over-specified, full/tied-subspace
RUNAWAY_MARGIN = 3.0  # the runaway datasets go below RUNAWAY / this (10 seeds: at least 5x below, README)


def _first_clamp_bound(protocol, variance: float) -> int:
    """The step at which a log variance starting at log(variance) and falling by the (cosine-scheduled)
    learning rate at every step reaches log(clamp): sum_{t < s} lr_t >= log(variance / clamp)."""
    need, total = math.log(variance / protocol.clamp), 0.0
    for step in range(protocol.iterations):
        total += protocol.component_lr * lr_factor("cosine", step, protocol.iterations)
        if total >= need:
            return step + 1
    return protocol.iterations + 1


def test_every_collapse_dataset_is_checked_under_the_protocol():
    assert sorted(STRUCTURAL + RUNS_AWAY) == sorted(ALL_COLLAPSE)
    assert set(RUNS_AWAY) == {
        "full-overspecified", "diagonal-overspecified", "isotropic-overspecified", "full-subspace", "tied-subspace"
    }  # fmt: skip


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structural_collapse_datasets_collapse_under_the_protocol(name):
    protocol = collapse.CollapseProtocol(seeds=(0, 1, 2))
    measure = measure_collapse(name, protocol)
    assert measure.clamp_rate == 1.0 and measure.rate == 1.0, measure
    # the start variance is below the data's (k-means shrinks it to the base covariance, ~1), so the first
    # clamp comes well inside the budget: at the latest where a log variance of log(4) would reach the floor
    bound = _first_clamp_bound(protocol, 4.0)
    assert bound < protocol.iterations
    assert all(step <= bound for step in measure.first_clamp)


@pytest.mark.filterwarnings("ignore::gmm.ConvergenceWarning")  # NLL spikes rolled back: part of running away
@pytest.mark.parametrize("name", RUNS_AWAY)
def test_the_other_collapse_datasets_run_away_under_the_protocol(name):
    # whole fits (no stop at the first runaway), so the margin below the criterion is measured too
    protocol = collapse.CollapseProtocol(seeds=(0, 1, 2))
    measure = measure_collapse(name, protocol)
    assert measure.runaway_rate == 1.0 and measure.rate == 1.0, measure
    assert max(measure.min_variance) < RUNAWAY / RUNAWAY_MARGIN, measure
    assert all(step < protocol.iterations for step in measure.first_runaway), measure


@pytest.mark.filterwarnings("ignore::gmm.ConvergenceWarning")
def test_a_fit_can_stop_at_its_first_runaway():
    protocol = collapse.CollapseProtocol(seeds=(0,))
    whole = measure_collapse("full-subspace", protocol)
    stopped = measure_collapse("full-subspace", protocol, stop_at_runaway=True)
    assert stopped.first_runaway == whole.first_runaway and stopped.runaway_rate == 1.0
    assert stopped.min_variance[0] < RUNAWAY and stopped.min_variance[0] >= whole.min_variance[0]
    assert math.isnan(stopped.val_nll[0]) and math.isfinite(whole.val_nll[0])  # stopped: no final model


@pytest.mark.parametrize("name", ALL_CONTROLS)
def test_controls_neither_clamp_nor_run_away_under_the_protocol(name):
    # a well-posed fit settles near the true covariances: its smallest variance stays >= 3e-2 x the data's
    # (README), 300x above the criterion, so a wide margin of 10x is asserted
    measure = measure_collapse(name, collapse.CollapseProtocol(seeds=(0,)))
    assert measure.rate == 0.0 and measure.clamp_rate == 0.0, measure
    assert min(measure.min_variance) > 10 * RUNAWAY, measure


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_the_runaway_criterion_reads_the_smallest_eigenvalue_against_the_smallest_data_axis(factor):
    # data with per-axis variances 4 and 1 (smallest 1); a rotated component whose smallest eigenvalue is
    # just under or over RUNAWAY x 1, beside a well-posed one: only its eigenvalue counts, not its diagonal
    train = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    train = (train - train.mean(0)) / train.std(0) * torch.tensor([2.0, 1.0], dtype=torch.float64)
    c, s = math.cos(0.6), math.sin(0.6)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    thin = rotation @ torch.diag(torch.tensor([0.5, factor * RUNAWAY], dtype=torch.float64)) @ rotation.T
    assert float(thin.diagonal().min()) > 10 * RUNAWAY  # an axis-wise look would miss it
    covariances = torch.stack([torch.eye(2, dtype=torch.float64), thin])
    means = torch.zeros(2, 2, dtype=torch.float64)
    model = gmm.MixtureModel.from_parameters("full", means, covariances, torch.tensor([0.5, 0.5], dtype=torch.float64))
    relative = relative_min_variance(model.covariances, train)
    assert relative == pytest.approx(factor * RUNAWAY, rel=1e-3)
    assert (relative < RUNAWAY) == (factor < 1)


def test_a_collapse_is_a_clamp_a_runaway_or_a_non_finite_nll():
    measure = CollapseMeasure(
        "x", first_clamp=(5, None, None, None), diverged=(False, False, True, False), val_nll=(math.nan,) * 4,
        first_runaway=(3, 40, None, None), min_variance=(0.0, 1e-5, math.nan, 0.1),
    )  # fmt: skip
    assert measure.collapsed == (True, True, True, False)
    assert (measure.clamp_rate, measure.runaway_rate, measure.rate) == (0.25, 0.75, 0.75)


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_a_component_on_a_far_point_mass_shrinks_by_the_learning_rate_with_its_mean_fixed(family):
    ds = load_dataset(f"{family}-point-mass")
    x = ds.train
    where = x[-1]  # the copies
    model = gmm.make_model(family, 5, 2)
    gmm.fit(model, x, num_iterations=1, component_lr=0.0, mixture_lr=0.0, seed=0)  # k-means start, no move
    k = int((model.means - where).norm(dim=1).argmin())
    assert torch.equal(model.means[k], where)  # k-means puts the spare component exactly on the copies
    before = model.family.floor_view(model.raw_cov.detach())[k].clone()  # log variances, or log L_kk
    lr, steps = 0.05, 20
    options = {"component_lr": lr, "mixture_lr": 0.0, "lr_schedule": "constant", "reset": False}
    gmm.fit(model, x, init="keep", num_iterations=steps, **options)
    assert torch.equal(model.means[k], where)  # an exactly zero gradient: the mean never moves
    drop = before - model.family.floor_view(model.raw_cov.detach())[k]
    # a constant gradient makes Adam's step exactly lr (up to its eps, 1e-8 against a gradient ~0.03)
    torch.testing.assert_close(drop, torch.full_like(drop, lr * steps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_validation_punishes_collapse_onto_grid_values_that_training_rewards(family):
    # the truth of a quantized dataset plus four spare components on the four most frequent training grid
    # points: collapsed (variance 1e-8) or held at a suitable clamp (the variance of a uniform grid cell,
    # width^2 / 12)
    ds = load_dataset(f"{family}-quantized")
    train, val = ds.train.double(), ds.val.double()
    values, counts = torch.unique(train, dim=0, return_counts=True)
    spots = values[counts.argsort(descending=True)[:4]]
    truth = ds.mock

    def with_spares(variance: float) -> gmm.MixtureModel:
        eye = torch.eye(2, dtype=torch.float64)
        means = torch.cat([truth.means, spots])
        covariances = torch.cat([truth.covariances, (variance * eye).expand(4, 2, 2)])
        weights = torch.cat([truth.weights * 0.8, torch.full((4,), 0.05, dtype=torch.float64)])
        return gmm.MixtureModel.from_parameters(family, means, covariances, weights)

    collapsed, clamped = with_spares(1e-8), with_spares(datasets._GRID_WIDTH**2 / 12)
    assert collapsed.nll(train) < clamped.nll(train) - 0.5  # training rewards collapse ...
    assert collapsed.nll(val) > clamped.nll(val) + 0.05  # ... validation (dequantized) punishes it
    # a validation point never sits on a grid value, so the collapsed spares add nothing there
    assert collapsed.nll(val) > truth.true_model().nll(val)


def test_protocol_settings_lie_inside_the_studies_search_space():
    from studies.run import DEFAULT_ITERATIONS
    from studies.space import load_space

    space = {p.name: p for p in load_space("diagonal").params}
    assert COLLAPSE_PROTOCOL.clamp == space["clamp"].low
    assert space["component_lr"].low <= COLLAPSE_PROTOCOL.component_lr <= space["component_lr"].high
    assert COLLAPSE_PROTOCOL.iterations == DEFAULT_ITERATIONS


def test_a_run_shows_the_collapse_in_its_smallest_variance_curve_and_figure(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from experiments import ExperimentConfig, run_experiment

    config = ExperimentConfig(
        dataset="diagonal-point-mass", family="diagonal", iterations=300, eval_every=10, clamp=1e-3,
        component_lr=0.1, reset=False, log_model=False,
    )  # fmt: skip
    result = run_experiment(config, mlflow_uri)
    assert result.clamp_count > 0
    client = MlflowClient(mlflow_uri)
    curve = [m.value for m in client.get_metric_history(result.run_id, "variance/min")]
    assert len(curve) == 30 and curve[0] > 1e-2  # the start: a variance far above the floor ...
    assert min(curve) == pytest.approx(1e-3, rel=1e-5)  # ... held at the clamp once it collapsed
    figures = {f.path for f in client.list_artifacts(result.run_id, "figures")}
    assert "figures/smallest_variance.png" in figures


def test_smallest_variance_figure_checks_its_input():
    from gmm.plot import plot_smallest_variances

    with pytest.raises(ValueError, match="len\\(steps\\)"):
        plot_smallest_variances([1, 2], torch.ones(3, 2))
    with pytest.raises(ValueError, match="not log variances"):
        plot_smallest_variances([1], -torch.ones(1, 2))
    fig = plot_smallest_variances([1, 2], torch.tensor([[1.0, 0.5], [0.1, 1e-3]]), 1e-3)
    assert fig.axes[0].get_yscale() == "log"
