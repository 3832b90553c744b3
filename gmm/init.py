"""Data-driven starting points, shared by gradient descent and EM so both can start from the same place.

| init         | means                                          | covariances                              | weights        |
|--------------|------------------------------------------------|------------------------------------------|----------------|
| `kmeans++`   | k-means (*), best of 10 seedings (**)          | within-cluster scatter, shrunk to `base` | cluster shares |
| `random`     | K distinct data points                         | `base`                                   | equal          |
| `radius`     | uniform in [-radius, radius]^D (the original)  | identity                                 | equal          |
| `keep`       | the model's current parameters                 |                                          |                |

`base` is the data covariance shrunk to one cluster's share of the volume: cov(X) / K^(2/D). It is also
the covariance a collapsed component is reset to.

(*) k-means measures distances in the fit's standardized coordinates (`gmm.standardize`: each axis divided by
its std for full, tied and diagonal, all by one RMS std for the isotropic families), so a column in other
units does not dominate the clustering and the start does not depend on the data's units; the means and
covariances are then those of the clusters in the data's units.
(**) of 10 k-means++ seedings, the partition with the lowest NLL as a full-covariance mixture (`_kmeans_start`;
the first of those within 1e-12 of it, so the same partition under other labels gives the same start on any CPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .model import MixtureModel
from .standardize import Standardizer

INITS: tuple[str, ...] = ("kmeans++", "random", "radius", "keep")
_KMEANS_MAX_SAMPLES = 100_000
_KMEANS_ITERATIONS = 20
_KMEANS_SEEDINGS = 10  # k-means runs from this many k-means++ seedings; the start with the lowest NLL is kept
_JUDGE_TIE = 1e-12  # relative: NLLs of the seedings' starts this close count as equal (the first is kept)


_CHUNK_ROWS = 1 << 16  # rows per float64 block when scanning large data (memory stays O(chunk), not O(N))


def base_covariance(x: Tensor, num_components: int, floor: float) -> Tensor:
    """(D, D) cov(X) / K^(2/D), with its diagonal at least `floor` (float64).

    Accumulated over blocks of rows in float64, so it never holds a float64 copy of the whole data.
    """
    num_samples, num_dims = x.shape
    mean = sum(c.double().sum(0) for c in x.split(_CHUNK_ROWS)) / num_samples
    cov = torch.zeros(num_dims, num_dims, dtype=torch.float64, device=x.device)
    for c in x.split(_CHUNK_ROWS):
        centred = c.double() - mean
        cov += centred.T @ centred
    cov = cov.cpu() / max(1, num_samples - 1)
    cov = cov / num_components ** (2.0 / num_dims)
    # a zero-variance dimension or a single point still gives an SPD matrix; per axis, so that a column in
    # other units neither dominates nor vanishes (the start is the same in any units)
    ridge = (1e-6 * cov.diagonal()).clamp_min(max(floor, 1e-12))
    return cov + torch.diag(ridge)


def kmeans_plus_plus(x: Tensor, num_components: int, g: torch.Generator) -> Tensor:
    """(K, D) seeds: the first uniformly, each next with probability proportional to D(x)^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centers = [x[first]]
    closest = (x - x[first]).square().sum(-1)
    for _ in range(1, num_components):
        total = float(closest.sum())
        if total > 0:
            idx = int(torch.multinomial((closest / total).cpu(), 1, generator=g))
        else:  # all points coincide with a center: any point will do
            idx = int(torch.randint(n, (1,), generator=g))
        centers.append(x[idx])
        closest = torch.minimum(closest, (x - x[idx]).square().sum(-1))
    return torch.stack(centers)


_LLOYD_ELEMENTS = 1 << 23  # runs x N x K distances held at once by `lloyd` (64 MiB in float64)


def lloyd(x: Tensor, seeds: Tensor, iterations: int = _KMEANS_ITERATIONS) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm from R sets of seeds (R, K, D) at once on x (N, D): (centers (R, K, D), labels (R, N)).

    Each run stops at its own convergence (labels unchanged), exactly as it would alone; runs are taken in groups
    whose size depends only on N and K (so a run's numbers do not depend on R), and every op of a group is one
    batched op: about the per-op cost of one run for all of them (the small-problem regime of PERFORMANCE.md).
    """
    group = max(1, _LLOYD_ELEMENTS // max(1, x.shape[0] * seeds.shape[1]))
    out = [_lloyd_group(x, part, iterations) for part in seeds.split(group)]
    return torch.cat([c for c, _ in out]), torch.cat([lab for _, lab in out])


def _lloyd_group(x: Tensor, centers: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    runs, k = centers.shape[0], centers.shape[1]
    xs = x.expand(runs, *x.shape)
    labels = torch.cdist(xs, centers).argmin(-1)  # (R, N)
    running = torch.ones(runs, dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (R, N, K)
        counts = one_hot.sum(1)  # (R, K)
        sums = one_hot.transpose(1, 2) @ xs
        moved = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centers)
        centers = torch.where(running[:, None, None], moved, centers)
        new_labels = torch.cdist(xs, centers).argmin(-1)
        still = running & (new_labels != labels).any(-1)  # a run whose labels did not change has converged
        labels = torch.where(still[:, None], new_labels, labels)
        running = still
        if not bool(running.any()):
            break
    return centers, labels


def scatter_covariances(x: Tensor, resp: Tensor, means: Tensor, base: Tensor, prior: float) -> Tensor:
    """(K, D, D) responsibility-weighted scatter, shrunk toward `base` with `prior` pseudo-samples."""
    counts = resp.sum(0)  # (K,)
    diff = x.unsqueeze(1) - means  # (N, K, D)
    scatter = torch.einsum("nk,nkd,nke->kde", resp, diff, diff)
    return (scatter + prior * base) / (counts + prior)[:, None, None]


def _kmeans_runs(model, x: Tensor, g: torch.Generator) -> tuple[Tensor, Standardizer, tuple[Tensor, Tensor]]:
    """The rows k-means runs on (float64), their standardization, and the `_KMEANS_SEEDINGS` Lloyd runs
    (centers in z, labels) from k-means++ seedings drawn from `g`."""
    xs = x  # k-means runs on at most _KMEANS_MAX_SAMPLES rows, drawn before the float64 copy
    if xs.shape[0] > _KMEANS_MAX_SAMPLES:
        xs = xs[torch.randperm(xs.shape[0], generator=g)[:_KMEANS_MAX_SAMPLES].to(xs.device)]
    xs = xs.double()
    coords = Standardizer.of(xs, model)
    zs = coords.data(xs)
    # every seeding first (the draws from g in the order of one run after the other), then all Lloyd runs at once
    runs = lloyd(zs, torch.stack([kmeans_plus_plus(zs, model.num_components, g) for _ in range(_KMEANS_SEEDINGS)]))
    return xs, coords, runs


def _shared_kmeans_runs(model, x: Tensor, g: torch.Generator, shared: dict | None):
    """`_kmeans_runs`, made once per data tensor, family, K and generator state when `shared` is a dict."""
    if shared is None:
        return _kmeans_runs(model, x, g)
    where = (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride(), model.family.name, model.num_components)
    key = (*where, bytes(g.get_state().numpy()))
    if key not in shared:
        shared[key] = (_kmeans_runs(model, x, g), g.get_state())
    runs, state = shared[key]
    g.set_state(state)
    return runs


def _kmeans_start(model, x: Tensor, base: Tensor, g: torch.Generator, clamp: float, shared: dict | None = None):
    """(means, covariances, weights) of the best of `_KMEANS_SEEDINGS` k-means runs from k-means++ seedings
    (distances in standardized coordinates): the partition whose clusters a full-covariance mixture (their
    scatter matrices, floored at `clamp`) explains best, i.e. with the lowest NLL. Judging every family's
    partitions with the most flexible member keeps, e.g., three overlapping clusters from being covered by
    one wide component of a constrained family (measured at the demo defaults: inertia and the family's own
    NLL each picked such a start for one family of six; this criterion for none)."""
    k, d = model.num_components, model.num_dims
    xs, coords, runs = _shared_kmeans_runs(model, x, g, shared)
    starts = []
    for centers, labels in zip(*runs, strict=True):
        means = centers * coords.scale + coords.shift
        resp = torch.nn.functional.one_hot(labels, k).double()
        covariances = scatter_covariances(xs, resp, means, base.to(xs.device), d + 1.0)
        starts.append((means, covariances, (resp.sum(0) + 1) / (len(xs) + k)))
    # the judge: every start as one member of a batched full mixture, floored at clamp, all NLLs in one pass
    judge = MixtureModel(k, d, "full", dtype=torch.float64, device=xs.device, batch_shape=(len(starts),))
    means, covariances, weights = (torch.stack(part) for part in zip(*starts, strict=True))
    judge.logits.copy_(weights.clamp_min(torch.finfo(torch.float64).tiny).log())
    judge.locs.copy_(means)
    judge.raw_cov.copy_(judge.family.from_covariances(covariances))
    judge.family.clamp_(judge.raw_cov.detach(), clamp)
    return starts[_first_lowest(judge.nll(xs).tolist())]


def _first_lowest(nlls: list[float]) -> int:
    """The first index whose NLL is within _JUDGE_TIE of the lowest (0 when none is finite). Runs that found
    the same partition under other labels score the same NLL up to rounding, which differs between math
    kernels: the tolerance makes the pick the same on every machine."""
    finite = [v for v in nlls if math.isfinite(v)]
    if not finite:
        return 0
    lowest = min(finite)
    return next(i for i, v in enumerate(nlls) if v <= lowest + _JUDGE_TIE * max(1.0, abs(lowest)))


@torch.no_grad()
def initialize(
    model, x: Tensor, method: str, g: torch.Generator, *, clamp: float, init_radius: float | None = None, shared=None
):
    """Set `model`'s parameters from data `x` (N, D) by `method` (one of INITS), drawing from `g`.

    `shared`: a dict kept by the caller across the starts of several models of one family on the same `x`
    tensor (gmm.population's members): k-means runs from the same generator state are made once and reused,
    with `g` left in the state they leave it in, so each start is the one it would be alone. Only the
    partitions are shared; the choice among them depends on each model's `clamp`.
    """
    if method == "keep":
        return
    k, d = model.num_components, model.num_dims
    base = base_covariance(x, k, clamp)
    if method == "kmeans++":
        means, covariances, weights = _kmeans_start(model, x, base, g, clamp, shared)
    elif method == "random":
        idx = torch.randperm(x.shape[0], generator=g)[:k].to(x.device)
        means = x[idx].double()
        covariances = base.expand(k, d, d)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    elif method == "radius":
        r = float(x.abs().max()) if init_radius is None else init_radius
        means = (torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1) * r
        covariances = torch.eye(d, dtype=torch.float64).expand(k, d, d)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    else:
        raise ValueError(f"unknown init {method!r}; choose one of {', '.join(INITS)}")
    model.set_parameters(means=means, covariances=covariances, weights=weights)
