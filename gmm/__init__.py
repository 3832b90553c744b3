"""Gaussian mixture models fit by gradient descent (Adam on the mean NLL), six covariance families.

import gmm
mock = gmm.generate_data(1000, 5, 2, radius=8.0, family="full", seed=0)
model = gmm.make_model("full", num_components=5, num_dims=2)
loss = model.fit(mock.data, num_iterations=2000)     # final mean NLL, a float
model.fit_result_                                     # the whole record: history, events, timings
"""

from .data import MockData, fingerprint, generate_data
from .families import FAMILIES
from .fitting import fit
from .init import INITS
from .model import (
    GmmConstant,
    GmmDiagonal,
    GmmFull,
    GmmIsotropic,
    GmmSharedIsotropic,
    GmmTied,
    MixtureModel,
    make_model,
)
from .options import FitOptions
from .records import ConvergenceWarning, FitEvent, FitResult, NonFiniteNLLError

__all__ = [
    "FAMILIES",
    "ConvergenceWarning",
    "INITS",
    "FitEvent",
    "FitOptions",
    "FitResult",
    "GmmConstant",
    "GmmDiagonal",
    "GmmFull",
    "GmmIsotropic",
    "GmmSharedIsotropic",
    "GmmTied",
    "MixtureModel",
    "MockData",
    "NonFiniteNLLError",
    "fingerprint",
    "fit",
    "generate_data",
    "make_model",
]
