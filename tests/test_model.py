"""MixtureModel: construction, parameters of every family, sampling, model selection, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import gmm


def test_public_names():
    assert gmm.FAMILIES == ("full", "tied", "diagonal", "isotropic", "shared_isotropic", "constant")
    classes = [gmm.GmmFull, gmm.GmmTied, gmm.GmmDiagonal, gmm.GmmIsotropic, gmm.GmmSharedIsotropic, gmm.GmmConstant]
    for family, cls in zip(gmm.FAMILIES, classes, strict=True):
        model = gmm.make_model(family, num_components=3, num_dims=2)
        assert isinstance(model, cls) and model.family.name == family


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_shapes_and_invariants(family):
    mock = gmm.generate_data(300, 3, 4, 5.0, family, seed=1)
    model = gmm.make_model(family, 3, 4)
    model.fit(mock.data, num_iterations=20)
    assert model.means.shape == (3, 4)
    assert model.covariances.shape == (3, 4, 4)
    assert model.weights.shape == (3,) and float(model.weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert model.log_prob(mock.data).shape == (300,)
    assert model.predict_proba(mock.data).shape == (300, 3)
    assert model.predict(mock.data).shape == (300,)
    assert isinstance(model.score(mock.data), float)
    n, p = 300, model.num_parameters()
    nll = -model.score(mock.data)
    assert model.aic(mock.data) == pytest.approx(2 * n * nll + 2 * p, rel=1e-12)
    assert model.bic(mock.data) - model.aic(mock.data) == pytest.approx(p * (math.log(n) - 2), rel=1e-9)
    cov = model.covariances
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert bool((torch.linalg.cholesky_ex(cov.double()).info == 0).all())


def test_family_structure():
    mock = gmm.generate_data(300, 3, 3, 5.0, "full", seed=2)
    fitted = {}
    for family in gmm.FAMILIES:
        model = gmm.make_model(family, 3, 3, variance=2.0)
        model.fit(mock.data, num_iterations=30)
        fitted[family] = model.covariances
    off = ~torch.eye(3, dtype=torch.bool)
    assert fitted["diagonal"][:, off].abs().max() == 0
    for fam in ("isotropic", "shared_isotropic", "constant"):
        c = fitted[fam]
        assert c[:, off].abs().max() == 0
        torch.testing.assert_close(c.diagonal(dim1=-2, dim2=-1), c[:, :1, 0].expand(3, 3))
    for fam in ("tied", "shared_isotropic", "constant"):
        torch.testing.assert_close(fitted[fam][0], fitted[fam][2])
    torch.testing.assert_close(fitted["constant"], 2.0 * torch.eye(3).expand(3, 3, 3))


def test_num_parameters():
    k, d = 4, 3
    expect = {
        "full": k * d * (d + 1) // 2,
        "tied": d * (d + 1) // 2,
        "diagonal": k * d,
        "isotropic": k,
        "shared_isotropic": 1,
        "constant": 0,
    }
    for family, cov_params in expect.items():
        assert gmm.make_model(family, k, d).num_parameters() == (k - 1) + k * d + cov_params


def test_bic_aic_formula():
    mock = gmm.generate_data(200, 2, 2, 5.0, "full", seed=3)
    model = gmm.GmmFull(2, 2)
    model.fit(mock.data, num_iterations=20)
    n, p = 200, model.num_parameters()
    ll = model.score(mock.data) * n
    assert model.bic(mock.data) == pytest.approx(-2 * ll + p * math.log(n))
    assert model.aic(mock.data) == pytest.approx(-2 * ll + 2 * p)


def test_sample_is_seeded_and_follows_the_model():
    mock = gmm.generate_data(500, 3, 2, 8.0, "full", seed=4)
    model = mock.true_model()
    a, la = model.sample(4000, seed=1)
    b, lb = model.sample(4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(la, lb)
    for k in range(3):
        torch.testing.assert_close(a[la == k].mean(0), model.means[k], atol=0.15, rtol=0)
    assert model.score(a) == pytest.approx(model.score(mock.data.double()), abs=0.15)


def test_true_model_nll_is_near_fit():
    mock = gmm.generate_data(1000, 5, 2, 8.0, "full", seed=42)
    truth = mock.true_model().nll(mock.data)
    model = gmm.GmmFull(5, 2)
    loss = model.fit(mock.data, num_iterations=500, mixture_lr=5e-2, component_lr=5e-2)
    assert loss <= truth + 1e-3  # the maximum-likelihood fit beats the truth on its own sample
    assert truth - loss < 0.05


def test_unknown_family_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'diagonal'"):
        gmm.make_model("diagnoal", 3, 2)
    with pytest.raises(ValueError, match="unknown family"):
        gmm.make_model("banana", 3, 2)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((0, 2), ValueError, "num_components must be >= 1"),
        ((2, 0), ValueError, "num_dims must be >= 1"),
        ((2.5, 2), TypeError, "num_components must be an integer"),
    ],
)
def test_bad_constructor_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        gmm.GmmFull(*args)


def test_bad_variance_and_log_prob_dims():
    with pytest.raises(ValueError, match="variance must be > 0"):
        gmm.GmmConstant(2, 2, variance=0.0)
    with pytest.raises(ValueError, match="3 dimensions but the model has num_dims=2"):
        gmm.GmmFull(2, 2).log_prob(torch.zeros(4, 3))


def test_state_dict_round_trip():
    mock = gmm.generate_data(200, 2, 3, 5.0, "tied", seed=5)
    model = gmm.GmmTied(2, 3)
    model.fit(mock.data, num_iterations=20)
    clone = gmm.GmmTied(2, 3)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.log_prob(mock.data), model.log_prob(mock.data))
