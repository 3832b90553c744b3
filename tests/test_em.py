"""EM (gmm.em): scikit-learn's GaussianMixture as the oracle, monotone NLL, the record, warnings, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

import gmm
from gmm.em import ConvergenceWarning, fit_em
from gmm.init import initialize
from gmm.validation import make_generator

SK = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}
CLAMP = 1e-6


def _data(family: str, num_samples: int = 400, num_components: int = 3, num_dims: int = 2, seed: int = 1):
    truth = family if family != "constant" else "isotropic"
    return gmm.generate_data(num_samples, num_components, num_dims, 5.0, truth, seed=seed).data.double()


def _started(family: str, x: torch.Tensor, num_components: int, seed: int = 7) -> gmm.MixtureModel:
    """A float64 model at a deliberately rough start (K random data points): EM has real work to do."""
    model = gmm.make_model(family, num_components, x.shape[1], dtype=torch.float64)
    initialize(model, x, "random", make_generator(seed), clamp=CLAMP)
    return model


def _sklearn_from(model: gmm.MixtureModel, kind: str, tol: float, max_iter: int) -> GaussianMixture:
    """An unfitted scikit-learn mixture starting from `model`'s current parameters (read now, before EM moves them)."""
    return GaussianMixture(
        model.num_components,
        covariance_type=kind,
        weights_init=model.weights.numpy().copy(),
        means_init=model.means.numpy().copy(),
        precisions_init=_sklearn_precisions(model.covariances.numpy(), kind),
        reg_covar=CLAMP,
        tol=tol,
        max_iter=max_iter,
    )


def _sklearn_precisions(covariances: np.ndarray, kind: str) -> np.ndarray:
    """(K, D, D) covariance matrices -> scikit-learn's `precisions_init` for `kind`."""
    precisions = np.linalg.inv(covariances)
    if kind == "tied":
        return precisions[0]
    if kind == "diag":
        return np.diagonal(precisions, axis1=1, axis2=2).copy()
    if kind == "spherical":
        return precisions[:, 0, 0].copy()
    return precisions


@pytest.mark.parametrize("family", list(SK))
def test_converged_nll_matches_sklearn_from_the_same_start(family):
    x = _data(family)
    model = _started(family, x, 3)
    sk = _sklearn_from(model, SK[family], tol=1e-10, max_iter=3000)
    result = fit_em(model, x, init="keep", tol=1e-10, num_iterations=3000, clamp=CLAMP)
    assert result.converged

    sk.fit(x.numpy())
    assert sk.converged_
    sk_nll = -sk.score(x.numpy())
    assert abs(result.final_nll - sk_nll) < 1e-4, f"{family}: EM {result.final_nll:.8f} vs sklearn {sk_nll:.8f}"
    # the same optimum, not merely the same value: parameters agree as well
    order = np.argsort(sk.means_[:, 0])
    ours = np.argsort(model.means[:, 0].numpy())
    np.testing.assert_allclose(model.means.numpy()[ours], sk.means_[order], atol=1e-4)
    np.testing.assert_allclose(model.weights.numpy()[ours], sk.weights_[order], atol=1e-4)
    # a real fit from a rough start, not a no-op
    assert result.final_nll < float(result.nll_history[0]) - 0.05


@pytest.mark.parametrize("family", list(SK))
def test_each_iteration_matches_sklearn(family):
    """After exactly t iterations (t = 1, 5) both hold the same parameters: the M-steps agree one by one."""
    x = _data(family, seed=3)
    kind = SK[family]
    for iterations in (1, 5):
        model = _started(family, x, 3, seed=11)
        sk = _sklearn_from(model, kind, tol=0.0, max_iter=iterations)
        fit_em(model, x, init="keep", tol=None, num_iterations=iterations, clamp=CLAMP)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning: max_iter is the point here
            sk.fit(x.numpy())
        np.testing.assert_allclose(model.weights.numpy(), sk.weights_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(model.means.numpy(), sk.means_, rtol=1e-9, atol=1e-12)
        sk_covs = gmm.MixtureModel.from_parameters(
            family,
            torch.from_numpy(sk.means_),
            torch.from_numpy(_full_covariances(sk, kind)),
            torch.from_numpy(sk.weights_),
        ).covariances
        np.testing.assert_allclose(model.covariances.numpy(), sk_covs.numpy(), rtol=1e-9, atol=1e-12)


def _full_covariances(sk: GaussianMixture, kind: str) -> np.ndarray:
    k, d = sk.means_.shape
    if kind == "full":
        return sk.covariances_
    if kind == "tied":
        return np.broadcast_to(sk.covariances_, (k, d, d)).copy()
    if kind == "diag":
        return np.stack([np.diag(v) for v in sk.covariances_])
    return np.stack([v * np.eye(d) for v in sk.covariances_])


def test_constant_moves_only_weights_and_means():
    x = _data("constant", num_dims=3)
    model = gmm.make_model("constant", 3, 3, variance=2.0, dtype=torch.float64)
    initialize(model, x, "random", make_generator(5), clamp=CLAMP)
    raw_before = model.raw_cov.clone()
    weights, means = model.weights.clone(), model.means.clone()

    fit_em(model, x, init="keep", tol=None, num_iterations=1)
    # one iteration by hand: responsibilities at the start, then the closed-form weights and means
    log_dens = torch.distributions.MultivariateNormal(means, covariance_matrix=2.0 * torch.eye(3, dtype=torch.float64))
    log_joint = log_dens.log_prob(x.unsqueeze(1)) + weights.log()  # (N, K)
    resp = log_joint.softmax(-1)
    expected_means = (resp.T @ x) / resp.sum(0).unsqueeze(-1)
    torch.testing.assert_close(model.means, expected_means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.weights, resp.mean(0), rtol=1e-10, atol=1e-12)
    assert torch.equal(model.raw_cov, raw_before)

    result = fit_em(model, x, init="keep", tol=1e-9, num_iterations=2000)
    assert torch.equal(model.raw_cov, raw_before)
    torch.testing.assert_close(model.covariances, 2.0 * torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    assert result.final_nll < float(result.nll_history[0])
    assert not result.events  # nothing to clamp: the covariance is fixed


@pytest.mark.parametrize("family", gmm.FAMILIES)
@pytest.mark.parametrize("init", ["kmeans++", "random", "radius"])
def test_nll_never_increases(family, init):
    x = _data(family, num_components=4, num_dims=3, seed=2)
    model = gmm.make_model(family, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = fit_em(model, x, init=init, seed=3, tol=1e-10, num_iterations=200)
    history = result.nll_history
    assert torch.isfinite(history).all()
    # EM's ascent property; 1e-10 nats of slack for float64 rounding in the mean over N samples
    steps = history.diff()
    assert float(steps.max()) <= 1e-10, f"{family}/{init}: NLL rose by {float(steps.max()):.3g} at {int(steps.argmax())}"
    assert float(history[-1]) < float(history[0])


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_fit_result_fields(family):
    x = _data(family)
    model = gmm.make_model(family, 3, 2)
    result = fit_em(model, x.float(), num_iterations=500, tol=1e-6)
    assert result is model.fit_result_
    assert result.completed and result.converged
    assert result.nll_history.dtype == torch.float64
    assert result.nll_history.shape == (result.num_iterations + 1,)
    assert 1 <= result.num_iterations <= 500
    assert result.final_nll == float(result.nll_history[-1])
    assert abs(float(result.nll_history[-1] - result.nll_history[-2])) < 1e-6
    assert result.wall_time > 0 and result.init_time >= 0 and result.compile_time == 0
    assert result.options.num_iterations == 500
    # the recorded NLL is the model's, at the parameters it ends with
    assert result.final_nll == pytest.approx(-model.score(x.float()), abs=1e-5)
    # model.fit_em returns the final NLL as a float
    loss = gmm.make_model(family, 3, 2).fit_em(x.float(), num_iterations=500, tol=1e-6)
    assert isinstance(loss, float) and loss == result.final_nll


@pytest.mark.parametrize(("old", "new"), [("max_iter", "num_iterations"), ("radius", "init_radius")])
def test_an_old_option_name_gets_the_new_one_suggested(old, new):
    with pytest.raises(TypeError, match=f"unknown fit_em option.*{old} is now '{new}'"):
        fit_em(gmm.GmmFull(2, 2), torch.randn(20, 2), **{old: 5})


def test_num_iterations_without_convergence_warns():
    x = _data("full")
    model = gmm.make_model("full", 3, 2, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"num_iterations=2"):
        result = fit_em(model, x, num_iterations=2, tol=1e-12, init="random")
    assert not result.converged and result.completed and result.num_iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit_em(model, x, num_iterations=2, tol=None, init="random")  # no tol: nothing to warn about
        fit_em(model, x, num_iterations=2, tol=0, init="random")


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_same_seed_same_history(family):
    x = _data(family, num_components=4)

    def run(seed: int) -> torch.Tensor:
        model = gmm.make_model(family, 4, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return fit_em(model, x.float(), num_iterations=50, seed=seed, init="kmeans++").nll_history

    first, again, other = run(4), run(4), run(5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_em_starts_where_gradient_descent_starts():
    x = _data("full").float()
    em_model, gd_model = gmm.GmmFull(3, 2), gmm.GmmFull(3, 2)
    em = fit_em(em_model, x, num_iterations=1, tol=None, seed=9)
    gd = gd_model.fit(x, num_iterations=1, seed=9, mixture_lr=0.0, component_lr=0.0)
    assert gd == pytest.approx(float(em.nll_history[0]), abs=1e-6)


def test_callback_and_interrupted_record():
    x = _data("diagonal")
    seen: list[tuple[int, float]] = []

    def callback(iteration, nll, events):
        seen.append((iteration, nll))
        if iteration == 3:
            raise KeyboardInterrupt

    model = gmm.GmmDiagonal(3, 2)
    with pytest.raises(KeyboardInterrupt):
        fit_em(model, x, num_iterations=100, callback=callback)
    assert [i for i, _ in seen] == [1, 2, 3]
    partial = model.fit_result_
    assert not partial.completed and partial.num_iterations == 3
    assert [nll for _, nll in seen] == partial.nll_history[1:].tolist()


@pytest.mark.parametrize(
    ("data", "options", "match"),
    [
        (torch.zeros(5), {}, r"2-D .*x\[:, None\]"),
        (torch.zeros(10, 2), {}, r"2 dimensions but the model has num_dims=3"),
        (torch.full((10, 3), float("nan")), {}, r"non-finite"),
        (torch.zeros(0, 3), {}, r"empty|0 samples|at least"),
        (torch.zeros(3, 3), {}, r"3 samples but the model has 4 components"),
        (None, {"num_iterations": 0}, r"num_iterations must be >= 1"),
        (None, {"tol": -1.0}, r"tol must be >= 0"),
        (None, {"clamp": 0.0}, r"clamp must be > 0"),
        (None, {"init": "kmeans"}, r"unknown init 'kmeans'.*did you mean 'kmeans\+\+'"),
    ],
)
def test_bad_input_raises_value_error(data, options, match):
    model = gmm.GmmFull(4, 3)
    if data is None:
        data = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        fit_em(model, data, **options)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="num_iterations must be an integer"):
        fit_em(gmm.GmmFull(2, 2), torch.randn(20, 2), num_iterations=10.5)
    with pytest.raises(TypeError, match="data must be a torch.Tensor or a NumPy array"):
        fit_em(gmm.GmmFull(2, 2), "data")
