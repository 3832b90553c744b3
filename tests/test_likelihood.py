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


def _population_inputs(family: str, dtype: torch.dtype, far: float = 0.0, n: int = 60):
    """Two members of 3 components in 2 dims, torch tensors with gradients, and (2, n, 2) data; `far` moves
    component 2 that far away (in its standard deviations), so its responsibilities sit at the log-sum-exp's floor."""
    members = [random_parameters(family, 3, 2, seed=s) for s in (7, 8)]
    with torch.no_grad():
        for m in members:
            m.locs[2] += far * m.covariances[2].diagonal().sqrt().max()
    stack = [torch.stack([getattr(m, name).detach() for m in members]).to(dtype) for name in ("logits", "locs", "raw_cov")]
    x = torch.randn(2, n, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    return [t.clone().requires_grad_() for t in stack], x.to(dtype), members


def _batched_loss(family: str, x: torch.Tensor, logits, locs, raw, work=None):
    fam = gmm.families.get_family(family, 2)
    xt = x.transpose(1, 2).contiguous()
    return likelihood.batched_mixture_nll(xt, logits, locs, fam.covariance(raw), -1.0 / x.shape[1], work)


@pytest.mark.parametrize("family", [f for f in gmm.FAMILIES if f != "constant"])
def test_population_loss_gradcheck_and_value(family):
    """The population's fused loss node (gmm.likelihood._BatchedMixtureNLL): gradcheck in float64, and each
    member's value is its own -mean log_prob."""
    (logits, locs, raw), x, members = _population_inputs(family, torch.float64)
    assert torch.autograd.gradcheck(lambda lg, mu, r: _batched_loss(family, x, lg, mu, r), (logits, locs, raw))
    expected = torch.stack([-m.log_prob(x[i]).mean() for i, m in enumerate(members)])
    torch.testing.assert_close(_batched_loss(family, x, logits, locs, raw), expected, rtol=1e-12, atol=1e-12)
    # the data's gradient too: one set per member, and one set shared by both
    for data in (x, x[:1]):
        data = data.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda d: _batched_loss(family, d.expand(2, -1, -1), logits, locs, raw), (data,))
        assert torch.autograd.gradcheck(lambda d: _batched_loss(family, d, logits, locs, raw), (data,))


@pytest.mark.parametrize("family", gmm.FAMILIES)
@pytest.mark.parametrize("augmented", [False, True])
def test_fit_loss_gradient_in_the_data(family, augmented):
    """The fit's loss differentiates in the data too (every family's path), and float64 data lifts float32
    parameters to float64 rather than rounding the data to float32."""
    model = random_parameters(family, 3, 2, seed=5)
    x = (torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3).requires_grad_()
    fam, params = model.family, (model.logits.detach(), model.locs.detach(), model.raw_cov.detach())

    def loss(data):
        xin = likelihood.augment(data) if augmented else data
        return likelihood.mixture_nll_sum(xin, *params, fam, -1.0 / data.shape[0], augmented=augmented)

    assert torch.autograd.gradcheck(loss, (x,))
    if not fam.cholesky:  # (the Cholesky node refuses mixed dtypes)
        single = [p.float() for p in params]
        value = likelihood.mixture_nll_sum(x.detach(), *single, fam, -1.0 / x.shape[0])
        assert value.dtype == torch.float64


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_population_loss_in_float32_with_far_components_and_a_reused_workspace(family):
    """float32 with one component 30 standard deviations away and N = 4000: its responsibilities sit at the exp
    floor, and times 1/N they are float32 denormals (the state whose products ran 3-8x slower before the backward
    applied 1/N last). The gradients are the float64 ones to float32 rounding, and a workspace reused over two
    steps gives what fresh tensors give."""
    (logits, locs, raw), x, _ = _population_inputs(family, torch.float64, far=30.0, n=4000)
    _batched_loss(family, x, logits, locs, raw).sum().backward()
    exact = [t.grad.clone() for t in (logits, locs, raw)]
    (logits, locs, raw), x, _ = _population_inputs(family, torch.float32, far=30.0, n=4000)
    with torch.no_grad():  # the state: the far component's responsibilities / N below float32's smallest normal
        fam = gmm.families.get_family(family, 2)
        joint = likelihood.batched_joint_log_prob(x, logits, locs, fam.covariance(raw))
        e = (joint - joint.amax(-1, keepdim=True)).clamp_min(likelihood.exp_floor(joint.dtype)).exp()  # the forward's
        resp = e / e.sum(-1, keepdim=True)
        assert bool((resp[..., 2] / x.shape[1] < torch.finfo(torch.float32).tiny).all())
    work = likelihood.Workspace()
    for _ in range(2):  # the second pass writes into the buffers of the first
        for t in (logits, locs, raw):
            t.grad = None
        _batched_loss(family, x, logits, locs, raw, work).sum().backward()
        for t, g in zip((logits, locs, raw), exact, strict=True):
            # float32: about 1e-7 relative per op, over sums of 60 terms of gradients of order 1
            torch.testing.assert_close(t.grad.double(), g, rtol=1e-4, atol=1e-5)
    assert float(exact[1][:, 2].abs().max()) < 1e-30  # the far component's mean gradient: nothing but the floor's


def test_a_workspace_refuses_a_second_forward_before_the_backward():
    """Reusing a workspace's buffers while a graph still holds them is an error, never a wrong gradient."""
    (logits, locs, raw), x, _ = _population_inputs("diagonal", torch.float32)
    work = likelihood.Workspace()
    first = _batched_loss("diagonal", x, logits, locs, raw, work).sum()
    _batched_loss("diagonal", x + 1.0, logits, locs, raw, work)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
