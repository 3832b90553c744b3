"""Covariance families: each one is a small parameterization of the covariances over one raw tensor.

Everything else (likelihood, fit loop, EM, resets) is shared; a family only says how its unconstrained
raw tensor maps to covariances, where the variance floor (the clamp) acts, and how a covariance matrix
maps back to raw values.

| family             | raw shape   | raw holds                                    | covariance          |
|--------------------|-------------|----------------------------------------------|---------------------|
| `full`             | (K, D, D)   | strict lower triangle of L_k, log diag(L_k)  | L_k L_k^T           |
| `tied`             | (1, D, D)   | the same for one shared L                    | L L^T, all k        |
| `diagonal`         | (K, D)      | log variances                                | diag(s2_k1..s2_kD)  |
| `isotropic`        | (K, 1)      | log variance                                 | s2_k I              |
| `shared_isotropic` | (1, 1)      | log variance                                 | s2 I, all k         |
| `constant`         | (1, 1)      | log of the fixed variance (a buffer)         | v I, all k, fixed   |

A batched model (`batch_shape=(B,)`, B independent mixtures) holds raw tensors with a leading B dimension;
`covariance`, `floor_view`, `raw_floor`, `clamp_` and `covariances` work on those unchanged (they only use
the trailing dimensions), while `from_covariances` and `rescale_` take one member's raw at a time.

The clamp: after every optimizer step every diagonal element of every covariance is >= clamp (variance
units). Cholesky families clamp L_kk >= sqrt(clamp) (so Sigma_kk = sum_j L_kj^2 >= clamp); the others
clamp the log variance at log(clamp). One in-place op covers all components. The clamp may also be a (D,)
tensor of per-axis floors (the fit's standardized coordinates, `gmm.standardize`).

Registry: a `Family` subclass that sets its own `name` registers itself when the class is defined (`FAMILIES`
is the registered names in definition order); `get_family(name, num_dims)` builds one. A class that lacks a
required method or sets an invalid attribute raises at definition, naming what is missing. Adding a family
is one class in this module, defined after the six and above the `FAMILIES` line at the end (the order of
`FAMILIES` is kept; the command lines check names against it): its model class,
mock data and analytic gradients come from it (tests/test_families.py defines a throwaway one).

Standardized coordinates: `scaling` says which coordinate scalings z = x / s keep a family's covariances in
the family: "axis" (a scale per axis: S^-1 Sigma S^-1 with S = diag(s) is still a full, tied or diagonal
covariance) or "scalar" (one s for all axes: sigma^2 I stays isotropic). `rescale_` maps raw values to the
scaled coordinates in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .validation import check_choice

_REGISTRY: dict[str, type[Family]] = {}  # name -> class, in definition order
# what every registered family must define itself (the base class only raises NotImplementedError)
_REQUIRED = ("raw_shape", "covariance", "from_covariances", "num_parameters", "rescale_")
SCALINGS = ("axis", "scalar")
# the hand-derived gradient forms of gmm.scratch, by raw layout: "cholesky" (strict lower triangle of L plus
# log diag L, (K', D, D)), "diagonal" (log variances (K', D)), "isotropic" (log variance (K', 1))
ANALYTIC_KINDS = ("cholesky", "diagonal", "isotropic")


class Covariance(NamedTuple):
    """A covariance in the form the likelihood consumes. K' is K, or 1 for shared families."""

    scale_tril: Tensor | None  # (K', D, D) lower Cholesky factor, or None
    variances: Tensor | None  # (K', D) diagonal variances, or None
    half_log_det: Tensor  # (K',) 0.5 * log det(Sigma_k)


class Family:
    """Base class: a parameterization of K covariances of dimension D by one raw tensor.

    A subclass that sets `name` is a family: it registers itself and must define `raw_shape`, `covariance`,
    `from_covariances`, `num_parameters` and `rescale_` (checked when the class is defined). The attributes
    below and `clamp_`, `raw_floor`, `floor_view` and `random_covariances` have defaults; `analytic` opts into
    gmm.scratch's hand-derived gradients for a raw layout it knows.
    """

    name: str = ""  # the registry key, as users write it (`make_model(name, ...)`, `--family name`)
    shared: bool = False  # one covariance for all components (K' = 1)
    cholesky: bool = False  # full matrices through a Cholesky factor, else diagonal variances
    trainable: bool = True
    # raw floor = log(clamp) * floor_scale: log L_kk >= 0.5 log(clamp), log var >= log(clamp)
    floor_scale: float = 1.0
    scaling: str = "axis"  # coordinate scalings that keep the family: "axis" (per axis) or "scalar" (one for all)
    analytic: str | None = None  # gmm.scratch's gradient form (one of ANALYTIC_KINDS); None: autograd only

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete family; helper bases (_Cholesky, ...) set no name of their own
            register(cls)

    def __init__(self, num_dims: int):
        self.num_dims = num_dims

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_dims={self.num_dims})"

    def raw_shape(self, num_components: int, num_dims: int) -> tuple[int, ...]:
        """Shape of the raw tensor of K components in D dimensions (leading K' = K, or 1 when shared)."""
        raise NotImplementedError

    def covariance(self, raw: Tensor) -> Covariance:
        """Raw tensor -> the likelihood's covariance form, differentiable."""
        raise NotImplementedError

    def from_covariances(self, covariances: Tensor, weights: Tensor | None = None) -> Tensor:
        """(K, D, D) SPD matrices -> raw values: the closest member of this family.

        Shared families pool the matrices with `weights` (uniform by default). This projection is also
        the closed-form EM M-step of the family given per-component scatter matrices.
        """
        raise NotImplementedError

    def num_parameters(self, num_components: int, num_dims: int) -> int:
        """Free covariance parameters of K components in D dimensions (for bic/aic)."""
        raise NotImplementedError

    def rescale_(self, raw: Tensor, scale: Tensor) -> Tensor:
        """In place: raw values of Sigma -> raw values of S^-1 Sigma S^-1, S = diag(scale) (D,), the
        covariance in coordinates z = x / scale (`scale` must obey `scaling`). Returns `raw`."""
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------------
    def floor_view(self, raw: Tensor) -> Tensor:
        """The raw entries the clamp acts on, as a (K', m) view into `raw`."""
        return raw

    def raw_floor(self, clamp: float | Tensor) -> float | Tensor:
        """The floor of the entries of `floor_view`: a float for one variance floor `clamp`, a tensor that
        broadcasts against the view for (D,) per-axis floors."""
        if isinstance(clamp, Tensor):
            return clamp.log() * self.floor_scale
        return math.log(clamp) * self.floor_scale

    @torch.no_grad()
    def clamp_(self, raw: Tensor, clamp: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """Raise every floored entry of `raw` to the floor (`clamp`: a float, or (D,) per-axis floors), in place.

        Returns:
            None when nothing was below the floor (the common case: one reduction, no further work), else
            (clamped, smallest): (K',) bool, whether any entry of that covariance was raised, and (K',) the
            smallest ratio variance / floor (or L_kk^2 / floor) before clamping, over the axes.
        """
        view = self.floor_view(raw)
        floor = self.raw_floor(clamp)
        below = view - floor  # (K', m): < 0 where the floor acts
        if not bool(below.amin() < 0):
            return None
        smallest = below.amin(-1)
        view.clamp_(min=floor)
        return smallest < 0, smallest.mul(1.0 / self.floor_scale).exp()

    def num_covariances(self, num_components: int) -> int:
        """K': how many covariances K components hold (1 for shared families)."""
        return 1 if self.shared else num_components

    def random_covariances(
        self, num_components: int, variances: Callable[..., Tensor], generator: torch.Generator
    ) -> Tensor:
        """(K', D, D) float64 random covariances of this family, for mock data (`gmm.data.generate_data`).

        `variances(*shape)` draws float64 variances of that shape (log-uniform in the data's variance range)
        from `generator`, which every other draw uses too. Default: random rotations of drawn variances
        (`random_rotated`) projected onto the family by `from_covariances`; the families below override it
        with draws of their own shape (the seeded mock data of `gmm.FAMILIES` depends on those draws).
        """
        count = self.num_covariances(num_components)
        full = random_rotated(count, self.num_dims, variances, generator)
        return self.covariances(self.from_covariances(full), count)

    def variances_of(self, raw: Tensor) -> Tensor:
        """(K', D) diagonal of each covariance."""
        cov = self.covariance(raw)
        if cov.variances is not None:
            return cov.variances
        return cov.scale_tril.square().sum(-1)

    def covariances(self, raw: Tensor, num_components: int) -> Tensor:
        """(K, D, D) full covariance matrices for every component ((B, K, D, D) for a batched raw)."""
        cov = self.covariance(raw)
        if cov.scale_tril is not None:
            mat = cov.scale_tril @ cov.scale_tril.transpose(-1, -2)
        else:
            mat = torch.diag_embed(cov.variances)
        return mat.expand(*mat.shape[:-3], num_components, -1, -1)


def register(cls: type[Family]) -> type[Family]:
    """Add a family class to the registry under its `name` (done by `Family.__init_subclass__`).

    Raises:
        TypeError: the class lacks a required method (named in the message).
        ValueError: an empty or taken name, or an invalid `scaling` / `analytic`.
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"family class {cls.__name__} needs a lowercase identifier as its name; got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(
            f"family {name!r} is already registered by {_REGISTRY[name].__qualname__}; pick another name for "
            f"{cls.__qualname__} (or gmm.families.unregister({name!r}) first)"
        )
    missing = [method for method in _REQUIRED if getattr(cls, method) is getattr(Family, method)]
    if missing:
        raise TypeError(
            f"family class {cls.__qualname__} ({name!r}) lacks {', '.join(missing)}: every family defines "
            f"{', '.join(_REQUIRED)} (see gmm.families.Family)"
        )
    if cls.scaling not in SCALINGS:
        raise ValueError(f"family {name!r}: scaling must be one of {SCALINGS}; got {cls.scaling!r}")
    if cls.analytic is not None and cls.analytic not in ANALYTIC_KINDS:
        raise ValueError(f"family {name!r}: analytic must be None or one of {ANALYTIC_KINDS}; got {cls.analytic!r}")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> type[Family]:
    """Remove a registered family (for throwaway families in tests); returns its class."""
    return _REGISTRY.pop(check_choice(name, tuple(_REGISTRY), "family"))


def random_rotated(count: int, num_dims: int, variances: Callable[..., Tensor], generator: torch.Generator) -> Tensor:
    """(count, D, D) Q diag(s) Q^T: Q a uniform random rotation (QR of a Gaussian matrix), s = variances(count, D)."""
    q, r = torch.linalg.qr(torch.randn(count, num_dims, num_dims, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # a uniform rotation
    cov = q @ torch.diag_embed(variances(count, num_dims)) @ q.transpose(-1, -2)
    return 0.5 * (cov + cov.transpose(-1, -2))


def pool(covariances: Tensor, weights: Tensor | None) -> Tensor:
    """Weighted mean over components: (K, ...) -> (1, ...)."""
    if weights is None:
        return covariances.mean(0, keepdim=True)
    w = weights / weights.sum()
    return torch.einsum("k,k...->...", w.to(covariances.dtype), covariances).unsqueeze(0)


def _raw_tril(covariances: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(covariances)
    if bool((info != 0).any()):
        raise ValueError(
            "a covariance matrix is not positive definite; increase clamp, use fewer components, or scale the input data"
        )
    return chol.tril(-1) + torch.diag_embed(chol.diagonal(dim1=-2, dim2=-1).log())


def tril_from_raw(raw: Tensor) -> tuple[Tensor, Tensor]:
    """(L, diag L) of raw (K', D, D): the strict lower triangle of raw, exp of its diagonal. No autograd."""
    diag = raw.diagonal(dim1=-2, dim2=-1).exp()  # (K', D)
    tril = raw.tril(-1)
    tril.diagonal(dim1=-2, dim2=-1).copy_(diag)
    return tril, diag


def raw_grad_from_tril(g_tril: Tensor | None, g_half_log_det: Tensor | None, diag: Tensor) -> Tensor:
    """Chain rule through `tril_from_raw` and half_log_det = sum diag(raw): below the diagonal dL passes
    through, on it dL_ii L_ii + d(half_log_det); entries above it get 0."""
    if g_tril is None:
        g_tril = torch.zeros(*diag.shape, diag.shape[-1], dtype=diag.dtype, device=diag.device)
    g = g_tril.tril(-1)
    g_diag = g_tril.diagonal(dim1=-2, dim2=-1) * diag
    if g_half_log_det is not None:
        g_diag = g_diag + g_half_log_det.unsqueeze(-1)
    g.diagonal(dim1=-2, dim2=-1).copy_(g_diag)
    return g


class _RawToTril(torch.autograd.Function):
    """raw (K', D, D) -> (L, 1/2 log det L L^T = sum diag raw) as one autograd node (five separate ops cost
    more than the arithmetic at small sizes); see `raw_grad_from_tril`."""

    @staticmethod
    def forward(ctx, raw: Tensor) -> tuple[Tensor, Tensor]:
        tril, diag = tril_from_raw(raw)
        ctx.save_for_backward(diag)
        return tril, raw.diagonal(dim1=-2, dim2=-1).sum(-1)

    @staticmethod
    def backward(ctx, g_tril: Tensor | None, g_half_log_det: Tensor | None) -> Tensor:
        (diag,) = ctx.saved_tensors
        return raw_grad_from_tril(g_tril, g_half_log_det, diag)


class _Cholesky(Family):
    cholesky = True
    floor_scale = 0.5
    analytic = "cholesky"

    def random_covariances(self, num_components, variances, generator):
        return random_rotated(self.num_covariances(num_components), self.num_dims, variances, generator)

    def covariance(self, raw: Tensor) -> Covariance:
        scale_tril, half_log_det = _RawToTril.apply(raw)
        return Covariance(scale_tril, None, half_log_det)

    def floor_view(self, raw: Tensor) -> Tensor:
        return raw.diagonal(dim1=-2, dim2=-1)

    @torch.no_grad()
    def rescale_(self, raw, scale):
        # L' = S^-1 L: row i of the strict lower triangle / s_i, log L'_ii = log L_ii - log s_i
        diag = raw.diagonal(dim1=-2, dim2=-1)
        log_diag = diag - scale.log()
        raw.div_(scale[:, None])
        diag.copy_(log_diag)
        return raw


class Full(_Cholesky):
    name = "full"

    def raw_shape(self, num_components, num_dims):
        return (num_components, num_dims, num_dims)

    def from_covariances(self, covariances, weights=None):
        return _raw_tril(covariances)

    def num_parameters(self, num_components, num_dims):
        return num_components * num_dims * (num_dims + 1) // 2


class Tied(_Cholesky):
    name = "tied"
    shared = True

    def raw_shape(self, num_components, num_dims):
        return (1, num_dims, num_dims)

    def from_covariances(self, covariances, weights=None):
        return _raw_tril(pool(covariances, weights))

    def num_parameters(self, num_components, num_dims):
        return num_dims * (num_dims + 1) // 2


class _Diagonal(Family):
    analytic = "diagonal"

    def random_covariances(self, num_components, variances, generator):
        return torch.diag_embed(variances(self.num_covariances(num_components), self.num_dims))

    def _log_variances(self, covariances: Tensor) -> Tensor:
        return covariances.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(covariances.dtype).tiny).log()


class Diagonal(_Diagonal):
    name = "diagonal"

    def raw_shape(self, num_components, num_dims):
        return (num_components, num_dims)

    def covariance(self, raw):
        return Covariance(None, raw.exp(), 0.5 * raw.sum(-1))

    @torch.no_grad()
    def rescale_(self, raw, scale):
        return raw.sub_(2.0 * scale.log())

    def from_covariances(self, covariances, weights=None):
        return self._log_variances(covariances)

    def num_parameters(self, num_components, num_dims):
        return num_components * num_dims


class Isotropic(_Diagonal):
    """One variance per component; the raw (K, 1) log variance is broadcast over D."""

    name = "isotropic"
    scaling = "scalar"
    analytic = "isotropic"

    def random_covariances(self, num_components, variances, generator):
        count = self.num_covariances(num_components)
        return variances(count, 1, 1) * torch.eye(self.num_dims, dtype=torch.float64)

    def raw_floor(self, clamp):
        # one variance for all axes: the strictest of per-axis floors (equal under a scalar scaling)
        return super().raw_floor(clamp.amax(-1, keepdim=True) if isinstance(clamp, Tensor) else clamp)

    @torch.no_grad()
    def rescale_(self, raw, scale):
        return raw.sub_(2.0 * scale[:1].log())

    def raw_shape(self, num_components, num_dims):
        return (num_components, 1)

    def covariance(self, raw):
        # `...`: a batched model's raw has a leading batch dimension (B, K, 1)
        variances = raw.exp().expand(*raw.shape[:-1], self.num_dims)
        return Covariance(None, variances, (0.5 * self.num_dims) * raw[..., 0])

    def from_covariances(self, covariances, weights=None):
        mean_var = covariances.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
        return mean_var.clamp_min(torch.finfo(covariances.dtype).tiny).log()

    def num_parameters(self, num_components, num_dims):
        return num_components


class SharedIsotropic(Isotropic):
    name = "shared_isotropic"
    shared = True

    def raw_shape(self, num_components, num_dims):
        return (1, 1)

    def from_covariances(self, covariances, weights=None):
        return super().from_covariances(pool(covariances, weights))

    def num_parameters(self, num_components, num_dims):
        return 1


class Constant(SharedIsotropic):
    """v I for every component with a fixed v: nothing is learned and the clamp does not apply."""

    name = "constant"
    trainable = False

    def num_parameters(self, num_components, num_dims):
        return 0

    def clamp_(self, raw, clamp):
        return None

    def random_covariances(self, num_components, variances, generator):
        # unit variance, as the constant model's default (no draws)
        return torch.eye(self.num_dims, dtype=torch.float64).expand(1, -1, -1)


def names() -> tuple[str, ...]:
    """Every registered family's name in registration order: `FAMILIES`, then any registered after import."""
    return tuple(_REGISTRY)


def family_class(name: str) -> type[Family]:
    """The registered family class called `name`.

    Raises:
        ValueError: unknown name (the closest known name is suggested).
    """
    return _REGISTRY[check_choice(name, tuple(_REGISTRY), "family")]


def get_family(name: str, num_dims: int) -> Family:
    """The family called `name`, ready for data of `num_dims` dimensions.

    Raises:
        ValueError: unknown name (the closest known name is suggested).
    """
    return family_class(name)(num_dims)


# the families defined above, in definition order (the order of seeded data sets, tables and sweeps).
# A new family's class goes ABOVE this line: the command lines and the named datasets read FAMILIES.
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)
