"""Fits a user can trust: standardized coordinates, the best iterate, spikes, restarts, NaN recovery, warnings,
and quality on real data against scikit-learn's EM (best of 10 starts)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import datasets
from sklearn.mixture import GaussianMixture

import gmm
from gmm.fitting import start_seeds
from gmm.options import make_options
from gmm.records import ConvergenceWarning

SK = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}


def _blobs(seed: int = 0, n: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [6.0, 1.0], [2.0, 7.0]], dtype=torch.float64)
    return (centers.repeat(n // 3, 1) + torch.randn(n, 2, generator=g, dtype=torch.float64)).contiguous()


# -- standardized coordinates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic", "shared_isotropic"])
def test_affine_scaling_gives_the_same_fit(family):
    """X and 1000 X + 5 from the same start (built, mapped by the same affine map): the same responsibilities,
    NLLs D log(1000) apart (float64, few steps). The start is built, not drawn: k-means++'s best-of-10 choice
    can flip on a near tie between the two rounding patterns, which is not what this test is about."""
    x = _blobs()
    y = 1000.0 * x + 5.0
    start = torch.tensor([[0.5, -0.5], [5.0, 1.5], [2.5, 6.0]], dtype=torch.float64)
    cov = torch.tensor([[1.5, 0.3], [0.3, 1.0]], dtype=torch.float64).expand(3, 2, 2)
    models = [gmm.make_model(family, 3, 2, dtype=torch.float64) for _ in range(2)]
    models[0].set_parameters(means=start, covariances=cov)
    models[1].set_parameters(means=1000.0 * start + 5.0, covariances=1e6 * cov)
    options = dict(num_iterations=40, component_lr=0.05, mixture_lr=0.05, init="keep")
    results = [gmm.fit(m, data, **options) for m, data in zip(models, (x, y), strict=True)]
    shift = 2 * math.log(1000.0)
    torch.testing.assert_close(results[1].nll_history, results[0].nll_history + shift, rtol=0, atol=1e-8)
    assert results[1].final_nll - results[0].final_nll == pytest.approx(shift, abs=1e-8)
    torch.testing.assert_close(models[1].predict_proba(y), models[0].predict_proba(x), rtol=0, atol=1e-8)
    torch.testing.assert_close(models[1].means, 1000.0 * models[0].means + 5.0, rtol=1e-9, atol=1e-6)
    assert results[0].final_nll < float(results[0].nll_history[0])


def test_scaled_column_needs_no_other_learning_rate():
    """One column in micrometres: the fit ends where the fit of the unscaled data ends (plus the log scale)."""
    x = _blobs(1)
    y = x.clone()
    y[:, 1] *= 1e6
    a = gmm.fit(gmm.GmmFull(3, 2, dtype=torch.float64), x, num_iterations=200)
    b = gmm.fit(gmm.GmmFull(3, 2, dtype=torch.float64), y, num_iterations=200)
    assert b.final_nll - a.final_nll == pytest.approx(math.log(1e6), abs=1e-6)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_clamp_stays_in_data_units(family):
    """A column in units 1000x larger and a component alone on a far point, at the floor: every variance stays
    >= clamp in the DATA's units after every step, and the lone component sits at that floor (clamp / scale_j^2
    on axis j of the standardized coordinates; a floor of clamp there would hold it at ~1e4 on axis 0)."""
    x = torch.cat([_blobs(2, n=30), torch.tensor([[40.0, 40.0]], dtype=torch.float64)])
    x[:, 0] *= 1000.0
    clamp = 1e-3
    model = gmm.make_model(family, 4, 2, dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [6000.0, 1.0], [2000.0, 7.0], [40000.0, 40.0]], dtype=torch.float64)
    covariances = torch.diag(torch.tensor([1e6, 1.0], dtype=torch.float64)).repeat(4, 1, 1)
    covariances[3] = torch.eye(2, dtype=torch.float64) * clamp
    model.set_parameters(means=means, covariances=covariances, weights=torch.tensor([0.3, 0.3, 0.3, 0.1]))
    seen = []

    def check(step, nll, events):
        diag = model.covariances.diagonal(dim1=-2, dim2=-1)
        seen.append(step)
        if family != "constant":
            assert bool((diag >= clamp * (1 - 1e-12)).all()), diag

    model.fit(x, num_iterations=5, clamp=clamp, init="keep", log_freq=1, callback=check, reset=False)
    assert seen == [1, 2, 3, 4, 5]
    diag = model.covariances.diagonal(dim1=-2, dim2=-1)
    if family != "constant":
        assert bool((diag >= clamp).all())
    if family in ("full", "diagonal", "isotropic"):
        assert float(diag[3, 0]) < 2 * clamp, diag  # the lone component is held at the data-unit floor
        assert model.fit_result_.clamp_count > 0
        assert all("raised to 0.001" in e.detail for e in model.fit_result_.events if e.kind == "clamp")


def test_keep_starts_from_the_model_in_data_units():
    x = _blobs(3) * 100.0
    model = gmm.GmmFull(3, 2, dtype=torch.float64)
    model.fit(x, num_iterations=30)
    before = model.nll(x)
    result = model.fit(x, num_iterations=1, init="keep", component_lr=0.0, mixture_lr=0.0)
    assert float(gmm.fit(model, x, num_iterations=1, init="keep", component_lr=0.0, mixture_lr=0.0).nll_history[0]) == (
        pytest.approx(before, abs=1e-9)
    )
    assert result == pytest.approx(before, abs=1e-9)


# -- best iterate, spikes, non-finite NLLs ---------------------------------------------------------------------
def _spiking_fit(**options):
    """From a good start (EM's), one Adam step at component_lr 1 throws the means far off: a spike."""
    x = _blobs(4)
    model = gmm.GmmFull(3, 2, dtype=torch.float64)
    model.fit_em(x, num_iterations=50)
    start = model.nll(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = gmm.fit(model, x, num_iterations=6, init="keep", component_lr=1.0, lr_schedule="constant", **options)
    return model, x, start, result


def test_spike_is_logged_and_rolled_back():
    model, x, start, result = _spiking_fit()
    spikes = [e for e in result.events if e.kind == "spike"]
    assert spikes and spikes[0].step == 1 and spikes[0].component == -1
    assert "rolled back to step 0" in spikes[0].detail and "x0.5" in spikes[0].detail
    assert result.nll_history[1] - result.nll_history[0] > 1.0  # the jump the event reports
    assert result.final_nll == pytest.approx(start, abs=1e-9) == result.best_nll  # the start was best
    assert model.nll(x) == pytest.approx(start, abs=1e-9)
    assert any("rolled back" in w for w in result.warnings)


def test_spike_without_rollback_only_logs():
    model, x, start, result = _spiking_fit(spike_rollback=False, keep_best=False)
    assert result.spike_count >= 1
    assert result.final_nll == pytest.approx(result.last_nll, abs=1e-9) and result.final_nll > start
    assert model.nll(x) == pytest.approx(result.final_nll, abs=1e-9)
    assert any("above its start" in w for w in result.warnings)


def test_keep_best_returns_the_lowest_nll_seen():
    model, x, start, result = _spiking_fit(spike_threshold=None)
    assert result.spike_count == 0
    assert result.last_nll > result.best_nll == pytest.approx(float(result.nll_history.min()), abs=1e-9)
    assert result.final_nll == pytest.approx(model.nll(x), abs=1e-9)
    assert result.final_nll == pytest.approx(float(result.nll_history[result.best_step]), abs=1e-9)
    with pytest.warns(ConvergenceWarning, match="above its start"):
        gmm.fit(model, x, num_iterations=6, init="keep", component_lr=1.0, lr_schedule="constant", spike_threshold=None)


def test_non_finite_nll_leaves_the_last_finite_parameters():
    x = _blobs(5)
    model = gmm.GmmFull(3, 2, dtype=torch.float64)
    kept = {}

    def poison(step, nll, events):
        if step == 8:
            kept["params"] = (model.means.clone(), model.covariances.clone(), model.weights.clone())
            kept["nll"] = nll
        if step == 9:
            with torch.no_grad():
                model.locs[0, 0] = float("nan")

    with pytest.raises(gmm.NonFiniteNLLError) as info:
        model.fit(x, num_iterations=50, log_freq=1, callback=poison)
    assert info.value.step == 9
    assert torch.isfinite(model.log_prob(x)).all()
    torch.testing.assert_close(model.means, kept["params"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.covariances, kept["params"][1], rtol=0, atol=1e-12)
    assert len(model.fit_result_.nll_history) == 9 and not model.fit_result_.completed


# -- restarts --------------------------------------------------------------------------------------------------
def test_n_init_keeps_the_best_start_and_every_record():
    x = _blobs(6)
    single = gmm.fit(gmm.GmmFull(3, 2, dtype=torch.float64), x, num_iterations=30, init="random", seed=7)
    model = gmm.GmmFull(3, 2, dtype=torch.float64)
    result = gmm.fit(model, x, num_iterations=30, init="random", seed=7, n_init=4)
    assert [r.seed for r in result.starts] == [7, 8, 9, 10] and [r.start for r in result.starts] == [0, 1, 2, 3]
    # start 0 is the n_init=1 fit; the starts run as one population (gmm.population), whose batched sums round
    # in another order: equal to float64 rounding over these 30 steps, not bit for bit
    torch.testing.assert_close(result.starts[0].nll_history, single.nll_history, rtol=0, atol=1e-12)
    finals = [r.final_nll for r in result.starts]
    assert result.final_nll == min(finals) and result.start == finals.index(min(finals))
    assert model.nll(x) == pytest.approx(result.final_nll, abs=1e-9)
    assert model.fit_result_ is result


def test_n_init_options():
    assert start_seeds(make_options(n_init=3, seed=5)) == [5, 6, 7]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert start_seeds(make_options(n_init=3, generator=g1)) == start_seeds(make_options(n_init=3, generator=g2))
    with pytest.raises(ValueError, match="init='keep'"):
        make_options(n_init=2, init="keep")
    with pytest.raises(ValueError, match="n_init must be >= 1"):
        make_options(n_init=0)
    with pytest.raises(ValueError, match="spike_threshold must be > 0"):
        make_options(spike_threshold=0.0)


def test_tol_not_reached_warns():
    with pytest.warns(ConvergenceWarning, match="tol=1e-12 was not reached"):
        result = gmm.fit(gmm.GmmFull(3, 2), _blobs(7).float(), num_iterations=5, tol=1e-12)
    assert result.warnings and not result.converged


# -- real data: GD (defaults, n_init=10) within 0.05 nats of scikit-learn's EM best of 10 ------------------------
def _real(name: str) -> np.ndarray:
    if name == "iris":
        return datasets.load_iris().data
    x = datasets.load_wine().data
    return (x - x.mean(0)) / x.std(0)  # wine, standardized


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, k, family",
    [("iris", 3, f) for f in ("full", "diagonal", "isotropic", "tied")] + [("wine", 3, "full"), ("wine", 3, "tied")],
)
def test_real_data_matches_em_best_of_10(name, k, family):
    x = _real(name)
    em = GaussianMixture(k, covariance_type=SK[family], n_init=10, random_state=0, reg_covar=1e-6, tol=1e-6,
                         max_iter=1000).fit(x)  # fmt: skip
    em_nll = -em.score(x)
    model = gmm.make_model(family, k, x.shape[1], dtype=torch.float64)
    result = gmm.fit(model, x, n_init=10)
    assert result.final_nll <= em_nll + 0.05, f"{name} {family}: GD {result.final_nll:.4f} vs EM {em_nll:.4f}"
    assert all(r.final_nll <= float(r.nll_history[0]) for r in result.starts)  # no start ends above its start
