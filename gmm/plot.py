"""Figures of a fitted mixture: the data with each component's ellipses and the mixture density, and
NLL curves. The only module in `gmm` that imports matplotlib.

Every function returns a `matplotlib.figure.Figure` built without pyplot (so it works headless, with
no global figure state), unless `show=True` asks for an interactive window::

    from gmm.plot import plot_data_and_model, plot_nll_curve, save_figure
    fig = plot_data_and_model(mock.data, model)             # D = 1, 2, or a PCA projection for D > 2
    save_figure(fig, "fit.png")
    fig = plot_nll_curve(model.fit_result_, log_x=True, reference={"truth": 3.65})

What is drawn for data of D dimensions:

| D     | drawn                                                                                         |
|-------|-----------------------------------------------------------------------------------------------|
| 1     | histogram of the data, the mixture density and each weighted component density                |
| 2     | data (coloured by most responsible component), 1/2/3-sigma ellipses, log-density contours     |
| > 2   | the same, projected onto the top-2 principal components of the data (named in the title); the |
|       | ellipses are the projected covariances V^T Sigma_k V and the contours the exact marginal      |
|       | density of the mixture on that plane                                                          |
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from torch import Tensor

from .model import MixtureModel
from .validation import check_data

__all__ = [
    "check_figure_path",
    "component_colors",
    "make_figure",
    "plot_data_and_model",
    "plot_nll_curve",
    "save_figure",
]

_GRID_POINTS = 200  # grid points per axis for the density contours (200 x 200 = 40,000 log_prob rows)
_MAX_SCATTER = 20_000  # at most this many data points are drawn (a seeded subsample beyond)
_CONTOUR_RANGE = 10.0  # contours span this many nats below the peak log density
_LEGEND_MAX_COMPONENTS = 10  # list components with their weights in a legend up to this many


# -- figures and colours ------------------------------------------------------------------------------
def make_figure(
    ncols: int = 1, *, figsize: tuple[float, float] | None = None, show: bool = False
) -> tuple[Figure, list[Axes]]:
    """A figure with `ncols` axes side by side.

    Built with `matplotlib.figure.Figure` (no pyplot, no global state, works without a display) unless
    `show` is True, in which case pyplot creates it so that `plt.show()` can display it.

    Returns:
        (figure, list of `ncols` axes).
    """
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer; got {ncols!r}")
    figsize = figsize or (6.4 * ncols, 5.6)
    if show:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, layout="constrained")
    else:
        fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def component_colors(num_components: int) -> np.ndarray:
    """(K, 4) RGBA colours, distinct for any K: tab10 up to 10 components, tab20 up to 20, then
    evenly spaced hues of the `hsv` colormap."""
    if num_components <= 10:
        return np.asarray(colormaps["tab10"].colors)[:num_components]
    if num_components <= 20:
        return np.asarray(colormaps["tab20"].colors)[:num_components]
    return colormaps["hsv"](np.linspace(0.0, 1.0, num_components, endpoint=False))


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write `fig` to `path` (format from the suffix: png, pdf, svg, ...), creating parent folders.

    Returns:
        The path written.

    Raises:
        TypeError: `fig` is not a matplotlib Figure.
        ValueError: the suffix names a format matplotlib cannot write.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure; got {type(fig).__name__}")
    path = check_figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def check_figure_path(path: str | Path) -> Path:
    """`path` as a Path if its suffix names a format matplotlib can write (png, pdf, svg, ...).

    Raises:
        TypeError: `path` is not a string or Path.
        ValueError: no suffix, or an unknown one.
    """
    if not isinstance(path, str | Path):
        raise TypeError(f"path must be a str or pathlib.Path; got {type(path).__name__}")
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(
            f"cannot save a figure as {path.name!r}: unknown format {suffix or '(no suffix)'!r}; "
            f"end the name with one of .{', .'.join(sorted(supported))} (e.g. {path.stem}.png)"
        )
    return path


def _target(ax: Axes | None, show: bool) -> tuple[Figure, Axes]:
    if ax is None:
        fig, (ax,) = make_figure(show=show)
        return fig, ax
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None; got {type(ax).__name__}")
    try:
        fig = ax.get_figure(root=True)  # the top figure when ax sits in a subfigure (matplotlib >= 3.10)
    except TypeError:
        fig = ax.figure
    return fig, ax


def _finish(fig: Figure, show: bool) -> Figure:
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig


# -- data and model ------------------------------------------------------------------------------------
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
    if not isinstance(model, MixtureModel):
        raise TypeError(f"model must be a gmm.MixtureModel; got {type(model).__name__}")
    x = check_data(data, num_dims=model.num_dims, dtype=torch.float64).cpu()  # (N, D)
    sigmas = tuple(float(s) for s in sigmas)
    if any(not (s > 0 and math.isfinite(s)) for s in sigmas):
        raise ValueError(f"sigmas must be positive numbers of standard deviations; got {sigmas}")
    if labels is None:
        labels = model.predict(x.to(model.dtype)).cpu()
    labels = _check_labels(labels, x.shape[0])
    fig, ax = _target(ax, show)
    colors = component_colors(model.num_components)
    if title is None:
        title = (
            f"{model.family.name} mixture, K={model.num_components}, D={model.num_dims}: "
            f"NLL {model.nll(x.to(model.dtype)):.4f} nats/sample"
        )
    if model.num_dims == 1:
        _plot_1d(ax, x[:, 0], model, colors)
        ax.set_title(title)
        return _finish(fig, show)

    means = model.means.double().cpu()  # (K, D)
    covariances = model.covariances.double().cpu()  # (K, D, D)
    weights = model.weights.double().cpu()  # (K,)
    if model.num_dims == 2:
        xy, means2, covs2 = x, means, covariances
        density_model = model
        axis_names = ("x[0]", "x[1]")
    else:
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

    lo, hi = _bounds(xy, means2, covs2)
    if contours:
        _density_contours(ax, density_model, lo, hi)
    _scatter(ax, xy, labels, colors)
    _ellipses(ax, means2, covs2, weights, colors, sigmas)
    ax.scatter(
        means2[:, 0],
        means2[:, 1],
        marker="X",
        s=140,
        c=colors,
        edgecolors="black",
        linewidths=1.0,
        zorder=5,
        label="means",
    )
    if model.num_components <= _LEGEND_MAX_COMPONENTS:
        handles = [
            Line2D(
                [],
                [],
                color=colors[k],
                marker="X",
                markeredgecolor="black",
                label=f"{k}: w={float(weights[k]):.2f}",
            )
            for k in range(model.num_components)
        ]
        ax.legend(handles=handles, title="component: weight", fontsize=7, title_fontsize=7, framealpha=0.8)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize=10)
    return _finish(fig, show)


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


# -- NLL curves -----------------------------------------------------------------------------------------
def plot_nll_curve(
    history,
    events=None,
    ax: Axes | None = None,
    *,
    log_x: bool = False,
    reference: Mapping[str, float] | float | None = None,
    show: bool = False,
) -> Figure:
    """Mean NLL against step, with vertical markers at component resets and optional reference lines.

    Args:
        history: one curve, or several to overlay:
            - a (T + 1,) sequence/tensor/array of NLLs (entry t after t updates, e.g.
              `FitResult.nll_history`), or a `gmm.FitResult` (its history and, when `events` is None,
              its events);
            - a dict name -> one of those, or a list of them (named "run 0", "run 1", ...), or a 2-D array
              (one curve per row).
        events: the fit's events (`FitResult.events`; those with kind == "reset" are marked by dashed
            vertical lines at their step). With several curves: a dict name -> events. FitResults
            carry their own events.
        ax: axes to draw on; default a new figure.
        log_x: symmetric-log x axis (linear in [0, 1], logarithmic beyond, so step 0 stays visible).
        reference: horizontal lines, a dict label -> NLL (e.g. {"EM": 3.61, "truth": 3.65}) or one number.
        show: display the figure with pyplot (blocks); default False.

    Returns:
        The figure holding `ax`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an empty or non 1-D history, or events given as a flat list for several curves.
    """
    curves = _curves(history, events)
    fig, ax = _target(ax, show)
    palette = component_colors(max(1, len(curves)))
    for i, (name, values, evs) in enumerate(curves):
        color = palette[i]
        ax.plot(np.arange(len(values)), values, color=color, linewidth=1.5, label=name)
        resets = sorted({int(e_step) for e_step, kind in evs if kind == "reset"})
        for j, step in enumerate(resets):
            ax.axvline(
                step,
                color=color,
                linestyle="--",
                linewidth=0.8,
                alpha=0.6,
                label=(f"resets ({name})" if name else "resets") if j == 0 else None,
            )
    for j, (name, value) in enumerate(_references(reference).items()):
        ax.axhline(
            value,
            color=("0.2", "0.45", "0.65")[j % 3],
            linestyle=("-.", ":", (0, (5, 1)))[j % 3],
            linewidth=1.2,
            label=f"{name}: {value:.4f}",
        )
    if log_x:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("step (updates)" + (", symmetric log scale" if log_x else ""))
    ax.set_ylabel("mean NLL (nats per sample)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _finish(fig, show)


def _is_fit_result(obj) -> bool:
    from .records import FitResult

    return isinstance(obj, FitResult)


def _history_array(values, name: str) -> np.ndarray:
    if _is_fit_result(values):
        values = values.nll_history
    if isinstance(values, Tensor):
        arr = values.detach().cpu().double().numpy()
    elif isinstance(values, np.ndarray | list | tuple):
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of numbers; could not convert it") from None
    else:
        raise TypeError(f"{name} must be a tensor, array, list of NLLs or a gmm.FitResult; got {type(values).__name__}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of NLLs (T + 1,); got shape {arr.shape}")
    return arr


def _event_pairs(events, name: str) -> list[tuple[int, str]]:
    """(step, kind) of each event: FitEvent objects or dicts with 'step' and 'kind'."""
    if events is None:
        return []
    if not isinstance(events, Iterable) or isinstance(events, str | Mapping):
        raise TypeError(f"events for {name} must be a sequence of FitEvent; got {type(events).__name__}")
    pairs = []
    for e in events:
        if isinstance(e, Mapping):
            pairs.append((int(e["step"]), str(e["kind"])))
        elif hasattr(e, "step") and hasattr(e, "kind"):
            pairs.append((int(e.step), str(e.kind)))
        else:
            raise TypeError(f"events for {name} must be FitEvent objects (step, kind); got {type(e).__name__}")
    return pairs


def _is_single(history) -> bool:
    if _is_fit_result(history):
        return True
    if isinstance(history, Tensor | np.ndarray):
        return history.ndim <= 1
    if isinstance(history, list | tuple):
        return all(isinstance(v, Real) or (isinstance(v, Tensor | np.ndarray) and v.ndim == 0) for v in history)
    return False


def _curves(history, events) -> list[tuple[str | None, np.ndarray, list[tuple[int, str]]]]:
    """Normalize `history`/`events` into [(name, values (T+1,), [(step, kind), ...]), ...]."""
    if _is_single(history):
        evs = events if events is not None else (history.events if _is_fit_result(history) else None)
        return [(None, _history_array(history, "history"), _event_pairs(evs, "history"))]
    if isinstance(history, Mapping):
        named = [(str(k), v) for k, v in history.items()]
    elif isinstance(history, Tensor | np.ndarray):
        named = [(f"run {i}", row) for i, row in enumerate(history)]
    elif isinstance(history, list | tuple):
        named = [(f"run {i}", v) for i, v in enumerate(history)]
    else:
        raise TypeError(
            f"history must be an NLL sequence, a FitResult, or a dict/list of them; got {type(history).__name__}"
        )
    if not named:
        raise ValueError("history is empty; pass at least one NLL curve")
    if events is not None and not isinstance(events, Mapping):
        raise ValueError("with several curves, pass events as a dict name -> events (FitResults carry their own)")
    events = events or {}
    curves = []
    for name, values in named:
        evs = events.get(name, values.events if _is_fit_result(values) else None)
        curves.append((name, _history_array(values, f"history[{name!r}]"), _event_pairs(evs, name)))
    return curves


def _references(reference) -> dict[str, float]:
    if reference is None:
        return {}
    if isinstance(reference, Real) and not isinstance(reference, bool):
        return {"reference": float(reference)}
    if isinstance(reference, Mapping):
        out = {}
        for name, value in reference.items():
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"reference[{name!r}] must be a number (an NLL); got {type(value).__name__}")
            out[str(name)] = float(value)
        return out
    raise TypeError(f"reference must be a number or a dict label -> NLL; got {type(reference).__name__}")


def plot_smallest_variances(
    steps: Sequence[int],
    smallest,
    clamp: float | None = None,
    events=(),
    ax: Axes | None = None,
    *,
    show: bool = False,
) -> Figure:
    """Each component's smallest variance over the steps (log scale): collapse made visible.

    Args:
        steps: (M,) the steps at which the variances were read.
        smallest: (M, K') the smallest diagonal variance of each covariance at those steps (K' = 1 for a
            shared covariance), e.g. `family.variances_of(raw).amin(-1)` read during the fit.
        clamp: the variance floor, drawn as a horizontal line.
        events: the fit's events (`FitResult.events`): clamps are marked by dots on the floor, resets by
            dashed vertical lines, in the component's color.
        ax: axes to draw on; default a new figure.
        show: display the figure with pyplot (blocks); default False.

    Returns:
        The figure holding `ax`.

    Raises:
        ValueError: `smallest` is not (len(steps), K') or holds a non-positive variance.
    """
    values = np.asarray(torch.as_tensor(smallest, dtype=torch.float64).cpu())
    steps = np.asarray(list(steps), dtype=np.int64)
    if values.ndim != 2 or values.shape[0] != steps.shape[0] or values.shape[0] == 0:
        raise ValueError(f"smallest must be (len(steps), K') with len(steps) = {steps.shape[0]} > 0; got {values.shape}")
    if not bool((values > 0).all()):
        raise ValueError("smallest variances must be > 0; pass variances, not log variances")
    fig, ax = _target(ax, show)
    colors = component_colors(values.shape[1])
    for k in range(values.shape[1]):
        label = f"component {k}" if values.shape[1] > 1 else "shared"
        ax.plot(steps, values[:, k], color=colors[k], linewidth=1.4, label=label)
    for kind, marker in (("clamp", "clamp events"), ("reset", "resets")):
        chosen = [(int(e.step), max(int(e.component), 0)) for e in events if e.kind == kind]
        for j, (step, k) in enumerate(chosen):
            color = colors[min(k, len(colors) - 1)]
            label = marker if j == 0 else None
            if kind == "clamp" and clamp is not None:
                ax.plot([step], [clamp], marker="o", markersize=3, color=color, linestyle="none", label=label)
            elif kind == "reset":
                ax.axvline(step, color=color, linestyle="--", linewidth=0.8, alpha=0.7, label=label)
    if clamp is not None:
        ax.axhline(clamp, color="0.2", linestyle=":", linewidth=1.2, label=f"clamp {clamp:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("step (updates)")
    ax.set_ylabel("smallest variance of each component")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, show)
