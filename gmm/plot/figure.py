"""Figures without pyplot's global state, the component colours, and figure files."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation


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
        FigureCanvasAgg(fig)  # one canvas for the layout and the PNG: its renderer (and text sizes) are reused
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
    # a raster file is laid out once on the Agg canvas (the same pixels); a vector one (pdf, svg) by its own
    # backend's text metrics, as savefig does, which differ from Agg's by a fraction of a point
    raster = path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".raw", ".rgba")
    with laid_out(fig, dpi) if raster else contextlib.nullcontext(fig):
        fig.savefig(path, dpi=dpi)
    return path


# savefig keywords for PNGs written many at a time (a run's figures, a report's): zlib level 1 instead of
# Pillow's default 6. Encoding was a fifth of a run figure's save; level 1 saves about 35 ms a run (three figures)
# for files about 11% larger. The pixels are the same.
FAST_PNG = {"format": "png", "pil_kwargs": {"compress_level": 1}}


@contextlib.contextmanager
def laid_out(fig: Figure, dpi: float | None = None) -> Iterator[Figure]:
    """`fig` laid out once by its layout engine (at `dpi`, the save's; by default savefig's own default,
    rcParams["savefig.dpi"]), the engine held off inside the block and restored after it. savefig runs a
    constrained layout twice (in a first pass that places the axes, then again as it draws); inside the block
    it draws once, on the layout made here: a run's three figures save 15-20% faster (on the Agg canvas
    make_figure gives them). The pixels are the same for raster formats; a vector backend (pdf, svg) measures
    text its own way, so save those without this block (save_figure does)."""
    engine = fig.get_layout_engine()
    if engine is None:
        yield fig
        return
    own_dpi = fig.dpi
    dpi = dpi or mpl.rcParams["savefig.dpi"]  # what savefig draws at when given no dpi
    try:
        fig.dpi = own_dpi if dpi == "figure" else dpi
        engine.execute(fig)
    finally:
        fig.dpi = own_dpi
    fig.set_layout_engine(None)
    try:
        if fig.get_layout_engine() is not None:  # rcParams turn a layout on by default: save as matplotlib does
            fig.set_layout_engine(engine)
        yield fig
    finally:
        fig.set_layout_engine(engine)


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


def target(ax: Axes | None, show: bool) -> tuple[Figure, Axes]:
    """(figure, axes) to draw on: `ax` and its top figure, or a new figure's one axes."""
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


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_MATH_POWER = re.compile(r"^\$\\mathdefault\{(-?)(?:([0-9.]+)\\times)?([0-9]+)(?:\^\{(-?[0-9]+)\})?\}\$$")


class PlainPowers(LogFormatterSciNotation):
    """matplotlib's log-axis labels (10^-3, 2x10^-3, 0 on a symlog axis) in plain Unicode text: "10⁻³", "2×10⁻³".

    The default formatter writes them as mathtext, and each new figure's renderer parses every label again
    (its parser's cache belongs to the renderer): about 9 ms a label, a fifth of a run's three figures. A label
    of another form (a non-integer exponent) keeps its mathtext.
    """

    def __call__(self, x, pos=None) -> str:
        label = super().__call__(x, pos)
        match = _MATH_POWER.match(label)
        if match is None:
            return label
        sign, mantissa, base, exponent = match.groups()
        text = (f"{mantissa}×" if mantissa else "") + base + (exponent.translate(_SUPERSCRIPT) if exponent else "")
        return ("\N{MINUS SIGN}" if sign else "") + text


def plain_power_labels(axis) -> None:
    """Turn the LogFormatterSciNotation labels of a log or symlog `axis` (ax.xaxis, ax.yaxis) into PlainPowers
    with the same settings (base, which ticks are labelled, the symlog threshold); other formatters (a symlog
    axis's unlabelled minor ticks, one the caller set) are left as they are."""
    transform = axis.get_transform()
    base, linthresh = getattr(transform, "base", 10), getattr(transform, "linthresh", None)
    pairs = [(axis.get_major_formatter(), axis.set_major_formatter), (axis.get_minor_formatter(), axis.set_minor_formatter)]
    for fmt, setter in pairs:
        if type(fmt) is LogFormatterSciNotation:
            setter(PlainPowers(base, fmt.labelOnlyBase, fmt.minor_thresholds, linthresh))


def finish(fig: Figure, show: bool) -> Figure:
    """Show `fig` with pyplot when asked (blocks), and return it."""
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig
