"""gmm.plot: figures render headless for every family and D = 1, 2, 5; the ellipses are the model's
covariances (checked by rebuilding each covariance from its drawn ellipse); the D > 2 projection matches
scikit-learn's PCA; NLL curves mark resets and reference lines."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from sklearn.decomposition import PCA

import gmm
from gmm.plot import (
    FAST_PNG,
    check_figure_path,
    component_colors,
    laid_out,
    make_figure,
    plot_data_and_model,
    plot_nll_curve,
    plot_smallest_variances,
    save_figure,
)
from gmm.records import FitEvent

MIN_PNG_BYTES = 10_000


def _fitted(family: str, num_components: int = 3, num_dims: int = 2, steps: int = 30, seed: int = 0):
    mock = gmm.generate_data(300, num_components, num_dims, radius=6.0, family=family, seed=seed)
    model = gmm.make_model(family, num_components, num_dims)
    result = gmm.fit(model, mock.data, num_iterations=steps, component_lr=5e-2, mixture_lr=5e-2, seed=seed)
    return mock, model, result


def _ellipses(ax) -> list[Ellipse]:
    return [p for p in ax.patches if isinstance(p, Ellipse)]


def _covariance_of(ellipse: Ellipse, sigma: float) -> np.ndarray:
    """The 2x2 covariance whose `sigma` ellipse is `ellipse`: R diag(a^2, b^2) R^T with semi-axes a, b."""
    theta = math.radians(ellipse.angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    semi = np.array([ellipse.width, ellipse.height]) / (2.0 * sigma)
    return rot @ np.diag(semi**2) @ rot.T


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """No test may leave a pyplot-managed figure behind (the plots build Figures without pyplot)."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_every_family_renders_with_its_covariances(family, tmp_path):
    mock, model, _ = _fitted(family)
    fig = plot_data_and_model(mock.data, model)
    assert isinstance(fig, Figure)
    path = save_figure(fig, tmp_path / "fit" / f"{family}.png")  # the parent folder is created
    assert path.stat().st_size > MIN_PNG_BYTES
    ax = fig.axes[0]
    ellipses = _ellipses(ax)
    assert len(ellipses) == 3 * model.num_components  # 1, 2 and 3 sigma per component
    covariances = model.covariances.double().numpy()  # (K, D, D)
    means = model.means.double().numpy()
    for k in range(model.num_components):
        for i, sigma in enumerate((1.0, 2.0, 3.0)):
            e = ellipses[3 * k + i]
            np.testing.assert_allclose(e.center, means[k], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(_covariance_of(e, sigma), covariances[k], rtol=1e-5, atol=1e-6)
    assert ax.get_aspect() == 1.0
    assert family in ax.get_title()


def test_ellipse_axes_are_variances_not_stds():
    """A diagonal component with variances (4, 1) has 1-sigma semi-axes 2 and 1 along x and y."""
    model = gmm.MixtureModel.from_parameters(
        "diagonal",
        means=torch.tensor([[0.0, 0.0], [8.0, 0.0]], dtype=torch.float64),
        covariances=torch.diag_embed(torch.tensor([[4.0, 1.0], [0.25, 9.0]], dtype=torch.float64)),
        weights=torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    x, _ = model.sample(200, seed=0)
    fig = plot_data_and_model(x, model, sigmas=(1.0,))
    first, second = _ellipses(fig.axes[0])
    assert sorted([first.width, first.height]) == pytest.approx([2.0, 4.0])
    assert sorted([second.width, second.height]) == pytest.approx([1.0, 6.0])
    assert math.cos(math.radians(2 * first.angle)) == pytest.approx(1.0)  # axis-aligned


def test_five_dimensions_projects_onto_principal_components(tmp_path):
    mock, model, _ = _fitted("full", num_components=4, num_dims=5)
    fig = plot_data_and_model(mock.data, model)
    assert save_figure(fig, tmp_path / "d5.png").stat().st_size > MIN_PNG_BYTES
    ax = fig.axes[0]
    assert "principal components" in ax.get_title()
    # oracle: scikit-learn's PCA; directions agree up to sign, so compare |coordinates| and eigenvalues
    x = mock.data.double().numpy()
    pca = PCA(n_components=2).fit(x)
    points = _data_offsets(ax, len(x))
    np.testing.assert_allclose(np.abs(points), np.abs(pca.transform(x)), rtol=1e-6, atol=1e-6)
    basis = pca.components_  # (2, D)
    covariances = model.covariances.double().numpy()
    for k, e in enumerate(_ellipses(ax)[::3]):
        expected = np.linalg.eigvalsh(basis @ covariances[k] @ basis.T)
        np.testing.assert_allclose(np.linalg.eigvalsh(_covariance_of(e, 1.0)), expected, rtol=1e-6)


def _data_offsets(ax, num_samples: int) -> np.ndarray:
    (points,) = [c.get_offsets() for c in ax.collections if len(c.get_offsets()) == num_samples]
    return np.asarray(points)


def test_one_dimension_draws_histogram_and_density(tmp_path):
    mock, model, _ = _fitted("isotropic", num_components=2, num_dims=1)
    fig = plot_data_and_model(mock.data, model)
    assert save_figure(fig, tmp_path / "d1.png").stat().st_size > MIN_PNG_BYTES
    ax = fig.axes[0]
    assert len(ax.patches) >= 10  # histogram bars
    (mixture,) = [line for line in ax.lines if line.get_label() == "mixture density"]
    xs, ys = mixture.get_data()
    expected = model.log_prob(torch.as_tensor(xs, dtype=torch.float32)[:, None]).exp().numpy()
    np.testing.assert_allclose(ys, expected, rtol=1e-5)
    assert np.trapezoid(ys, xs) == pytest.approx(1.0, abs=0.02)


def test_many_components_get_distinct_colours(tmp_path):
    for k in (5, 12, 25):
        colours = component_colors(k)
        assert len({tuple(np.round(c, 6)) for c in colours}) == k
    mock, model, _ = _fitted("diagonal", num_components=12, steps=10)
    fig = plot_data_and_model(mock.data, model, labels=mock.labels, title="twelve")
    ax = fig.axes[0]
    edge = {tuple(np.round(e.get_edgecolor()[:3], 6)) for e in _ellipses(ax)}
    assert len(edge) == 12
    assert ax.get_title() == "twelve"


def test_draws_on_given_axes():
    mock, model, result = _fitted("tied")
    fig, (left, right) = make_figure(2)
    assert plot_data_and_model(mock.data, model, ax=left) is fig
    assert plot_nll_curve(result, ax=right) is fig
    assert len(_ellipses(left)) == 9 and len(right.lines) >= 1


def test_bad_inputs_raise_clear_errors():
    mock, model, _ = _fitted("full", steps=5)
    with pytest.raises(TypeError, match="gmm.MixtureModel"):
        plot_data_and_model(mock.data, "not a model")
    with pytest.raises(ValueError, match="dimensions"):
        plot_data_and_model(mock.data[:, :1], model)
    with pytest.raises(ValueError, match="labels must be"):
        plot_data_and_model(mock.data, model, labels=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="sigmas"):
        plot_data_and_model(mock.data, model, sigmas=(1.0, -2.0))
    with pytest.raises(TypeError, match="Axes"):
        plot_data_and_model(mock.data, model, ax="left")
    with pytest.raises(ValueError, match="unknown format 'xyz'"):
        save_figure(Figure(), "plot.xyz")
    with pytest.raises(ValueError, match="no suffix"):
        check_figure_path("plot")
    with pytest.raises(TypeError, match="Figure"):
        save_figure("figure", "plot.png")


# -- NLL curves ---------------------------------------------------------------------------------------------
def _fit_with_reset():
    """A real fit with a collapse, built so it must happen: component 2 starts on two duplicated far points
    with a variance just above the floor; the first step takes it below (mass 2 < D + 1) and it is reset."""
    mock = gmm.generate_data(200, 2, 2, seed=0)
    far = torch.tensor([[30.0, 30.0]])
    x = torch.cat([mock.data, far, far])
    model = gmm.make_model("full", 3, 2)
    covariances = torch.cat([mock.covariances, 1.05e-3 * torch.eye(2).unsqueeze(0)])
    model.set_parameters(means=torch.cat([mock.means, far]), covariances=covariances)
    result = gmm.fit(model, x, num_iterations=20, component_lr=0.1, clamp=1e-3, init="keep", lr_schedule="constant")
    assert (1, 2, "reset") in [(e.step, e.component, e.kind) for e in result.events]
    return result


def _vertical_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.lines if np.ptp(line.get_xdata()) == 0 and len(line.get_xdata()) == 2]


def test_nll_curve_marks_resets_and_references(tmp_path):
    result = _fit_with_reset()
    fig = plot_nll_curve(result, log_x=True, reference={"EM": 3.61, "truth": 3.65})
    assert save_figure(fig, tmp_path / "nll.png").stat().st_size > MIN_PNG_BYTES
    ax = fig.axes[0]
    curve = ax.lines[0]
    np.testing.assert_array_equal(curve.get_ydata(), result.nll_history.numpy())
    np.testing.assert_array_equal(curve.get_xdata(), np.arange(result.num_iterations + 1))
    resets = sorted({e.step for e in result.events if e.kind == "reset"})
    assert sorted(_vertical_lines(ax)) == resets
    horizontal = sorted(line.get_ydata()[0] for line in ax.lines if np.ptp(line.get_ydata()) == 0)
    assert horizontal == [3.61, 3.65]
    labels = ax.get_legend_handles_labels()[1]
    assert "EM: 3.6100" in labels and "truth: 3.6500" in labels and "resets" in labels
    assert ax.get_xscale() == "symlog"


def test_nll_curve_events_only_marks_resets():
    history = torch.linspace(5.0, 3.0, 51, dtype=torch.float64)
    events = (
        FitEvent(10, 1, "reset", "mass 1 < 3"),
        FitEvent(20, 0, "clamp", "variance raised"),
        FitEvent(30, 2, "reset", "mass 0 < 3"),
    )
    ax = plot_nll_curve(history, events).axes[0]
    assert sorted(_vertical_lines(ax)) == [10, 30]
    assert ax.get_xscale() == "linear"


def test_nll_curve_overlays():
    result = _fit_with_reset()
    em_like = [4.0, 3.8, 3.7, 3.65]
    ax = plot_nll_curve({"GD": result, "EM": em_like}).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels[0] == "GD" and "EM" in labels and "resets (GD)" in labels
    ax = plot_nll_curve([result.nll_history, np.array(em_like)]).axes[0]
    assert [line.get_label() for line in ax.lines[:1]] == ["run 0"]
    assert "run 1" in ax.get_legend_handles_labels()[1]


def test_nll_curve_bad_inputs():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plot_nll_curve([])
    with pytest.raises(ValueError, match="dict name -> events"):
        plot_nll_curve({"a": [1.0, 0.5], "b": [2.0, 1.0]}, events=[FitEvent(1, 0, "reset", "")])
    with pytest.raises(TypeError, match="reference"):
        plot_nll_curve([1.0, 0.5], reference="EM")
    with pytest.raises(TypeError, match="history"):
        plot_nll_curve("3.6")


def _two_axes() -> Figure:
    """Two axes with wide tick labels (an NLL of -120000), a legend and a title: what the layout must fit."""
    fig, axes = make_figure(2, figsize=(10.0, 4.4))
    for ax in axes:
        ax.plot([1, 10, 100], [-120000.5, -3.0, 2.0], "o-", label="seed 0")
        ax.set_ylabel("final NLL (nats per sample)")
        ax.legend(fontsize="x-small")
    fig.suptitle("laid out once")
    return fig


def _png(fig, dpi, laid: bool) -> bytes:
    buf = io.BytesIO()
    with laid_out(fig, dpi) if laid else contextlib.nullcontext():
        fig.savefig(buf, format="png", dpi=dpi or "figure")
    return buf.getvalue()


@pytest.mark.parametrize("dpi", [None, 110])
def test_laid_out_saves_the_same_pixels_and_gives_the_layout_back(dpi):
    # laid_out runs the constrained layout once, at the save's dpi, instead of savefig's twice: the bytes of a
    # figure with wide tick labels, a legend and two axes must not change, and the engine comes back after
    fig = _two_axes()
    engine = fig.get_layout_engine()
    assert _png(fig, dpi, laid=True) == _png(_two_axes(), dpi, laid=False)
    assert fig.get_layout_engine() is engine and fig.dpi == 100
    bare = Figure()  # no layout engine: saved as it is
    bare.subplots().plot([0, 1])
    assert _png(bare, dpi, laid=True) == _png(bare, dpi, laid=False)


def test_laid_out_without_a_dpi_lays_out_at_savefig_s_default():
    # MLflow's log_figure saves with no dpi, so at rcParams["savefig.dpi"]: laid_out(fig) must lay out there
    import matplotlib as mpl

    laid, plain = io.BytesIO(), io.BytesIO()
    with mpl.rc_context({"savefig.dpi": 150}):
        fig = _two_axes()
        with laid_out(fig):
            fig.savefig(laid, format="png")
        _two_axes().savefig(plain, format="png")
    assert laid.getvalue() == plain.getvalue()


def test_log_axes_label_their_powers_in_plain_text():
    # the curves' log axes write "10⁻³", not mathtext (which each new figure's renderer parsed again, about 9 ms
    # a label); every other label form keeps matplotlib's own
    from matplotlib.ticker import LogFormatterSciNotation

    from gmm.plot.figure import PlainPowers

    fig = plot_smallest_variances([0, 10, 20], [[1e-4], [3e-3], [2.0]], clamp=1e-4)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert "10⁻³" in labels and "10⁰" in labels and not any("$" in t for t in labels)
    curve = plot_nll_curve([4.0, 3.9, 3.8, 3.7] * 50, log_x=True)
    curve.canvas.draw()
    assert [t.get_text() for t in curve.axes[0].get_xticklabels()][:2] == ["0", "10⁰"]
    # the settings of the formatters it replaces are kept: a symlog axis's unlabelled minor ticks stay unlabelled,
    # and a log axis with subs labels its minor ticks only where matplotlib would
    from matplotlib.ticker import NullFormatter

    from gmm.plot.figure import plain_power_labels

    assert isinstance(curve.axes[0].xaxis.get_minor_formatter(), NullFormatter)
    ax = Figure().subplots()
    ax.set_yscale("log", subs=[2, 5])
    ax.set_ylim(1e-3, 1e2)
    before = ax.yaxis.get_minor_formatter().labelOnlyBase
    plain_power_labels(ax.yaxis)
    assert isinstance(ax.yaxis.get_minor_formatter(), PlainPowers) and ax.yaxis.get_minor_formatter().labelOnlyBase == before
    fmt = PlainPowers(10)
    fig.axes[0].yaxis.set_major_formatter(fmt)
    assert [fmt(v) for v in (1e-12, 1e3, -100.0, 0.0)] == ["10⁻¹²", "10³", "\N{MINUS SIGN}10²", "0"]
    natural, mathtext = PlainPowers(math.e), LogFormatterSciNotation(math.e)
    fig.axes[0].yaxis.set_major_formatter(natural)
    mathtext.axis = fig.axes[0].yaxis
    assert natural(math.e**2) == mathtext(math.e**2) and natural(math.e**2).startswith("$")  # kept as mathtext


def test_fast_png_keeps_the_pixels():
    # the run and report figures are written with zlib level 1 (FAST_PNG): another file, the same image
    from PIL import Image

    default, fast = io.BytesIO(), io.BytesIO()
    _two_axes().savefig(default, format="png")
    _two_axes().savefig(fast, **FAST_PNG)
    assert default.getvalue() != fast.getvalue()
    assert np.array_equal(np.asarray(Image.open(default)), np.asarray(Image.open(fast)))


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_save_figure_writes_what_savefig_writes(tmp_path, monkeypatch, suffix):
    # a vector backend measures text its own way, so save_figure lays a pdf or svg out as savefig does (laid
    # out on Agg, the axes would move by a fraction of a point); a raster one is laid out once, same bytes
    import matplotlib as mpl

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # no date in the file
    with mpl.rc_context({"svg.hashsalt": "gmm"}):
        save_figure(_two_axes(), tmp_path / f"ours.{suffix}")
        _two_axes().savefig(tmp_path / f"plain.{suffix}", dpi=120)
    assert (tmp_path / f"ours.{suffix}").read_bytes() == (tmp_path / f"plain.{suffix}").read_bytes()
