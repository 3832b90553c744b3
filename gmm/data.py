"""Seeded mock data: samples from a known mixture of a given covariance family."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .families import get_family
from .validation import check_float, check_int, make_generator


@dataclass(frozen=True)
class MockData:
    """Samples and the mixture that generated them.

    Attributes:
        data: (N, D) float32 samples, shuffled.
        labels: (N,) int64 true component of each sample.
        means: (K, D) true means (float64).
        covariances: (K, D, D) true covariances (float64), all of the requested family.
        weights: (K,) true weights: the fraction of samples drawn from each component.
        family: the family the covariances belong to.
    """

    data: Tensor
    labels: Tensor
    means: Tensor
    covariances: Tensor
    weights: Tensor
    family: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.data)

    def true_model(self, dtype: torch.dtype = torch.float64):
        """A `MixtureModel` holding the generating parameters (for the NLL of the truth)."""
        from .model import MixtureModel

        fixed = not get_family(self.family, self.means.shape[1]).trainable  # `constant`: the variance is an option
        variance = float(self.covariances[0, 0, 0]) if fixed else 1.0
        return MixtureModel.from_parameters(
            self.family, self.means.to(dtype), self.covariances.to(dtype), self.weights.to(dtype), variance=variance
        )


def fingerprint(data) -> str:
    """sha256 of the C-contiguous bytes of `data` with its dtype and shape: equal data, equal print."""
    arr = data.detach().cpu().contiguous().numpy() if isinstance(data, Tensor) else np.ascontiguousarray(data)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _random_covariances(
    family: str, num_components: int, num_dims: int, g: torch.Generator, scale: tuple[float, float]
) -> Tensor:
    """(K, D, D) SPD covariances of `family`, full rank at any D, drawn by the family
    (`Family.random_covariances`) with variances log-uniform in `scale`; shared ones repeated over K."""
    lo, hi = np.log(scale[0]), np.log(scale[1])

    def log_uniform(*shape):
        return torch.exp(lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64))

    cov = get_family(family, num_dims).random_covariances(num_components, log_uniform, g)
    return cov.expand(num_components, -1, -1).clone()


def generate_data(
    num_samples: int,
    num_components: int,
    num_dims: int,
    radius: float = 8.0,
    family: str = "full",
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    variance_range: tuple[float, float] = (0.25, 2.0),
) -> MockData:
    """Draw `num_samples` points from a random mixture of the given covariance family.

    Means are uniform in [-radius, radius]^D; covariances are full rank (see `_random_covariances`) with
    variances in `variance_range`; every requested sample is kept (component sizes differ by at most one,
    the first components taking the remainder). All draws use one CPU generator: `generator`, or one
    seeded with `seed` (default 0), never the global RNG.

    Returns:
        MockData with float32 `data` of shape (num_samples, num_dims).
    """
    num_samples = check_int(num_samples, "num_samples", minimum=1)
    num_components = check_int(num_components, "num_components", minimum=1)
    num_dims = check_int(num_dims, "num_dims", minimum=1)
    radius = check_float(radius, "radius", positive=True)
    get_family(family, num_dims)  # ValueError for an unknown name, with the closest one suggested
    if num_samples < num_components:
        raise ValueError(
            f"num_samples={num_samples} is less than num_components={num_components}; "
            "every component needs at least one sample"
        )
    lo, hi = (check_float(v, "variance_range", positive=True) for v in variance_range)
    if lo > hi:
        raise ValueError(f"variance_range must be (low, high) with low <= high; got {variance_range}")
    g = make_generator(seed, generator)

    means = (torch.rand(num_components, num_dims, generator=g, dtype=torch.float64) * 2 - 1) * radius
    covariances = _random_covariances(family, num_components, num_dims, g, (lo, hi))
    counts = torch.full((num_components,), num_samples // num_components, dtype=torch.long)
    counts[: num_samples % num_components] += 1
    labels = torch.repeat_interleave(torch.arange(num_components), counts)
    chol = torch.linalg.cholesky(covariances)
    noise = torch.randn(num_samples, num_dims, generator=g, dtype=torch.float64)
    # component by component (labels are grouped here): a per-sample gather of (D, D) factors would
    # take N D^2 memory, 2 GB at N = 10^6, D = 16
    samples = torch.cat([means[k] + block @ chol[k].T for k, block in enumerate(noise.split(counts.tolist()))])
    order = torch.randperm(num_samples, generator=g)
    return MockData(
        data=samples[order].to(torch.float32),
        labels=labels[order],
        means=means,
        covariances=covariances,
        weights=counts.double() / num_samples,
        family=family,
    )
