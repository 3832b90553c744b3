"""gmm.sklearn.GaussianMixtureGD against scikit-learn's own estimator checks, Pipeline, GridSearchCV, clone,
and SciPy densities of the fitted parameters."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import gmm
from gmm.sklearn import GaussianMixtureGD


@pytest.fixture(scope="module")
def blobs():
    return gmm.generate_data(300, 3, 2, radius=6.0, family="full", seed=0).data.double().numpy()


def test_passes_scikit_learns_estimator_checks():
    results = check_estimator(GaussianMixtureGD(max_iter=50), on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert not failed, failed
    assert len(results) > 30 and skipped <= {"check_array_api_input"}  # needs SCIPY_ARRAY_API=1 and array-api-strict


def test_methods_agree_with_scipy_on_the_fitted_parameters(blobs):
    est = GaussianMixtureGD(3, max_iter=200, random_state=0).fit(blobs)
    assert est.n_features_in_ == 2 and est.n_iter_ == 200 and est.covariances_.shape == (3, 2, 2)
    density = sum(
        w * multivariate_normal(m, c).pdf(blobs) for w, m, c in zip(est.weights_, est.means_, est.covariances_, strict=True)
    )
    np.testing.assert_allclose(est.score_samples(blobs), np.log(density), rtol=1e-9, atol=1e-9)
    assert est.score(blobs) == pytest.approx(np.log(density).mean(), rel=1e-12)
    assert est.lower_bound_ == pytest.approx(est.score(blobs), rel=1e-9)
    proba = est.predict_proba(blobs)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(est.predict(blobs), proba.argmax(1))
    n, k = blobs.shape[0], 3
    params = (k - 1) + k * 2 + k * 3
    assert est.bic(blobs) == pytest.approx(-2 * n * est.score(blobs) + params * np.log(n), rel=1e-12)
    assert est.aic(blobs) == pytest.approx(-2 * n * est.score(blobs) + 2 * params, rel=1e-12)
    x, labels = est.sample(50)
    assert x.shape == (50, 2) and labels.shape == (50,) and set(labels) <= {0, 1, 2}


def test_clone_pipeline_and_grid_search(blobs):
    est = GaussianMixtureGD(2, covariance_type="diag", max_iter=100, random_state=0)
    assert clone(est).get_params() == est.get_params()
    search = GridSearchCV(make_pipeline(StandardScaler(), est), {"gaussianmixturegd__n_components": [1, 3]}, cv=3).fit(blobs)
    assert search.best_params_ == {"gaussianmixturegd__n_components": 3}  # three separated clusters
    assert search.best_estimator_[-1].model_.family.name == "diagonal"  # scikit-learn's "diag" alias


def test_same_random_state_same_fit(blobs):
    a = GaussianMixtureGD(3, max_iter=30, random_state=5).fit(blobs)
    b = GaussianMixtureGD(3, max_iter=30, random_state=5).fit(blobs)
    np.testing.assert_array_equal(a.means_, b.means_)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"covariance_type": "ful"}, "did you mean 'full'"),
        ({"clamp": 0.0}, "clamp must be > 0"),
        ({"n_components": 0}, ">= 1"),
    ],
)
def test_bad_hyperparameters_raise_at_fit(blobs, params, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixtureGD(**params).fit(blobs)


def test_importing_gmm_does_not_import_sklearn():
    code = "import sys, gmm; assert 'sklearn' not in sys.modules, 'gmm imported sklearn'"
    subprocess.run([sys.executable, "-c", code], check=True)
