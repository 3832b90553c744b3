"""Figures of a fitted mixture: the data with each component's ellipses and the mixture density, and
NLL curves. The only package in `gmm` that imports matplotlib: `figure` (figures, colours, files),
`mixture` (the data with the model) and `curves` (NLL and variance curves); every public name is here.

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

from .curves import plot_nll_curve, plot_smallest_variances
from .figure import FAST_PNG, check_figure_path, component_colors, laid_out, make_figure, save_figure
from .mixture import plot_data_and_model

__all__ = [
    "check_figure_path",
    "component_colors",
    "laid_out",
    "FAST_PNG",
    "make_figure",
    "plot_data_and_model",
    "plot_nll_curve",
    "plot_smallest_variances",
    "save_figure",
]
