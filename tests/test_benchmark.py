"""The collapse benchmark (experiments.datasets): structurally forced collapse, and a validation NLL that punishes it.

The point-mass and outlier datasets put a single value (30 copies, or one far point) at least 2 radius away
from every other point, and the model has a spare component that k-means starts exactly on it. Its mean
then has an exactly zero gradient (the other points' responsibilities are below float32's resolution there),
while the gradient of its log variance is a constant, so Adam lowers the log variance by the learning rate
at every step until the clamp stops it: nothing chaotic, the same on every CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import gmm
from experiments import datasets
from experiments.datasets import COLLAPSE_PROTOCOL, load_dataset, measure_collapse
from gmm.fit import lr_factor

STRUCTURAL = [f"{f}-{cause}" for f in ("full", "diagonal", "isotropic") for cause in ("point-mass", "outliers")] + [
    "diagonal-subspace"
]


def _first_clamp_bound(protocol, variance: float) -> int:
    """The step at which a log variance starting at log(variance) and falling by the (cosine-scheduled)
    learning rate at every step reaches log(clamp): sum_{t < s} lr_t >= log(variance / clamp)."""
    need, total = math.log(variance / protocol.clamp), 0.0
    for step in range(protocol.iterations):
        total += protocol.component_lr * lr_factor("cosine", step, protocol.iterations)
        if total >= need:
            return step + 1
    return protocol.iterations + 1


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structural_collapse_datasets_collapse_under_the_protocol(name):
    protocol = datasets.CollapseProtocol(seeds=(0, 1, 2))
    measure = measure_collapse(name, protocol)
    assert measure.rate == 1.0, measure
    # the start variance is below the data's (k-means shrinks it to the base covariance, ~1), so the first
    # clamp comes well inside the budget: at the latest where a log variance of log(4) would reach the floor
    bound = _first_clamp_bound(protocol, 4.0)
    assert bound < protocol.iterations
    assert all(step <= bound for step in measure.first_clamp)


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
    # points: collapsed (variance 1e-8) or held at a suitable clamp (the grid's variance, 1/12)
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

    collapsed, clamped = with_spares(1e-8), with_spares(1.0 / 12)
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
