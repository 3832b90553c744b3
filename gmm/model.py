"""MixtureModel: weight logits, means and one covariance family, with scikit-learn style methods.

Parameters (all unconstrained, so Adam can move them freely):

| name      | shape                          | meaning                                  |
|-----------|--------------------------------|------------------------------------------|
| `logits`  | (K,)                           | mixture weights = softmax(logits)        |
| `locs`    | (K, D)                         | component means                          |
| `raw_cov` | family-specific (families.py)  | covariance parameters (a buffer for `constant`) |

A *batched* model (`batch_shape=(B,)`, as in torch.distributions) holds B independent mixtures of the same
family, K and D: every parameter gets a leading B dimension, `log_prob`, `score`, `predict`, `sample` put
the batch dimension first, and `model.member(i)` is member i as an ordinary (unbatched) model. `fit` runs
all members as one population (gmm.population): one batched Adam step per iteration for all of them.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from . import families, likelihood
from .families import Covariance, Family, family_class, get_family
from .options import FitOptions, fit_keywords, same_options_as
from .validation import check_data, check_dtype_device, check_float, check_int, make_generator

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
        batch_shape: () for one mixture (the default), or (B,) for B independent mixtures (a population).

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
        batch_shape: tuple[int, ...] | torch.Size = (),
    ):
        super().__init__()
        if family is None:
            family = self.family_name
        elif self.family_name is not None and family != self.family_name:
            raise ValueError(f"{type(self).__name__} is the {self.family_name!r} family; got family={family!r}")
        if family is None:
            raise ValueError(f"family is required; choose one of {', '.join(families.names())}")
        check_dtype_device(dtype, device)
        self.num_components = check_int(num_components, "num_components", minimum=1)
        self.num_dims = check_int(num_dims, "num_dims", minimum=1)
        self.variance = check_float(variance, "variance", positive=True)
        self.family: Family = get_family(family, self.num_dims)
        self.batch_shape = _check_batch_shape(batch_shape)
        k, d, b = self.num_components, self.num_dims, self.batch_shape
        self.logits = nn.Parameter(torch.zeros(*b, k, dtype=dtype, device=device))
        self.locs = nn.Parameter(torch.zeros(*b, k, d, dtype=dtype, device=device))
        eye = torch.eye(d, dtype=dtype, device=device).expand(k, d, d)
        if self.family.trainable:
            raw = self.family.from_covariances(eye)
            self.raw_cov = nn.Parameter(raw.expand(*b, *raw.shape).clone())
        else:
            self.register_buffer("raw_cov", torch.full((*b, 1, 1), math.log(self.variance), dtype=dtype, device=device))
        self.fit_result_ = None  # the record of the last fit (gmm.FitResult; gmm.population.PopulationResult when batched)

    # -- populations -------------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        """B for a batched model, 1 for one mixture."""
        return self.batch_shape[0] if self.batch_shape else 1

    def _check_member(self, index: int) -> int:
        if not self.batch_shape:
            raise ValueError("member() needs a batched model (batch_shape=(B,)); this model is one mixture")
        index = check_int(index, "index")
        if not -self.num_members <= index < self.num_members:
            raise IndexError(f"member index {index} is out of range for batch_shape {self.batch_shape}")
        return index % self.num_members

    def member(self, index: int) -> MixtureModel:
        """Member `index` of a batched model as an ordinary (unbatched) model: a copy of its parameters, with
        its fit record (`fit_result_`) when the population was fit."""
        i = self._check_member(index)
        out = type(self)(
            self.num_components, self.num_dims, self.family.name, variance=self.variance, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip
        with torch.no_grad():
            for mine, theirs in zip(parameter_tensors(self), parameter_tensors(out), strict=True):
                theirs.copy_(mine[i])
        if self.fit_result_ is not None and hasattr(self.fit_result_, "members"):
            out.fit_result_ = self.fit_result_.members[i]
        return out

    @torch.no_grad()
    def set_member(self, index: int, model: MixtureModel) -> MixtureModel:
        """Overwrite member `index` with the parameters of an unbatched `model` of the same family, K and D."""
        i = self._check_member(index)
        if model.batch_shape or (model.family.name, model.num_components, model.num_dims) != (
            self.family.name, self.num_components, self.num_dims
        ):  # fmt: skip
            raise ValueError(
                f"set_member needs an unbatched {self.family.name!r} model with K={self.num_components}, "
                f"D={self.num_dims}; got {model!r}"
            )
        for mine, theirs in zip(parameter_tensors(self), parameter_tensors(model), strict=True):
            mine[i].copy_(theirs)
        return self

    # -- parameters --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.locs.dtype

    @property
    def device(self) -> torch.device:
        return self.locs.device

    @property
    def means(self) -> Tensor:
        """(K, D) component means (detached); (B, K, D) when batched."""
        return self.locs.detach()

    @property
    def weights(self) -> Tensor:
        """(K,) mixture weights, summing to 1 (detached); (B, K) when batched."""
        return torch.softmax(self.logits.detach(), -1)

    @property
    def covariances(self) -> Tensor:
        """(K, D, D) full covariance matrices for every family (detached); (B, K, D, D) when batched."""
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
        for shared families); the `constant` family keeps its fixed variance. One mixture only: a batched
        model sets a member with `set_member(i, model)`."""
        if self.batch_shape:
            raise ValueError(
                "set_parameters sets one mixture; on a batched model build the member and use model.set_member(i, member)"
            )
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
    def from_parameters(cls, family: str, means: Tensor, covariances: Tensor, weights: Tensor, **options) -> MixtureModel:
        """A model with the given parameters, e.g. the truth of `generate_data`."""
        means = torch.as_tensor(means)
        model = make_model(family, means.shape[0], means.shape[1], dtype=means.dtype, **options)
        return model.set_parameters(means=means, covariances=covariances, weights=weights)

    # -- densities ---------------------------------------------------------------------------------
    def _check(self, x) -> Tensor:
        if self.batch_shape:  # (N, D) shared by the members, or (B, N, D) one set per member: -> (1 or B, N, D)
            return check_batch_data(x, self.num_members, self.num_dims, self.dtype, self.device, name="X")
        return check_data(x, num_dims=self.num_dims, dtype=self.dtype, device=self.device, name="X")

    def _chunks(self, x: Tensor):
        rows_axis = 1 if self.batch_shape else 0
        step = chunk_rows(self.num_components * self.num_members, self.num_dims)
        for start in range(0, x.shape[rows_axis], step):
            yield x.narrow(rows_axis, start, min(step, x.shape[rows_axis] - start))

    @torch.no_grad()
    def joint_log_prob(self, x) -> Tensor:
        """(N, K) log pi_k + log N(x_n | mu_k, Sigma_k); (B, N, K) when batched."""
        x = self._check(x)
        cov = self.covariance()
        if self.batch_shape:
            parts = [likelihood.batched_joint_log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)]
            return torch.cat(parts, dim=1)
        return torch.cat([likelihood.joint_log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)])

    def forward(self, x) -> Tensor:
        """(N,) log density of each sample, differentiable w.r.t. the parameters (`log_prob` without
        autograd); (B, N) when batched. This is what `mlflow.pytorch`'s served model returns for a batch of rows."""
        x = self._check(x)
        cov = self.covariance()
        if self.batch_shape:
            return torch.cat([likelihood.batched_log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)], 1)
        return torch.cat([likelihood.log_prob(c, self.logits, self.locs, cov) for c in self._chunks(x)])

    @torch.no_grad()
    def log_prob(self, x) -> Tensor:
        """(N,) log density of each sample under the mixture ((B, N) when batched). Evaluated in chunks over N."""
        return self.forward(x)

    score_samples = log_prob

    def score(self, x) -> float | Tensor:
        """Mean log-likelihood per sample (as scikit-learn's `score`); the NLL is its negative. A batched
        model returns (B,) float64, one per member."""
        mean = self.log_prob(x).double().mean(-1)
        return mean if self.batch_shape else float(mean)

    def nll(self, x) -> float | Tensor:
        """Mean negative log-likelihood per sample ((B,) when batched)."""
        return -self.score(x)

    def predict_proba(self, x) -> Tensor:
        """(N, K) responsibilities p(k | x_n); (B, N, K) when batched."""
        return torch.softmax(self.joint_log_prob(x), -1)

    def predict(self, x) -> Tensor:
        """(N,) most responsible component of each sample; (B, N) when batched."""
        return self.joint_log_prob(x).argmax(-1)

    @torch.no_grad()
    def sample(
        self, num_samples: int, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw (samples (N, D), labels (N,)) with a CPU generator (seed 0 unless given). A batched model
        draws (B, N, D) and (B, N): member 0's samples first, then member 1's, ..., from the one generator."""
        num_samples = check_int(num_samples, "num_samples", minimum=1)
        g = make_generator(seed, generator)
        if self.batch_shape:
            draws = [self.member(i).sample(num_samples, generator=g) for i in range(self.num_members)]
            return torch.stack([x for x, _ in draws]), torch.stack([labels for _, labels in draws])
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
        k, d, b = self.num_components, self.num_dims, self.batch_shape
        cov = self.covariance()
        mixture = Categorical(logits=self.logits)  # a batched model gives a batched distribution (batch_shape (B,))
        if cov.scale_tril is not None:
            components = MultivariateNormal(self.locs, scale_tril=cov.scale_tril.expand(*b, k, d, d))
        else:
            components = Independent(Normal(self.locs, cov.variances.sqrt().expand(*b, k, d)), 1)
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
                f"the mixture's components must be MultivariateNormal or Independent(Normal, 1); got {type(comp).__name__}"
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

    def bic(self, x) -> float | Tensor:
        """Bayesian information criterion on `x` (lower is better; (B,) when batched)."""
        n = self._check(x).shape[-2]
        return -2.0 * self.score(x) * n + self.num_parameters() * math.log(n)

    def aic(self, x) -> float | Tensor:
        """Akaike information criterion on `x` (lower is better; (B,) when batched)."""
        n = self._check(x).shape[-2]
        return -2.0 * self.score(x) * n + 2.0 * self.num_parameters()

    # -- fitting -----------------------------------------------------------------------------------
    @same_options_as(fit_keywords)
    def fit(self, data, options: FitOptions | None = None, **overrides) -> float | Tensor:
        """Fit by Adam on the mean NLL (`gmm.fit`); each option is described in `gmm.FitOptions`.

        Args:
            data: (N, D) data; (B, N, D) or (N, D) for a batched model.
            options: a FitOptions to start from; the keywords given override it.
            num_iterations, ..., n_init: the options of `gmm.FitOptions`, with its defaults. For a batched model
                (gmm.population) the options in `gmm.options.PER_MEMBER` (typed `PerMember`) may be sequences
                of B values, one per member.
            An unknown option raises TypeError naming the closest option.

        Returns:
            The final mean NLL on `data` (a float; (B,) for a batched model). The whole record is in
            `self.fit_result_`.
        """
        from .fitting import fit  # noqa: PLC0415  (gmm.fitting imports this module)

        return fit(self, data, options, **overrides).final_nll

    def fit_em(self, data, **options):
        """Fit by expectation-maximization; see `gmm.em.fit_em`. One mixture only."""
        from .em import fit_em

        if self.batch_shape:
            raise ValueError(
                "fit_em fits one mixture; for a batched model fit each member: m = model.member(i); m.fit_em(x); "
                "model.set_member(i, m)"
            )
        return fit_em(self, data, **options).final_nll

    def extra_repr(self) -> str:
        batch = f", batch_shape={self.batch_shape}" if self.batch_shape else ""
        return f"family={self.family.name!r}, num_components={self.num_components}, num_dims={self.num_dims}{batch}"


def parameter_tensors(model: MixtureModel) -> list[Tensor]:
    """The model's parameter tensors (detached aliases): weight logits, means, raw covariance."""
    return [model.logits.detach(), model.locs.detach(), model.raw_cov.detach()]


def _check_batch_shape(batch_shape) -> tuple[int, ...]:
    shape = tuple(batch_shape) if isinstance(batch_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) > 1 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in shape):
        raise ValueError(f"batch_shape must be () for one mixture or (B,) with B >= 1 for B mixtures; got {batch_shape!r}")
    return shape


def check_batch_data(data, num_members: int, num_dims: int, dtype, device, name: str = "data", min_samples: int = 1):
    """(N, D) data shared by B members, or (B, N, D) one data set per member -> (1 or B, N, D), each member's
    data checked like `check_data`."""
    if not isinstance(data, Tensor) and getattr(data, "ndim", None) == 3:  # a (B, N, D) NumPy array
        data = torch.as_tensor(data)
    if isinstance(data, Tensor) and data.ndim == 3:
        if data.shape[0] != num_members:
            raise ValueError(
                f"{name} has {data.shape[0]} data sets (shape {tuple(data.shape)}) but the model has {num_members} "
                f"members; pass (N, D) data shared by all members or ({num_members}, N, D)"
            )
        sets = [check_data(d, num_dims=num_dims, min_samples=min_samples, dtype=dtype, device=device, name=f"{name}[{i}]")
                for i, d in enumerate(data)]  # fmt: skip
        return torch.stack(sets)
    return check_data(data, num_dims=num_dims, min_samples=min_samples, dtype=dtype, device=device, name=name)[None]


def make_model(family: str, num_components: int, num_dims: int, **options) -> MixtureModel:
    """A model of the named family (any registered one, e.g. of `gmm.FAMILIES`; close names are suggested on a
    typo), an instance of its `model_class`. Options: `variance`, `dtype`, `device`, `batch_shape` (see MixtureModel)."""
    return model_class(family)(num_components, num_dims, **options)


def model_class(family: str) -> type[MixtureModel]:
    """The MixtureModel subclass fixed to a registered family: `GmmFull` for "full", `GmmSharedIsotropic` for
    "shared_isotropic", ... Derived from the family registry (`gmm.families`) and cached, so a new family
    gets its class with nothing to write here."""
    return _model_class(family_class(family))


@functools.cache
def _model_class(family: type[Family]) -> type[MixtureModel]:
    name = "Gmm" + "".join(part.capitalize() for part in family.name.split("_"))
    doc = f"A MixtureModel of the {family.name!r} family: `{name}(num_components, num_dims, **options)`."
    return type(name, (MixtureModel,), {"family_name": family.name, "__module__": __name__, "__doc__": doc})


def __getattr__(name: str):
    # `gmm.model.Gmm<Family>` for every registered family, so that pickle (mlflow.pytorch) finds the class
    for family in families.names():
        if model_class(family).__name__ == name:
            return model_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the public names of the six families' classes (the registry does not need them)
GmmFull = model_class("full")
GmmTied = model_class("tied")
GmmDiagonal = model_class("diagonal")
GmmIsotropic = model_class("isotropic")
GmmSharedIsotropic = model_class("shared_isotropic")
GmmConstant = model_class("constant")
