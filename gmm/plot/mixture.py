"""The data with the fitted mixture: ellipses, means and density contours (D >= 2), a histogram (D = 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from torch import Tensor

from ..model import MixtureModel
from ..validation import check_data
from .figure import component_colors, finish, target

_GRID_POINTS = 200  # grid points per axis for the density contours (200 x 200 = 40,000 log_prob rows)
_MAX_SCATTER = 20_000  # at most this many data points are drawn (a seeded subsample beyond)
_CONTOUR_RANGE = 10.0  # contours span this many nats below the peak log density
_LEGEND_MAX_COMPONENTS = 10  # list components with their weights in a legend up to this many


# over 60 lines: half of it is the docstring of every argument (the body calls one helper per part)
def plot_data_and_model(
    data,
    model: MixtureModel,
    ax: Axes | None = None,
    *,
    labels=None,
    title: str | None = None,
    sigmas: Sequence[float] = (1.0, 2.0, 3.0),
    contours: bool = True,
    show: bool = False,
) -> Figure:
    """Scatter `data` with each component of `model`: its sigma ellipses, its mean, and the mixture's
    log-density contours.

    Components keep one colour each (see `component_colors`); the opacity of a component's ellipses grows
    with its weight. Points are coloured by `labels`, by default the model's most responsible component.
    For D > 2 everything is projected onto the top-2 principal components of `data` (the title says so);
    for D == 1 a histogram with the mixture density is drawn instead.

    Args:
        data: (N, D) samples (tensor or array).
        model: a `gmm.MixtureModel` with `num_dims == D`; its covariances are read through
            `model.covariances` ((K, D, D) for every family).
        ax: axes to draw on; default a new figure.
        labels: (N,) integer labels colouring the points (e.g. the true labels); default
            `model.predict(data)`.
        title: the title; default names the family, K, D and the NLL. For D > 2 a line naming the
            projection is always added.
        sigmas: the ellipses drawn, in standard deviations (Mahalanobis radius).
        contours: draw log-density contours (evaluated at once on a 200 x 200 grid with `model.log_prob`).
        show: display the figure with pyplot (blocks); default False.

    Returns:
        The figure holding `ax`.

    Raises:
        TypeError: `model` is not a MixtureModel, or `ax` is not an Axes.
        ValueError: `data` is not (N, model.num_dims) finite numbers, or `labels` has the wrong shape.
    """
    x, labels, sigmas = _check_inputs(data, model, labels, sigmas)
    fig, ax = target(ax, show)
    colors = component_colors(model.num_components)
    if title is None:
        title = (
            f"{model.family.name} mixture, K={model.num_components}, D={model.num_dims}: "
            f"NLL {model.nll(x.to(model.dtype)):.4f} nats/sample"
        )
    if model.num_dims == 1:
        _plot_1d(ax, x[:, 0], model, colors)
        ax.set_title(title)
        return finish(fig, show)

    plane = _plane(x, model, title)
    lo, hi = _bounds(plane.xy, plane.means, plane.covs)
    if contours:
        _density_contours(ax, plane.density_model, lo, hi)
    _scatter(ax, plane.xy, labels, colors)
    _ellipses(ax, plane.means, plane.covs, plane.weights, colors, sigmas)
    _means_and_legend(ax, plane.means, plane.weights, colors)
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel=plane.axis_names[0], ylabel=plane.axis_names[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(plane.title, fontsize=10)
    return finish(fig, show)


def _check_inputs(data, model: MixtureModel, labels, sigmas) -> tuple[Tensor, np.ndarray, tuple[float, ...]]:
    """(x (N, D) float64 on the CPU, labels (N,) (default: the model's prediction), sigmas as floats)."""
    if not isinstance(model, MixtureModel):
        raise TypeError(f"model must be a gmm.MixtureModel; got {type(model).__name__}")
    x = check_data(data, num_dims=model.num_dims, dtype=torch.float64).cpu()  # (N, D)
    sigmas = tuple(float(s) for s in sigmas)
    if any(not (s > 0 and math.isfinite(s)) for s in sigmas):
        raise ValueError(f"sigmas must be positive numbers of standard deviations; got {sigmas}")
    if labels is None:
        labels = model.predict(x.to(model.dtype)).cpu()
    return x, _check_labels(labels, x.shape[0]), sigmas


class _Plane(NamedTuple):
    """What is drawn on the 2-D plane: the data and the components in its coordinates."""

    xy: Tensor  # (N, 2) data
    means: Tensor  # (K, 2)
    covs: Tensor  # (K, 2, 2)
    weights: Tensor  # (K,)
    density_model: MixtureModel  # the mixture's density on the plane
    axis_names: tuple[str, str]
    title: str


def _plane(x: Tensor, model: MixtureModel, title: str) -> _Plane:
    """The data (N, D) and the model on their plane: the data's own axes for D == 2, else the top-2 principal
    components of the data (the title then names the projection)."""
    means = model.means.double().cpu()  # (K, D)
    covariances = model.covariances.double().cpu()  # (K, D, D)
    weights = model.weights.double().cpu()  # (K,)
    if model.num_dims == 2:
        return _Plane(x, means, covariances, weights, model, ("x[0]", "x[1]"), title)
    basis, center, explained = _principal_plane(x)  # (D, 2), (D,), (2,)
    xy = (x - center) @ basis  # (N, 2)
    means2 = (means - center) @ basis  # (K, 2)
    covs2 = basis.T @ covariances @ basis  # (K, 2, 2): the covariance of V^T x under component k
    covs2 = 0.5 * (covs2 + covs2.transpose(-1, -2))
    # a linear map of a mixture is the mixture of the mapped components: the exact marginal density
    density_model = MixtureModel.from_parameters("full", means2, covs2, weights)
    axis_names = (f"PC 1 ({100 * explained[0]:.0f}% of variance)", f"PC 2 ({100 * explained[1]:.0f}%)")
    title = (
        f"{title}\nprojected onto the top-2 principal components of the data "
        f"({100 * float(explained.sum()):.0f}% of its variance)"
    )
    return _Plane(xy, means2, covs2, weights, density_model, axis_names, title)


def _means_and_legend(ax: Axes, means: Tensor, weights: Tensor, colors: np.ndarray) -> None:
    """Each mean as a cross in its component's colour; a legend of the weights for up to 10 components."""
    ax.scatter(
        means[:, 0],
        means[:, 1],
        marker="X",
        s=140,
        c=colors,
        edgecolors="black",
        linewidths=1.0,
        zorder=5,
        label="means",
    )
    num_components = means.shape[0]
    if num_components <= _LEGEND_MAX_COMPONENTS:
        handles = [
            Line2D(
                [],
                [],
                color=colors[k],
                marker="X",
                markeredgecolor="black",
                label=f"{k}: w={float(weights[k]):.2f}",
            )
            for k in range(num_components)
        ]
        ax.legend(handles=handles, title="component: weight", fontsize=7, title_fontsize=7, framealpha=0.8)


def _check_labels(labels, num_samples: int) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.shape != (num_samples,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be ({num_samples},) integers, one per sample; got shape {arr.shape}, dtype {arr.dtype}"
        )
    if num_samples and arr.min() < 0:
        raise ValueError(f"labels must be non-negative component indices; got {int(arr.min())}")
    return arr


def _principal_plane(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-2 principal directions of x (N, D): (basis (D, 2), center (D,), explained variance share (2,))."""
    center = x.mean(0)
    _, s, vh = torch.linalg.svd(x - center, full_matrices=False)
    basis = vh[:2].T.clone()  # (D, 2), orthonormal columns
    # fix each direction's sign (the SVD's is arbitrary): its largest entry is positive
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    power = s.square()
    total = float(power.sum())
    explained = power[:2] / total if total > 0 else torch.zeros(2, dtype=x.dtype)
    return basis, center, explained


def _bounds(xy: Tensor, means: Tensor, covs: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Plot limits: the data and every component's 3-sigma box, kept within one data span of the data."""
    std = covs.diagonal(dim1=-2, dim2=-1).sqrt()  # (K, 2)
    data_lo, data_hi = xy.amin(0), xy.amax(0)
    span = (data_hi - data_lo).clamp_min(1e-9)
    lo = torch.minimum(data_lo, (means - 3 * std).amin(0)).clamp_min(data_lo - span)
    hi = torch.maximum(data_hi, (means + 3 * std).amax(0)).clamp_max(data_hi + span)
    pad = 0.05 * (hi - lo).clamp_min(1e-9)
    return (lo - pad).numpy(), (hi + pad).numpy()


def _density_contours(ax: Axes, model: MixtureModel, lo: np.ndarray, hi: np.ndarray) -> None:
    gx = np.linspace(lo[0], hi[0], _GRID_POINTS)
    gy = np.linspace(lo[1], hi[1], _GRID_POINTS)
    mesh_x, mesh_y = np.meshgrid(gx, gy)  # (G, G) each
    grid = torch.from_numpy(np.stack([mesh_x.ravel(), mesh_y.ravel()], axis=1))  # (G*G, 2)
    log_density = model.log_prob(grid.to(model.dtype)).double().cpu().numpy().reshape(mesh_x.shape)
    peak = float(np.max(log_density))
    levels = np.linspace(peak - _CONTOUR_RANGE, peak, 11)[:-1]
    ax.contour(mesh_x, mesh_y, log_density, levels=levels, cmap="Greys", linewidths=0.7, alpha=0.55, zorder=1)


def _scatter(ax: Axes, xy: Tensor, labels: np.ndarray, colors: np.ndarray) -> None:
    n = xy.shape[0]
    idx = np.arange(n)
    if n > _MAX_SCATTER:  # a fixed, seeded subsample: the same figure every time
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(n, generator=g)[:_MAX_SCATTER].sort().values.numpy()
    size = 10.0 if len(idx) <= 2000 else 3.0
    point_colors = colors[labels[idx] % len(colors)] if len(colors) else "tab:gray"
    pts = xy[idx].numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=size, c=point_colors, alpha=0.45, linewidths=0, zorder=2)


def _ellipses(ax, means, covs, weights, colors, sigmas) -> None:
    """Each component's ellipses {x : (x - mu)^T Sigma^-1 (x - mu) = s^2}, opacity growing with weight."""
    vals, vecs = torch.linalg.eigh(covs)  # (K, 2) ascending, (K, 2, 2) columns are eigenvectors
    vals = vals.clamp_min(0.0)
    angles = torch.rad2deg(torch.atan2(vecs[:, 1, 1], vecs[:, 0, 1]))  # direction of the major axis
    rel = weights / weights.max().clamp_min(1e-300)
    for k in range(means.shape[0]):
        alpha = 0.25 + 0.75 * float(rel[k])
        for i, s in enumerate(sigmas):
            ax.add_patch(
                Ellipse(
                    (float(means[k, 0]), float(means[k, 1])),
                    width=2 * s * math.sqrt(float(vals[k, 1])),
                    height=2 * s * math.sqrt(float(vals[k, 0])),
                    angle=float(angles[k]),
                    fill=False,
                    edgecolor=colors[k],
                    linewidth=max(0.6, 2.2 - 0.6 * i),
                    alpha=alpha * (1.0 - 0.2 * i),
                    zorder=3,
                )
            )


def _plot_1d(ax: Axes, x: Tensor, model: MixtureModel, colors: np.ndarray) -> None:
    """Histogram of 1-D data with the mixture density and each weighted component density."""
    values = x.numpy()
    means = model.means.double().cpu()[:, 0]  # (K,)
    stds = model.covariances.double().cpu()[:, 0, 0].sqrt()  # (K,)
    weights = model.weights.double().cpu()
    lo = min(float(values.min()), float((means - 3 * stds).min()))
    hi = max(float(values.max()), float((means + 3 * stds).max()))
    span = float(values.max() - values.min()) or 1.0
    lo, hi = max(lo, float(values.min()) - span), min(hi, float(values.max()) + span)
    bins = int(min(100, max(10, math.sqrt(len(values)))))
    ax.hist(values, bins=bins, density=True, color="0.8", edgecolor="0.6", label="data")
    grid = torch.linspace(lo, hi, 1000, dtype=torch.float64)  # (G,)
    mixture = model.log_prob(grid[:, None].to(model.dtype)).double().exp().cpu()  # (G,)
    z = (grid[:, None] - means) / stds  # (G, K)
    parts = weights * torch.exp(-0.5 * z.square()) / (stds * math.sqrt(2 * math.pi))  # (G, K)
    for k in range(model.num_components):
        ax.plot(
            grid,
            parts[:, k],
            color=colors[k],
            linestyle="--",
            linewidth=1.2,
            label=f"component {k}" if model.num_components <= _LEGEND_MAX_COMPONENTS else None,
        )
        ax.axvline(float(means[k]), color=colors[k], linewidth=0.8, alpha=0.6)
    ax.plot(grid, mixture, color="black", linewidth=2.0, label="mixture density")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
