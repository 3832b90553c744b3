"""The family registry: a new family is one class, and an incomplete one fails at its definition."""

from __future__ import annotations

import pickle

import pytest
import torch

import gmm
from gmm import families
from gmm.families import Diagonal, Family, pool


@pytest.fixture
def tied_diagonal():
    """A throwaway family, one class: diagonal covariances shared by all components (raw (1, D) log variances).
    Registered while the test runs, unregistered after it, so other tests see the six families."""

    class TiedDiagonal(Diagonal):
        """diag(s2_1..s2_D) shared by every component."""

        name = "tied_diagonal"
        shared = True

        def raw_shape(self, num_components, num_dims):
            return (1, num_dims)

        def from_covariances(self, covariances, weights=None):
            return self._log_variances(pool(covariances, weights))

        def num_parameters(self, num_components, num_dims):
            return num_dims

    yield TiedDiagonal.name
    families.unregister(TiedDiagonal.name)


def test_families_are_the_registry_in_definition_order():
    # the six come first, in this order (seeded data and tables depend on it); a family added later follows them
    assert gmm.FAMILIES[:6] == ("full", "tied", "diagonal", "isotropic", "shared_isotropic", "constant")
    assert families.names() == gmm.FAMILIES
    for name in gmm.FAMILIES:
        assert families.family_class(name).name == name
        assert gmm.model.model_class(name).family_name == name
    assert gmm.GmmSharedIsotropic is gmm.model.model_class("shared_isotropic")


def test_a_new_family_is_one_class(tied_diagonal):
    assert tied_diagonal in families.names() and tied_diagonal not in gmm.FAMILIES
    mock = gmm.generate_data(300, 3, 2, 6.0, family=tied_diagonal, seed=1)
    assert torch.equal(mock.covariances[0], mock.covariances[2])
    assert mock.covariances[0].diagonal().min() > 0 and mock.covariances[0].count_nonzero() == 2

    model = gmm.make_model(tied_diagonal, 3, 2, dtype=torch.float64)
    assert type(model).__name__ == "GmmTiedDiagonal" and model.family.name == tied_diagonal
    # mlflow.pytorch pickles the model class by name (this family's own class is local to the test: not picklable)
    assert pickle.loads(pickle.dumps(type(model))) is type(model)
    loss = model.fit(mock.data, num_iterations=20)
    assert loss == pytest.approx(model.nll(mock.data)) and loss < model.fit_result_.nll_history[0]
    cov = model.covariances
    assert torch.equal(cov[0], cov[1]) and cov[0].count_nonzero() == 2
    assert model.num_parameters() == 2 + 3 * 2 + 2

    # log_prob against torch.distributions, and the truth's NLL
    x = mock.data.double()
    torch.testing.assert_close(model.log_prob(x), model.to_distribution().log_prob(x))
    assert mock.true_model().family.name == tied_diagonal and torch.isfinite(torch.tensor(mock.true_model().nll(x)))

    # EM's closed-form M-step is the family's own from_covariances
    em = gmm.make_model(tied_diagonal, 3, 2, dtype=torch.float64)
    assert em.fit_em(mock.data, num_iterations=50, tol=None) < model.fit_result_.nll_history[0]

    # the hand-derived gradients of gmm.scratch do not cover a shared diagonal: a clear error, not a wrong gradient
    with pytest.raises(ValueError, match="'tied_diagonal' family has no hand-derived gradients.*gradients='autograd'"):
        model.fit(mock.data, num_iterations=5, gradients="analytic")


def test_new_family_in_a_population(tied_diagonal):
    mock = gmm.generate_data(200, 2, 2, 6.0, family=tied_diagonal, seed=2)
    population = gmm.make_model(tied_diagonal, 2, 2, batch_shape=(2,), dtype=torch.float64)
    population.fit(mock.data, num_iterations=10, seed=[0, 1])
    member = population.member(1)
    assert member.family.name == tied_diagonal and member.raw_cov.shape == (1, 2)


def test_an_incomplete_family_fails_at_its_definition():
    with pytest.raises(TypeError, match=r"Incomplete.*'incomplete'.* lacks covariance, rescale_"):

        class Incomplete(Family):
            name = "incomplete"

            def raw_shape(self, num_components, num_dims):
                return (num_components, 1)

            def from_covariances(self, covariances, weights=None):
                return covariances.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).log()

            def num_parameters(self, num_components, num_dims):
                return num_components

    assert "incomplete" not in families.names()


@pytest.mark.parametrize(
    ("attributes", "error", "match"),
    [
        ({"name": "full"}, ValueError, "'full' is already registered by Full"),
        ({"name": "Not A Name"}, ValueError, "lowercase identifier"),
        ({"name": "odd", "scaling": "none"}, ValueError, "scaling must be one of"),
        ({"name": "odd", "analytic": "cholesky_ish"}, ValueError, "analytic must be None or one of"),
    ],
)
def test_bad_family_attributes_fail_at_definition(attributes, error, match):
    with pytest.raises(error, match=match):
        type("Bad", (Diagonal,), dict(attributes))
    assert families.names() == gmm.FAMILIES


def test_unknown_family_names_suggest_the_closest():
    with pytest.raises(ValueError, match="unknown family 'diagnal'.*did you mean 'diagonal'"):
        gmm.make_model("diagnal", 2, 2)
    with pytest.raises(ValueError, match="unknown family 'ful'"):
        gmm.generate_data(10, 2, 2, family="ful")


def test_each_module_asks_the_family_object():
    from gmm import scratch

    kinds = {name: scratch._spec(families.get_family(name, 2)).kind for name in gmm.FAMILIES[:6]}
    assert kinds == {
        "full": "cholesky",
        "tied": "cholesky",
        "diagonal": "diagonal",
        "isotropic": "isotropic",
        "shared_isotropic": "isotropic",
        "constant": "isotropic",
    }
    g = torch.Generator().manual_seed(0)
    for name in gmm.FAMILIES:
        family = families.get_family(name, 3)
        cov = family.random_covariances(4, lambda *shape: torch.full(shape, 2.0, dtype=torch.float64), g)
        assert cov.shape == (family.num_covariances(4), 3, 3)
        # the draw is a member of the family: projecting it onto the family changes nothing
        back = family.covariances(family.from_covariances(cov), cov.shape[0]) if family.trainable else cov
        torch.testing.assert_close(back, cov)
