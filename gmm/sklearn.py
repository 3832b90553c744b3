"""A scikit-learn estimator around the gradient-descent mixture: `GaussianMixtureGD`.

    from gmm.sklearn import GaussianMixtureGD
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.model_selection import GridSearchCV

    est = GaussianMixtureGD(n_components=3, covariance_type="full", max_iter=2000, random_state=0).fit(X)
    est.predict(X), est.predict_proba(X), est.score_samples(X), est.score(X), est.bic(X), est.sample(10)
    search = GridSearchCV(make_pipeline(StandardScaler(), GaussianMixtureGD()),
                          {"gaussianmixturegd__n_components": [2, 3, 4]}).fit(X)   # scored by mean log-likelihood

It follows scikit-learn's conventions (the constructor only stores its arguments; `fit(X, y=None)` returns
self; fitted attributes end in `_`; inputs checked with `validate_data`; results are NumPy arrays), so it
works with `clone`, `Pipeline`, `GridSearchCV` and `check_estimator`. The torch model is `model_`
(a `gmm.MixtureModel`: `model_.to_distribution()`, `model_.fit_result_`).

scikit-learn is an optional dependency (`pip install -e ".[sklearn]"`): `import gmm` never imports it, only
`import gmm.sklearn` does.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from .families import FAMILIES
from .init import INITS
from .model import MixtureModel, make_model
from .validation import check_choice, check_float, check_int

__all__ = ["GaussianMixtureGD"]

# scikit-learn's GaussianMixture names for the families that have one
COVARIANCE_ALIASES = {"diag": "diagonal", "spherical": "isotropic"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# the hyperparameters passed on to gmm.fit under the same name
_FIT_PARAMS = ("mixture_lr", "component_lr", "clamp", "init", "tol", "reset")


class GaussianMixtureGD(DensityMixin, BaseEstimator):
    """Gaussian mixture fit by Adam on the mean negative log-likelihood (`gmm.fit`), in scikit-learn's API.

    Args:
        n_components: K, the number of mixture components.
        covariance_type: a family of `gmm.FAMILIES` ("full", "tied", "diagonal", "isotropic",
            "shared_isotropic", "constant"), or scikit-learn's "diag" / "spherical".
        max_iter: Adam steps.
        mixture_lr: Adam learning rate of the weight logits (0 freezes the weights).
        component_lr: Adam learning rate of means and covariance parameters.
        clamp: variance floor, in the data's variance units (scikit-learn's `reg_covar` plays a similar role).
        init: "kmeans++", "random" or "radius".
        tol: stop when the mean NLL changes by less than this in one step; None runs every step.
        reset: reset collapsed components (see `gmm.fit`).
        random_state: int, RandomState or None; it seeds the fit's torch generator (init and resets).
        dtype: "float64" (default, for results that do not depend on batch size to the last bit) or "float32".

    Attributes:
        model_: the fitted `gmm.MixtureModel`.
        weights_ (K,), means_ (K, D), covariances_ (K, D, D): fitted parameters as NumPy arrays (full
            matrices for every covariance type).
        n_iter_: Adam steps run; converged_: `tol` was reached; lower_bound_: final mean log-likelihood
            of the training data; n_features_in_ (and feature_names_in_ for DataFrames).
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        max_iter: int = 2000,
        mixture_lr: float = 1e-2,
        component_lr: float = 1e-2,
        clamp: float = 1e-6,
        init: str = "kmeans++",
        tol: float | None = None,
        reset: bool = True,
        random_state=None,
        dtype: str = "float64",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.mixture_lr = mixture_lr
        self.component_lr = component_lr
        self.clamp = clamp
        self.init = init
        self.tol = tol
        self.reset = reset
        self.random_state = random_state
        self.dtype = dtype

    # -- fitting -------------------------------------------------------------------------------------
    def fit(self, X, y=None) -> GaussianMixtureGD:
        """Fit the mixture to X (n_samples, n_features); `y` is ignored. Returns self."""
        self._check_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=1)
        if X.shape[0] < self.n_components:
            raise ValueError(
                f"n_components={self.n_components} needs at least as many samples; got n_samples={X.shape[0]}. "
                "Pass more samples or lower n_components"
            )
        family = COVARIANCE_ALIASES.get(self.covariance_type, self.covariance_type)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        dtype = _DTYPES[self.dtype]
        model = make_model(family, self.n_components, X.shape[1], dtype=dtype)
        options = {name: getattr(self, name) for name in _FIT_PARAMS}
        result = model.fit(self._tensor(X, dtype), num_iterations=self.max_iter, seed=seed, progress=False, **options)
        record = model.fit_result_
        self.model_: MixtureModel = model
        self.weights_ = model.weights.cpu().numpy()
        self.means_ = model.means.cpu().numpy()
        self.covariances_ = model.covariances.cpu().numpy()
        self.n_iter_ = max(1, record.num_iterations)
        self.converged_ = bool(record.converged)
        self.lower_bound_ = -float(result)
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        """Fit, then the most responsible component of each sample of X."""
        return self.fit(X).predict(X)

    def _check_params(self) -> None:
        """The hyperparameters, checked when `fit` runs (scikit-learn's constructors only store them)."""
        check_int(self.n_components, "n_components", minimum=1)
        check_choice(self.covariance_type, (*FAMILIES, *COVARIANCE_ALIASES), "covariance_type")
        check_int(self.max_iter, "max_iter", minimum=1)
        check_float(self.mixture_lr, "mixture_lr", nonnegative=True)
        check_float(self.component_lr, "component_lr", nonnegative=True)
        check_float(self.clamp, "clamp", positive=True)
        check_choice(self.init, [i for i in INITS if i != "keep"], "init")
        if self.tol is not None:
            check_float(self.tol, "tol", positive=True)
        if not isinstance(self.reset, bool | np.bool_):
            raise TypeError(f"reset must be True or False; got {self.reset!r}")
        check_choice(self.dtype, _DTYPES, "dtype")

    # -- evaluation ----------------------------------------------------------------------------------
    @staticmethod
    def _tensor(X: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(np.asarray(X), dtype=dtype)  # a copy: read-only and memory-mapped inputs are fine

    def _check(self, X) -> torch.Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._tensor(X, self.model_.dtype)

    def score_samples(self, X) -> np.ndarray:
        """(n_samples,) log density of each sample."""
        x = self._check(X)
        return self.model_.log_prob(x).double().numpy()

    def score(self, X, y=None) -> float:
        """Mean log-likelihood per sample (higher is better; GridSearchCV maximizes it)."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X) -> np.ndarray:
        """(n_samples, n_components) responsibilities p(k | x)."""
        x = self._check(X)
        return self.model_.predict_proba(x).double().numpy()

    def predict(self, X) -> np.ndarray:
        """(n_samples,) most responsible component of each sample."""
        x = self._check(X)
        return self.model_.predict(x).numpy()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw (X (n_samples, n_features), component labels (n_samples,)), seeded by `random_state`."""
        check_is_fitted(self)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        x, labels = self.model_.sample(n_samples, seed=seed)
        return x.double().numpy(), labels.numpy()

    def bic(self, X) -> float:
        """Bayesian information criterion on X (lower is better)."""
        x = self._check(X)
        return self.model_.bic(x)

    def aic(self, X) -> float:
        """Akaike information criterion on X (lower is better)."""
        x = self._check(X)
        return self.model_.aic(x)
