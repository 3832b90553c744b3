"""MixtureModel: weight logits, means and one covariance family, with scikit-learn style methods.

Parameters (all unconstrained, so Adam can move them freely):

| name      | shape                          | meaning                                  |
|-----------|--------------------------------|------------------------------------------|
| `logits`  | (K,)                           | mixture weights = softmax(logits)        |
| `locs`    | (K, D)                         | component means                          |
| `raw_cov` | family-specific (families.py)  | covariance parameters (a buffer for `constant`) |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from . import likelihood
from ._validation import check_data, check_dtype_device, check_float, check_int, make_generator
from .families import FAMILIES, Covariance, Family, get_family

# Rows per chunk when evaluating large data: bounds the (chunk, K, D) intermediates to ~2^24 elements.
_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(num_components: int, num_dims: int) -> int:
    return max(1024, _CHUNK_ELEMENTS // max(1, num_components * num_dims))


class MixtureModel(nn.Module):
    """A Gaussian mixture of `num_components` components in `num_dims` dimensions.

    Args:
        num_components: K >= 1.
        num_dims: D >= 1.
        family: one of `gmm.FAMILIES` (subclasses such as `GmmFull` fix it).
        variance: the fixed variance v of the `constant` family (ignored by the others), default 1.0.
        dtype: parameter dtype, default float32.
        device: parameter device, default CPU.

    Starts with means at 0, unit covariances and equal weights; `fit` initializes from the data.
    """

    family_name: str | None = None

    def __init__(
        self,
        num_components: int,
        num_dims: int,
        family: str | None = None,
        *,
        variance: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if family is None:
            family = self.family_name
        elif self.family_name is not None and family != self.family_name:
            raise ValueError(f"{type(self).__name__} is the {self.family_name!r} family; got family={family!r}")
        if family is None:
            raise ValueError(f"family is required; choose one of {', '.join(FAMILIES)}")
        check_dtype_device(dtype, device)
        self.num_components = check_int(num_components, "num_components", minimum=1)
        self.num_dims = check_int(num_dims, "num_dims", minimum=1)
        self.variance = check_float(variance, "variance", positive=True)
        self.family: Family = get_family(family, self.num_dims)
        k, d = self.num_components, self.num_dims
        self.logits = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))
        self.locs = nn.Parameter(torch.zeros(k, d, dtype=dtype, device=device))
        eye = torch.eye(d, dtype=dtype, device=device).expand(k, d, d)
        if self.family.trainable:
            self.raw_cov = nn.Parameter(self.family.from_covariances(eye))
        else:
            self.register_buffer("raw_cov", torch.full((1, 1), math.log(self.variance), dtype=dtype, device=device))
        self.fit_result_ = None  # the record of the last fit (gmm.FitResult)

    # -- parameters --------------------------------------------------------------------------------
    @property
    def family_key(self) -> str:
        return self.family.name

    @property
    def dtype(self) -> torch.dtype:
        return self.locs.dtype

    @property
    def device(self) -> torch.device:
        return self.locs.device

    @property
    def means(self) -> Tensor:
        """(K, D) component means (detached)."""
        return self.locs.detach()

    @property
    def weights(self) -> Tensor:
        """(K,) mixture weights, summing to 1 (detached)."""
        return torch.softmax(self.logits.detach(), -1)

    @property
    def covariances(self) -> Tensor:
        """(K, D, D) full covariance matrices for every family (detached)."""
        with torch.no_grad():
            return self.family.covariances(self.raw_cov, self.num_components).clone()

    def covariance(self) -> Covariance:
        """The covariance in likelihood form, differentiable w.r.t. `raw_cov`."""
        return self.family.covariance(self.raw_cov)

    @torch.no_grad()
    def set_parameters(
        self, means: Tensor | None = None, covariances: Tensor | None = None, weights: Tensor | None = None
    ) -> MixtureModel:
        """Overwrite parameters in place. Covariances are projected onto the family (pooled by weight
        for shared families); the `constant` family keeps its fixed variance."""
        k, d = self.num_components, self.num_dims
        if weights is not None:
            w = torch.as_tensor(weights, dtype=self.dtype, device=self.device)
            if w.shape != (k,) or bool((w < 0).any()) or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-4):
                raise ValueError(f"weights must be ({k},) non-negative and sum to 1; got {w}")
            self.logits.copy_(w.clamp_min(torch.finfo(self.dtype).tiny).log())
        if means is not None:
            m = torch.as_tensor(means, dtype=self.dtype, device=self.device)
            if m.shape != (k, d):
                raise ValueError(f"means must have shape {(k, d)}, got {tuple(m.shape)}")
            self.locs.copy_(m)
        if covariances is not None and self.family.trainable:
            c = torch.as_tensor(covariances, dtype=self.dtype, device=self.device)
            if c.shape != (k, d, d):
                raise ValueError(f"covariances must have shape {(k, d, d)}, got {tuple(c.shape)}")
            self.raw_cov.copy_(self.family.from_covariances(c, self.weights))
        return self

    @classmethod
    def from_parameters(
        cls, family: str, means: Tensor, covariances: Tensor, weights: Tensor, **options
    ) -> MixtureModel:
        """A model with the given parameters, e.g. the truth of `generate_data`."""
        means = torch.as_tensor(means)
        model = make_model(family, means.shape[0], means.shape[1], dtype=means.dtype, **options)
        return model.set_parameters(means=means, covariances=covariances, weights=weights)

    # -- densities ---------------------------------------------------------------------------------
    def _check(self, x) -> Tensor:
        return check_data(x, num_dims=self.num_dims, dtype=self.dtype, device=self.device, name="X")

    def _chunks(self, x: Tensor):
        step = chunk_rows(self.num_components, self.num_dims)
        for start in range(0, x.shape[0], step):
            yield x[start : start + step]

    @torch.no_grad()
    def joint_log_prob(self, x) -> Tensor:
        """(N, K) log pi_k + log N(x_n | mu_k, Sigma_k)."""
        x = self._check(x)
        cov = self.covariance()
        return torch.cat([likelihood.joint_log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)])

    def forward(self, x) -> Tensor:
        """(N,) log density of each sample, differentiable w.r.t. the parameters (`log_prob` without
        autograd). This is what `mlflow.pytorch`'s served model returns for a batch of rows."""
        x = self._check(x)
        cov = self.covariance()
        return torch.cat([likelihood.log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)])

    @torch.no_grad()
    def log_prob(self, x) -> Tensor:
        """(N,) log density of each sample under the mixture. Evaluated in chunks over N."""
        return self.forward(x)

    score_samples = log_prob

    def score(self, x) -> float:
        """Mean log-likelihood per sample (as scikit-learn's `score`); the NLL is its negative."""
        return float(self.log_prob(x).double().mean())

    def nll(self, x) -> float:
        """Mean negative log-likelihood per sample."""
        return -self.score(x)

    def predict_proba(self, x) -> Tensor:
        """(N, K) responsibilities p(k | x_n)."""
        return torch.softmax(self.joint_log_prob(x), -1)

    def predict(self, x) -> Tensor:
        """(N,) most responsible component of each sample."""
        return self.joint_log_prob(x).argmax(-1)

    @torch.no_grad()
    def sample(
        self, num_samples: int, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw (samples (N, D), labels (N,)) with a CPU generator (seed 0 unless given)."""
        num_samples = check_int(num_samples, "num_samples", minimum=1)
        g = make_generator(seed, generator)
        weights = self.weights.cpu().double()
        labels = torch.multinomial(weights, num_samples, replacement=True, generator=g)
        noise = torch.randn(num_samples, self.num_dims, generator=g, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covariances.cpu().double())  # (K, D, D)
        x = self.means.cpu().double()[labels] + (chol[labels] @ noise.unsqueeze(-1)).squeeze(-1)
        return x.to(self.dtype).to(self.device), labels.to(self.device)

    # -- torch.distributions -----------------------------------------------------------------------
    def to_distribution(self) -> MixtureSameFamily:
        """The same mixture as a `torch.distributions.MixtureSameFamily` (differentiable w.r.t. the parameters).

        Components are `MultivariateNormal(loc, scale_tril=L_k)` for the Cholesky families (`full`, `tied`)
        and `Independent(Normal(loc, std), 1)` for the diagonal ones; its `log_prob` equals `log_prob` up to
        rounding. Shared covariances are expanded to K components.
        """
        k = self.num_components
        cov = self.covariance()
        mixture = Categorical(logits=self.logits)
        if cov.scale_tril is not None:
            components = MultivariateNormal(self.locs, scale_tril=cov.scale_tril.expand(k, -1, -1))
        else:
            components = Independent(Normal(self.locs, cov.variances.sqrt().expand(k, -1)), 1)
        return MixtureSameFamily(mixture, components)

    @classmethod
    def from_distribution(cls, distribution: MixtureSameFamily, family: str | None = None, **options) -> MixtureModel:
        """A model holding the parameters of a `MixtureSameFamily` of Gaussians (the inverse of `to_distribution`).

        Args:
            distribution: a MixtureSameFamily, unbatched, whose components are `MultivariateNormal` or
                `Independent(Normal, 1)`.
            family: the model's family; default `full` for MultivariateNormal components, `diagonal` for
                Independent Normals (a subclass such as GmmTied fixes it). Covariances are projected onto it.
            options: `variance`, `dtype`, `device` of the model (dtype defaults to the distribution's).

        Raises:
            TypeError: another distribution, or other component distributions.
            ValueError: a batched mixture.
        """
        if not isinstance(distribution, MixtureSameFamily):
            raise TypeError(
                f"distribution must be a torch.distributions.MixtureSameFamily; got {type(distribution).__name__}"
            )
        if distribution.batch_shape != ():
            raise ValueError(
                f"distribution must be one mixture (batch_shape ()); got batch_shape {tuple(distribution.batch_shape)}. "
                "Index it first, e.g. dist[0]"
            )
        comp = distribution.component_distribution
        if isinstance(comp, MultivariateNormal):
            covariances, default = comp.covariance_matrix, "full"
        elif isinstance(comp, Independent) and isinstance(comp.base_dist, Normal) and comp.reinterpreted_batch_ndims == 1:
            covariances, default = torch.diag_embed(comp.base_dist.scale.square()), "diagonal"
        else:
            raise TypeError(
                "the mixture's components must be MultivariateNormal or Independent(Normal, 1); "
                f"got {type(comp).__name__}"
            )
        family = family or cls.family_name or default
        dtype = options.pop("dtype", comp.mean.dtype)
        weights = distribution.mixture_distribution.probs.detach().to(dtype)
        means, covariances = comp.mean.detach().to(dtype), covariances.detach().to(dtype)
        return cls.from_parameters(family, means, covariances, weights / weights.sum(), **options)

    # -- model selection ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        k, d = self.num_components, self.num_dims
        return (k - 1) + k * d + self.family.num_parameters(k, d)

    def bic(self, x) -> float:
        """Bayesian information criterion on `x` (lower is better)."""
        n = self._check(x).shape[0]
        return -2.0 * self.score(x) * n + self.num_parameters() * math.log(n)

    def aic(self, x) -> float:
        """Akaike information criterion on `x` (lower is better)."""
        n = self._check(x).shape[0]
        return -2.0 * self.score(x) * n + 2.0 * self.num_parameters()

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, data, **options) -> float:
        """Fit by Adam on the mean NLL; see `gmm.fit.FitOptions` for every option and its default.

        Returns:
            The final mean NLL on `data` (a float). The whole record is in `self.fit_result_`.
        """
        from .fit import fit

        return fit(self, data, **options).final_nll

    def fit_em(self, data, **options):
        """Fit by expectation-maximization; see `gmm.em.fit_em`."""
        from .em import fit_em

        return fit_em(self, data, **options).final_nll

    def extra_repr(self) -> str:
        return f"family={self.family.name!r}, num_components={self.num_components}, num_dims={self.num_dims}"


def make_model(family: str, num_components: int, num_dims: int, **options) -> MixtureModel:
    """A model of the named family (one of `gmm.FAMILIES`; close names are suggested on a typo)."""
    get_family(family, 1)  # validates the name with a suggestion
    return _CLASSES[family](num_components, num_dims, **options)


class GmmFull(MixtureModel):
    family_name = "full"


class GmmTied(MixtureModel):
    family_name = "tied"


class GmmDiagonal(MixtureModel):
    family_name = "diagonal"


class GmmIsotropic(MixtureModel):
    family_name = "isotropic"


class GmmSharedIsotropic(MixtureModel):
    family_name = "shared_isotropic"


class GmmConstant(MixtureModel):
    family_name = "constant"


_CLASSES: dict[str, type[MixtureModel]] = {
    "full": GmmFull,
    "tied": GmmTied,
    "diagonal": GmmDiagonal,
    "isotropic": GmmIsotropic,
    "shared_isotropic": GmmSharedIsotropic,
    "constant": GmmConstant,
}
