"""Shared input checks. Each raises a ValueError/TypeError that names the problem, what was received and
the fix, so the code behind the entry points can trust its inputs."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor


def suggest(value, choices: Iterable[str], n: int = 1) -> str:
    """The "did you mean" hint for a misspelled name: ` (did you mean 'full'?)`, or "" when nothing is close.
    Every error about an unknown name in the project ends with this one hint."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=n)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def check_choice(value: str, choices: Iterable[str], name: str) -> str:
    """Return `value` if it is one of `choices`; otherwise raise with the closest name suggested."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}; got {type(value).__name__}")
    if value in choices:
        return value
    raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}{suggest(value, choices)}")


def check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_float(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0 (0 freezes it); got {value}")
    return value


def as_tensor(data, name: str = "data", dtype: torch.dtype | None = None, device=None) -> Tensor:
    """Turn a tensor or array-like into a floating tensor without copying when it can."""
    if isinstance(data, Tensor):
        x = data
    elif hasattr(data, "columns") and hasattr(data, "dtypes") and hasattr(data, "to_numpy"):
        x = torch.from_numpy(_frame_to_numpy(data, name))
    elif isinstance(data, np.ndarray) or isinstance(data, list | tuple):
        try:
            x = torch.as_tensor(np.asarray(data))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be numeric; could not convert it to a tensor ({err})") from None
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array (or a pandas DataFrame); got {type(data).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}")
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return x.to(dtype=dtype, device=device)


def _frame_to_numpy(frame, name: str) -> np.ndarray:
    """A pandas DataFrame's values (duck-typed: pandas is not imported); non-numeric columns are named."""
    kinds = {str(column): getattr(dtype, "kind", "O") for column, dtype in frame.dtypes.items()}
    bad = [column for column, kind in kinds.items() if kind not in "biuf"]
    if bad:
        raise TypeError(
            f"{name} has non-numeric column(s) {', '.join(map(repr, bad))}; select the numeric ones, "
            f"e.g. df[[{', '.join(repr(c) for c in kinds if c not in bad)}]]"
        )
    dtype = np.float32 if kinds and all(str(d) == "float32" for d in frame.dtypes) else np.float64
    return np.ascontiguousarray(frame.to_numpy(dtype=dtype, na_value=np.nan))


def check_data(
    data,
    *,
    num_dims: int | None = None,
    min_samples: int = 1,
    name: str = "data",
    dtype: torch.dtype | None = None,
    device=None,
) -> Tensor:
    """Validate a (num_samples, num_dims) data matrix and return it as a floating tensor.

    Raises:
        TypeError: not a tensor/array of numbers.
        ValueError: not 2-D, empty, non-finite, too few samples, or the wrong number of dimensions.
    """
    if isinstance(data, Tensor) and data.is_meta:
        check_dtype_device(None, data.device, name)
    x = as_tensor(data, name, dtype=dtype, device=device)
    if x.ndim != 2:
        fix = " Use x[:, None] for 1-D data." if x.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D (num_samples, num_dims); got shape {tuple(x.shape)}.{fix}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}; pass at least one sample and one dimension")
    if num_dims is not None and x.shape[1] != num_dims:
        raise ValueError(
            f"{name} has {x.shape[1]} dimensions but the model has num_dims={num_dims}; "
            f"build the model with num_dims={x.shape[1]} or pass data of shape (N, {num_dims})"
        )
    if x.shape[0] < min_samples:
        raise ValueError(
            f"{name} has {x.shape[0]} samples but the model has {min_samples} components; "
            f"pass at least {min_samples} samples or use fewer components"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains non-finite values (NaN or inf), first at row {bad[0]}, column {bad[1]}; "
            "remove or impute them before fitting"
        )
    return x


FIT_DTYPES = (torch.float32, torch.float64)


def check_dtype_device(dtype: torch.dtype | None, device=None, what: str = "model") -> None:
    """A dtype and device the mixtures can work in: float32 or float64 (torch has no half-precision Cholesky
    on CPU, and half precision cannot hold a collapsing variance), on a device that holds data (not "meta")."""
    if dtype is not None and dtype not in FIT_DTYPES:
        raise ValueError(
            f"{what} dtype {dtype} is not supported; use torch.float32 (the default) or torch.float64 "
            "(convert half-precision data with .float(); it is converted to the model's dtype anyway)"
        )
    if device is not None and torch.device(device).type == "meta":
        raise ValueError(f"{what} device 'meta' holds no data to fit or evaluate; use 'cpu' or 'cuda' (model.to('cpu'))")


def make_generator(seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
    """One CPU generator for every random draw of an operation: the one given, or one seeded by `seed`."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed or generator, not both")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else check_int(seed, "seed", minimum=0))
    return g
