"""The options of `gmm.fit`: the `FitOptions` record (their one list of defaults), their checks, the options a
population takes per member, and what they decide (learning-rate schedule, the quadratic path, the intra-op
thread count, the progress bar).

`gmm.fit` and `MixtureModel.fit` list every option as a keyword with its type and `FitOptions`' default (one
list, `fit_keywords`, given to both by `same_options_as`); tests/test_fit.py checks both against `FitOptions`."""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar

import numpy as np
import torch
from torch import Tensor

from .validation import check_choice, check_dtype_device, check_float, check_int, suggest

SCHEDULES = ("cosine", "constant")
GRADIENTS = ("autograd", "analytic")
_ONE_THREAD_MAX_ELEMENTS = 1 << 19  # auto num_threads: below this N * K * D one thread beats two (bench)
_QUADRATIC_MIN_ELEMENTS = 1 << 20  # auto: quadratic path once N * K * D reaches this (float32 caveat: likelihood.py)
T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")
PerMember: TypeAlias = T | Sequence[T]  # one value, or (a batched model, PER_MEMBER options) B values, one per member


# options that may differ between members (a scalar for all, or a sequence of B values)
PER_MEMBER = (
    "mixture_lr",
    "component_lr",
    "clamp",
    "seed",
    "init",
    "init_radius",
    "reset",
    "reset_min_mass",
    "lr_schedule",
    "tol",
    "standardize",
    "keep_best",
    "spike_threshold",
    "spike_rollback",
)
_UNSUPPORTED = {  # option: (value that is fine, what to do instead)
    "batch_size": (None, "mini-batches are not batched yet: fit the members one by one (model.member(i).fit)"),
    "gradients": ("autograd", "analytic gradients are not batched yet: use gradients='autograd'"),
    "compile": (False, "compiled steps are not batched yet: drop compile=True"),
    "quadratic": (None, "the quadratic path is not batched: drop quadratic=True"),
    "n_init": (1, "a population already holds the starts: use one member per start (seed=[s, s + 1, ...])"),
    "generator": (None, "pass per-member seeds (seed=[...]) instead of a generator"),
}


@dataclass(frozen=True)
class FitOptions:
    """Options of `fit`, with their defaults. Pass any of them as keywords to `model.fit`."""

    num_iterations: int = 1000  # Adam steps
    mixture_lr: float = 1e-2  # Adam lr of the weight logits; 0 freezes the weights
    component_lr: float = 1e-2  # Adam lr of means and covariance parameters; 0 freezes them
    clamp: float = 1e-6  # variance floor, in variance units (not std), for every covariance diagonal
    init: str = "kmeans++"  # "kmeans++", "random", "radius" (uniform in +-radius) or "keep"
    init_radius: float | None = None  # half-width for init="radius"; default max |x|
    reset: bool = True  # reset collapsed components (see module docstring)
    reset_min_mass: float | None = None  # collapse threshold on responsibility mass; default D + 1
    lr_schedule: str = "cosine"  # "cosine" annealing to 0 over the fit, or "constant"
    seed: int | None = 0  # seeds the fit's generator (init and resets), unless `generator` is given
    generator: torch.Generator | None = None
    tol: float | None = None  # stop when |NLL[t] - NLL[t-1]| < tol; off by default
    log_freq: int | None = None  # steps between callback calls and log lines; default T // 100
    callback: Callable[[int, float, list], None] | None = None  # callback(step, nll, new_events)
    gradients: str = "autograd"  # "autograd" or "analytic" (hand-derived, gmm.scratch)
    compile: bool = False  # torch.compile the step (cold compile: seconds, reported apart); eager on failure
    quadratic: bool | None = None  # quadratic-expansion likelihood; None = auto (large N*K*D)
    batch_size: int | None = None  # mini-batch size; None = full batch
    device: str | torch.device | None = None  # default: the model's
    dtype: torch.dtype | None = None  # default: the model's
    progress: bool | None = None  # tqdm bar; None = only on a terminal and for long fits
    num_threads: int | None = None  # torch intra-op threads during the fit; None: 1 for small CPU problems
    standardize: bool = True  # fit in standardized coordinates (gmm.standardize): learning rates per data std
    keep_best: bool = True  # return, and leave in the model, the parameters with the lowest NLL seen
    spike_threshold: float | None = 1.0  # an NLL rise above this (nats per sample) in one step is a spike
    spike_rollback: bool = True  # on a spike: back to the best iterate, Adam restarted, learning rates halved
    n_init: int = 1  # starts (seeds seed, seed + 1, ...); the start with the lowest final NLL is kept


def make_options(options: FitOptions | None = None, **overrides) -> FitOptions:
    """FitOptions from defaults (or `options`) and keyword overrides, validated. Unknown keys raise."""
    base = options if options is not None else FitOptions()
    names = {f.name for f in dataclasses.fields(FitOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        hint = "".join(suggest(u, names) for u in unknown)
        raise TypeError(f"unknown fit option(s) {', '.join(unknown)}{hint}; see gmm.FitOptions")
    opts = dataclasses.replace(base, **overrides)
    both_given = overrides.get("generator") is not None and overrides.get("seed") is not None
    if opts.generator is not None and (both_given or opts.seed not in (None, FitOptions.seed)):
        raise ValueError(
            "pass seed or generator, not both: the generator's state would decide and the seed be ignored; "
            "drop seed=, or pass generator=torch.Generator().manual_seed(seed)"
        )
    check_int(opts.num_iterations, "num_iterations", minimum=1)
    check_dtype_device(opts.dtype, opts.device, "fit")
    check_float(opts.mixture_lr, "mixture_lr", nonnegative=True)
    check_float(opts.component_lr, "component_lr", nonnegative=True)
    check_float(opts.clamp, "clamp", positive=True)
    from .init import INITS  # noqa: PLC0415  (gmm.init imports gmm.model, which imports this module)

    check_choice(opts.init, INITS, "init")
    check_choice(opts.lr_schedule, SCHEDULES, "lr_schedule")
    check_choice(opts.gradients, GRADIENTS, "gradients")
    if opts.init_radius is not None:
        check_float(opts.init_radius, "init_radius", positive=True)
    if opts.reset_min_mass is not None:
        check_float(opts.reset_min_mass, "reset_min_mass", nonnegative=True)
    if opts.tol is not None:
        check_float(opts.tol, "tol", positive=True)
    if opts.log_freq is not None:
        check_int(opts.log_freq, "log_freq", minimum=1)
    if opts.batch_size is not None:
        check_int(opts.batch_size, "batch_size", minimum=1)
    if opts.num_threads is not None:
        check_int(opts.num_threads, "num_threads", minimum=1)
    if opts.spike_threshold is not None:
        check_float(opts.spike_threshold, "spike_threshold", positive=True)
    check_int(opts.n_init, "n_init", minimum=1)
    if opts.n_init > 1 and opts.init == "keep":
        raise ValueError("n_init > 1 needs a drawn start; init='keep' would repeat one start: use n_init=1")
    if opts.callback is not None and not callable(opts.callback):
        raise TypeError(f"callback must be callable; got {type(opts.callback).__name__}")
    return opts


def member_options(num_members: int, options: FitOptions | None, overrides: dict) -> list[FitOptions]:
    """One validated FitOptions per member: `PER_MEMBER` overrides may be sequences of `num_members` values."""
    per: dict[str, list] = {}
    for name, value in overrides.items():
        if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 1 or isinstance(value, (list, tuple)):
            if name in _UNSUPPORTED:
                raise ValueError(f"{name} is not supported for a batched model; {_UNSUPPORTED[name][1]}")
            if name not in PER_MEMBER:
                raise ValueError(
                    f"{name} is shared by every member of a population; pass one value (options that may differ "
                    f"per member: {', '.join(PER_MEMBER)})"
                )
            values = value.tolist() if isinstance(value, (Tensor, np.ndarray)) else list(value)
            if len(values) != num_members:
                raise ValueError(
                    f"{name} has {len(values)} values but the model has {num_members} members; pass one or {num_members}"
                )
            per[name] = values
    out = []
    for i in range(num_members):
        opts = make_options(options, **{**overrides, **{k: v[i] for k, v in per.items()}})
        out.append(opts)
    for name, (fine, fix) in _UNSUPPORTED.items():
        value = getattr(out[0], name)
        if value != fine and not (name == "quadratic" and value is False):  # False: the exact path, as batched
            shown = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
            raise ValueError(f"{name}={shown} is not supported for a batched model; {fix}")
    return out


# the one list of fit's keywords, each with its type and FitOptions' default (one line each): 40 lines
def fit_keywords(
    model,
    data,
    options: FitOptions | None = None,
    *,
    num_iterations: int = FitOptions.num_iterations,
    mixture_lr: PerMember[float] = FitOptions.mixture_lr,
    component_lr: PerMember[float] = FitOptions.component_lr,
    clamp: PerMember[float] = FitOptions.clamp,
    init: PerMember[str] = FitOptions.init,
    init_radius: PerMember[float | None] = FitOptions.init_radius,
    reset: PerMember[bool] = FitOptions.reset,
    reset_min_mass: PerMember[float | None] = FitOptions.reset_min_mass,
    lr_schedule: PerMember[str] = FitOptions.lr_schedule,
    seed: PerMember[int | None] = FitOptions.seed,
    generator: torch.Generator | None = FitOptions.generator,
    tol: PerMember[float | None] = FitOptions.tol,
    log_freq: int | None = FitOptions.log_freq,
    callback: Callable[[int, float, list], None] | None = FitOptions.callback,
    gradients: str = FitOptions.gradients,
    compile: bool = FitOptions.compile,
    quadratic: bool | None = FitOptions.quadratic,
    batch_size: int | None = FitOptions.batch_size,
    device: str | torch.device | None = FitOptions.device,
    dtype: torch.dtype | None = FitOptions.dtype,
    progress: bool | None = FitOptions.progress,
    num_threads: int | None = FitOptions.num_threads,
    standardize: PerMember[bool] = FitOptions.standardize,
    keep_best: PerMember[bool] = FitOptions.keep_best,
    spike_threshold: PerMember[float | None] = FitOptions.spike_threshold,
    spike_rollback: PerMember[bool] = FitOptions.spike_rollback,
    n_init: int = FitOptions.n_init,
):
    """The keyword options of `gmm.fit` and `MixtureModel.fit` (`same_options_as` gives both this signature, for
    type checkers and `help`); at run time both take them as `**overrides`, so exactly the keywords given
    override `options`. The options typed `PerMember` may be B values for a batched model."""
    raise NotImplementedError("a signature only: call gmm.fit or MixtureModel.fit")


def same_options_as(method: Callable[Concatenate[Any, Any, Any, P], Any]):
    """Decorator: the wrapped `fit(model, data, options=None, **overrides)` shows the keywords of `method`
    (`fit_keywords`), for type checkers (ParamSpec) and at runtime (`inspect.signature`, `help`)."""

    def decorate(function: Callable[..., R]) -> Callable[Concatenate[Any, Any, Any, P], R]:
        own = inspect.signature(function)
        keywords = [p for p in inspect.signature(method).parameters.values() if p.kind is p.KEYWORD_ONLY]
        first = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        unknown = inspect.Parameter("unknown", inspect.Parameter.VAR_KEYWORD)
        function.__signature__ = own.replace(parameters=[*first, *keywords, unknown])
        return function

    return decorate


def lr_factor(schedule: str, step: int, num_iterations: int) -> float:
    """Learning-rate multiplier at `step` (0-based): cosine annealing from 1 to 0, or constant 1."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / num_iterations))


def use_quadratic(opts: FitOptions, n: int, k: int, d: int) -> bool:
    if opts.quadratic is not None:
        return opts.quadratic
    # mini-batches would rebuild the quadratic features at every step, which costs more than they save
    return (opts.batch_size is None or opts.batch_size >= n) and n * k * d >= _QUADRATIC_MIN_ELEMENTS


def progress_bar(opts: FitOptions, total: int):
    show = opts.progress if opts.progress is not None else (sys.stderr.isatty() and total >= 2000)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fit", unit="step", leave=False, dynamic_ncols=True)


@contextmanager
def intra_op_threads(opts: FitOptions, num_elements: int, device: torch.device) -> Iterator[None]:
    """torch's intra-op thread count for the fit, restored afterwards. Small problems run in one thread:
    their operations are too small to split, and handing them to a second thread cost 10-25% per step at
    N * K * D up to ~5e5 on a 2-core machine. The setting is process-wide while the fit runs."""
    threads = opts.num_threads
    if threads is None and device.type == "cpu" and num_elements < _ONE_THREAD_MAX_ELEMENTS:
        threads = 1
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
