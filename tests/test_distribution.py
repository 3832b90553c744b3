"""MixtureModel.to_distribution / from_distribution against torch.distributions, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

import gmm


def _random_model(family: str, seed: int) -> gmm.MixtureModel:
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 2
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covariances = a @ a.mT + 0.5 * torch.eye(d, dtype=torch.float64)
    weights = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    return gmm.MixtureModel.from_parameters(family, means, covariances, weights)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_log_prob_matches_the_model(family):
    model = _random_model(family, 0)
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    dist = model.to_distribution()
    assert isinstance(dist, MixtureSameFamily) and dist.event_shape == (2,)
    torch.testing.assert_close(dist.log_prob(x), model.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.mean, (model.weights[:, None] * model.means).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_round_trip(family):
    model = _random_model(family, 2)
    back = type(model).from_distribution(model.to_distribution())
    assert back.family.name == family and back.dtype == torch.float64
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(back.log_prob(x), model.log_prob(x), rtol=1e-12, atol=1e-12)


def test_from_a_hand_built_mixture():
    locs = torch.tensor([[0.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    scale_tril = torch.tensor([[[1.0, 0.0], [0.3, 0.5]], [[2.0, 0.0], [-0.4, 1.0]]], dtype=torch.float64)
    dist = MixtureSameFamily(Categorical(probs=torch.tensor([0.3, 0.7])), MultivariateNormal(locs, scale_tril=scale_tril))
    model = gmm.MixtureModel.from_distribution(dist)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert model.family.name == "full"
    torch.testing.assert_close(model.log_prob(x), dist.log_prob(x), rtol=1e-6, atol=1e-6)  # weights were float32
    diag = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Independent(Normal(locs.float(), torch.ones(2, 2)), 1))
    assert gmm.MixtureModel.from_distribution(diag).family.name == "diagonal"


def test_gradients_flow_to_the_parameters():
    model = gmm.make_model("full", 2, 2)
    model.to_distribution().log_prob(torch.randn(5, 2, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert all(p.grad is not None for p in (model.logits, model.locs, model.raw_cov))


def test_bad_input():
    with pytest.raises(TypeError, match="MixtureSameFamily"):
        gmm.MixtureModel.from_distribution(Normal(0.0, 1.0))
    batched = MixtureSameFamily(
        Categorical(logits=torch.zeros(4, 2)), MultivariateNormal(torch.zeros(4, 2, 3), torch.eye(3))
    )
    with pytest.raises(ValueError, match="batch_shape"):
        gmm.MixtureModel.from_distribution(batched)
