"""log_prob against independent oracles: scikit-learn's score_samples and SciPy's multivariate_normal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

import gmm
from gmm import likelihood

SKLEARN_TYPE = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}


def random_parameters(family: str, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
    weights = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64)
    model = gmm.MixtureModel.from_parameters(family, means, covs, weights)
    return model


def sklearn_model(model: gmm.MixtureModel) -> GaussianMixture:
    """A fitted-looking GaussianMixture holding the model's parameters."""
    kind = SKLEARN_TYPE.get(model.family.name, "full")
    covs = model.covariances.double().numpy()
    if kind == "tied":
        covs = covs[0]
    elif kind == "diag":
        covs = np.diagonal(covs, axis1=1, axis2=2).copy()
    elif kind == "spherical":
        covs = np.diagonal(covs, axis1=1, axis2=2)[:, 0].copy()
    sk = GaussianMixture(model.num_components, covariance_type=kind)
    sk.weights_ = model.weights.double().numpy()
    sk.means_ = model.means.double().numpy()
    sk.covariances_ = covs
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    sk.precisions_cholesky_ = _compute_precision_cholesky(covs, kind)
    return sk


@pytest.mark.parametrize("family", gmm.FAMILIES)
@pytest.mark.parametrize("k,d", [(1, 1), (3, 2), (4, 5)])
def test_log_prob_matches_sklearn(family, k, d):
    model = random_parameters(family, k, d, seed=k * 10 + d)
    x = torch.randn(200, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    expected = torch.from_numpy(sklearn_model(model).score_samples(x.numpy()))
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_single_component_matches_scipy(family):
    model = random_parameters(family, 1, 3, seed=7)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = multivariate_normal(model.means[0].numpy(), model.covariances[0].numpy()).logpdf(x.numpy())
    torch.testing.assert_close(model.log_prob(x), torch.from_numpy(expected), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_quadratic_path_equals_difference_path(family):
    model = random_parameters(family, 4, 3, seed=3)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    cov = model.covariance()
    center = x.mean(0)
    feats = likelihood.quadratic_features(x, center, model.family.cholesky)
    quad = feats @ likelihood.quadratic_weights(model.logits, model.locs, cov, center)
    exact = likelihood.joint_log_prob(x, model.logits, model.locs, cov)
    torch.testing.assert_close(quad, exact, rtol=1e-9, atol=1e-9)
    aug = likelihood.joint_log_prob(likelihood.augment(x), model.logits, model.locs, cov, augmented=True)
    torch.testing.assert_close(aug, exact, rtol=1e-12, atol=1e-12)


def test_logsumexp_far_components_matches_torch():
    joint = torch.tensor([[0.0, -1000.0, -50.0], [-3000.0, -2990.0, -2995.0]], dtype=torch.float64)
    torch.testing.assert_close(likelihood.logsumexp(joint), torch.logsumexp(joint, -1))
    joint32 = joint.float()
    torch.testing.assert_close(likelihood.logsumexp(joint32), torch.logsumexp(joint32, -1))


def test_tril_inverse_gradient():
    tril = (torch.randn(3, 4, 4, dtype=torch.float64).tril() + 3 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(likelihood.tril_inverse, (tril,))


def test_log_prob_in_chunks_equals_one_pass(monkeypatch):
    model = random_parameters("full", 3, 2, seed=5)
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    whole = model.log_prob(x)
    monkeypatch.setattr(gmm.model, "_CHUNK_ELEMENTS", 64)  # forces many 1024-row chunks
    torch.testing.assert_close(model.log_prob(x), whole, rtol=0, atol=0)


@pytest.mark.parametrize("family", gmm.FAMILIES)
@pytest.mark.parametrize("augmented", [False, True])
def test_fit_loss_gradcheck_and_value(family, augmented):
    """The fit's fused loss node: gradcheck in float64, and its value equals -sum log_prob / N."""
    model = random_parameters(family, 3, 2, seed=5)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    xin = likelihood.augment(x) if augmented else x
    fam = model.family
    raw = model.raw_cov.detach().clone().requires_grad_(fam.trainable)
    logits = model.logits.detach().clone().requires_grad_()
    locs = model.locs.detach().clone().requires_grad_()

    def loss(lg, mu, r):
        return likelihood.mixture_nll_sum(xin, lg, mu, r, fam, -1.0 / x.shape[0], augmented=augmented)

    assert torch.autograd.gradcheck(loss, (logits, locs, raw) if fam.trainable else (logits, locs, raw.detach()))
    torch.testing.assert_close(loss(logits, locs, raw), -model.log_prob(x).mean(), rtol=1e-12, atol=1e-12)


def test_raw_to_tril_gradcheck_with_one_output_used():
    raw = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    fam = gmm.families.get_family("full", 4)
    assert torch.autograd.gradcheck(lambda r: fam.covariance(r).scale_tril, (raw,))
    assert torch.autograd.gradcheck(lambda r: fam.covariance(r).half_log_det, (raw,))
    cov = fam.covariance(raw)
    expected = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
    torch.testing.assert_close(cov.scale_tril, expected, rtol=0, atol=0)


def test_constant_cache_is_bounded():
    x = torch.zeros(3, dtype=torch.float64)
    for n in range(1, 200):
        assert likelihood._ones(n, x).shape == (n,)
    info = likelihood._make_constant.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize
