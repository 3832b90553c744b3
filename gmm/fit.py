"""The one gradient-descent loop shared by every family: Adam on the mean NLL, clamp, collapse resets.

Each iteration t = 1..T:
  1. the step function computes the NLL of the current parameters (history[t-1]) and its gradients,
     and Adam updates the parameters (two groups: weight logits at `mixture_lr`, means and covariance
     parameters at `component_lr`, both scaled by the learning-rate schedule);
  2. the clamp raises every covariance diagonal element below `clamp` to it (a "clamp" event per
     component touched);
  3. collapse rule: a component is *collapsed* when the clamp touched its covariance at this step AND its
     responsibility mass sum_n p(k | x_n) (computed exactly from the weight-logit gradient,
     mass_k = N (pi_k - dNLL/dlogit_k)) is below `reset_min_mass` (default D + 1: fewer points than a
     D-dimensional covariance needs). A collapsed component is *reset*: its mean moves to a data point
     drawn with the fit's generator from the 10% of points the model explains worst, its covariance to
     cov(X) / K^(2/D) (not for shared covariances), its weight logit to the mean logit, and its Adam
     moments to zero so momentum does not push it straight back (a "reset" event).
  4. recovery: a component clamped (for the first time, or again after it recovered) is watched until it has
     *recovered*: at an iterate whose NLL is exact (every step; with mini-batches the start, the log points
     and the end) its floored entries all exceed RECOVERY_FLOOR_FACTOR x the floor (it left the floor, by
     itself or through a reset) and that NLL is at most its pre-collapse level (the newest exact NLL before
     the clamp's step) + RECOVERY_MARGIN nats per sample. Then a "recovered" event at that iterate's step,
     whose detail gives the steps since the clamp (0: the reset of the clamp's own step did it). Nothing is
     watched, and nothing costs, until a clamp acts.
history[T] is the exact NLL after the last update.

Coordinates: the fit runs on z = (x - mean) / std (gmm.standardize: per axis, or one RMS std for the isotropic
families), so learning rates are in units of the data's spread; the start is made in data units and mapped to
z, the clamp becomes clamp / std_j^2 on axis j (a floor in the data's units), and the model is mapped back at
the end (and around every callback, which sees data units). The record is in data units: NLL_x = NLL_z +
sum_j log std_j.

Best iterate (`keep_best`): the parameters with the lowest NLL seen (history[t] at every step; with
mini-batches, the exact values at the log points and the start) are kept in a snapshot, and the model ends
with them; `fit` returns their NLL. A reset starts that search afresh from the reset's step: the lower NLLs
before it came from the collapsing component. Spikes: when history[t] - history[t-1] > `spike_threshold` (not at a
reset's step; with mini-batches between consecutive log points), a "spike" event is recorded and, with
`spike_rollback`, the parameters go back to the best iterate, Adam restarts (moments and step count zeroed)
and both learning rates are halved for the rest of the fit (again at each further spike). A non-finite NLL
raises NonFiniteNLLError after restoring the last parameters whose NLL was finite.

Restarts (`n_init`): starts with seeds seed, seed + 1, ... run together as one population (gmm.population:
one batched step for all starts; one after the other for mini-batches, analytic or compiled steps, the
quadratic path and with a callback); the model keeps the start with the lowest final NLL.

Mini-batches (`batch_size` < N): each step draws `batch_size` rows with replacement (the fit's generator) and
steps on their mean NLL, so memory scales with the batch, not with N. history[t] is then that batch's
NLL, a noisy estimate, except at the log points: after every `log_freq` updates the NLL of the full data is
evaluated (chunked over N, no gradients) and recorded as history[t]; the callback, the progress bar and the
`tol` test (|NLL_full(t) - NLL_full(t - log_freq)| < tol, between log points) see only those exact values,
and history[T] is exact as always. Each log point costs one pass over the data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import likelihood
from .init import INITS, base_covariance, initialize
from .model import MixtureModel, chunk_rows, parameter_tensors
from .optim import FusedAdam
from .standardize import Standardizer
from .validation import check_choice, check_data, check_dtype_device, check_float, check_int, make_generator, suggest

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
GRADIENTS = ("autograd", "analytic")
_WORST_FRACTION = 0.1  # resets draw from this fraction of worst-explained points
_ONE_THREAD_MAX_ELEMENTS = 1 << 19  # auto num_threads: below this N * K * D one thread beats two (bench)
_QUADRATIC_MIN_ELEMENTS = 1 << 20  # auto: quadratic path once N * K * D reaches this (float32 caveat: likelihood.py)
RECOVERY_FLOOR_FACTOR = 2.0  # a clamped component has left the floor once every floored entry exceeds this x floor
RECOVERY_MARGIN = 0.05  # nats per sample: recovered once the NLL is back within this of its pre-collapse level


@dataclass(frozen=True)
class FitOptions:
    """Options of `fit`, with their defaults. Pass any of them as keywords to `model.fit`."""

    num_iterations: int = 1000  # Adam steps
    mixture_lr: float = 1e-2  # Adam lr of the weight logits; 0 freezes the weights
    component_lr: float = 1e-2  # Adam lr of means and covariance parameters; 0 freezes them
    clamp: float = 1e-6  # variance floor, in variance units (not std), for every covariance diagonal
    init: str = "kmeans++"  # "kmeans++", "random", "radius" (uniform in +-radius) or "keep"
    radius: float | None = None  # half-width for init="radius"; default max |x|
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


@dataclass(frozen=True)
class FitEvent:
    """A clamp, reset, spike or recovery. `component` is -1 for a shared covariance and for spikes; `member` is
    the member index in a population fit (gmm.population), None for one model."""

    step: int
    component: int
    kind: str  # "clamp", "reset", "spike" or "recovered"
    detail: str
    member: int | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FitResult:
    """The whole record of one fit.

    Every NLL is a mean per sample in the data's units (also when the fit ran in standardized coordinates).

    Attributes:
        nll_history: (T + 1,) float64; entry t is the mean NLL after t updates (entry 0: the start). With
            `batch_size`, entries are the mini-batch's NLL except at multiples of `log_freq` and at T, which
            are exact full-data NLLs (`exact_steps`).
        events: every clamp, reset, spike and recovery, in order.
        num_iterations: updates run (fewer than asked when `tol` stopped the fit).
        wall_time: seconds in the loop (init and compilation excluded).
        init_time, compile_time: seconds spent initializing and compiling.
        converged: `tol` was reached.
        final_nll: the NLL of the parameters the fit left in the model: the best iterate's with `keep_best`,
            else the last one's (`last_nll`).
        completed: False when the fit was interrupted (the record then ends where it stopped).
        batch_size: rows per mini-batch, or None for full-batch steps (also when `batch_size` >= N).
        best_step, best_nll: the history index and NLL of the lowest NLL seen (at the log points only, with
            `batch_size`); the model holds those parameters when `keep_best`.
        warnings: what the fit warned about (ConvergenceWarning messages), also issued as warnings.
        scale: (D,) the data units per standardized unit the fit ran in (ones without `standardize`).
        seed: the seed of this start (None when a generator was passed).
        start, starts: with `n_init` > 1, the index of the start kept and every start's record, in order.
        stop_reason: why a population member stopped before `num_iterations` (non-finite NLL, `tol`, or the
            callback), "" otherwise.
    """

    nll_history: Tensor
    events: tuple[FitEvent, ...]
    num_iterations: int
    wall_time: float
    init_time: float
    compile_time: float
    converged: bool
    final_nll: float
    options: FitOptions = field(repr=False)
    completed: bool = True
    batch_size: int | None = None
    best_step: int = 0
    best_nll: float = float("nan")
    warnings: tuple[str, ...] = ()
    scale: Tensor | None = field(default=None, repr=False)
    seed: int | None = None
    start: int = 0
    starts: tuple[FitResult, ...] = field(default=(), repr=False)
    stop_reason: str = ""

    @property
    def last_nll(self) -> float:
        """The NLL of the last iterate (nll_history[-1])."""
        return float(self.nll_history[-1]) if len(self.nll_history) else float("nan")

    @property
    def exact_steps(self) -> Tensor:
        """(M,) int64 indices of `nll_history` that hold the NLL of the full data (all of them without
        `batch_size`; with it, 0 is the first batch's and the last entry of an interrupted fit a batch's)."""
        n = len(self.nll_history)
        if not self.batch_size:
            return torch.arange(n)
        freq = self.options.log_freq or max(1, self.options.num_iterations // 100)
        steps = torch.arange(freq, n - 1, freq)
        return torch.cat([steps, torch.tensor([n - 1])]) if n and self.completed else steps

    @property
    def clamp_count(self) -> int:
        return sum(e.kind == "clamp" for e in self.events)

    @property
    def reset_count(self) -> int:
        return sum(e.kind == "reset" for e in self.events)

    @property
    def spike_count(self) -> int:
        return sum(e.kind == "spike" for e in self.events)

    @property
    def recovered_count(self) -> int:
        return sum(e.kind == "recovered" for e in self.events)

    @property
    def iterations_per_second(self) -> float:
        return self.num_iterations / self.wall_time if self.wall_time > 0 else float("inf")


class ConvergenceWarning(UserWarning):
    """A fit that may not be trustworthy (scikit-learn's warning of that name, for this package): the last
    iterate ended above the start, NLL spikes were rolled back, or `tol` was not reached."""


class NonFiniteNLLError(FloatingPointError):
    """The NLL became NaN or infinite; `step` says when. The model is left at its last finite parameters."""

    def __init__(self, step: int, value: float):
        self.step = step
        super().__init__(
            f"the NLL became non-finite ({value}) at step {step}; lower the learning rates, raise clamp, or scale the data"
        )


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
    check_choice(opts.init, INITS, "init")
    check_choice(opts.lr_schedule, SCHEDULES, "lr_schedule")
    check_choice(opts.gradients, GRADIENTS, "gradients")
    if opts.radius is not None:
        check_float(opts.radius, "radius", positive=True)
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


def lr_factor(schedule: str, step: int, num_iterations: int) -> float:
    """Learning-rate multiplier at `step` (0-based): cosine annealing from 1 to 0, or constant 1."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / num_iterations))


# -- step functions ---------------------------------------------------------------------------------------
class AutogradStep:
    """NLL + autograd + torch's fused Adam, over chunks of N so memory stays bounded.

    The interface every step function implements (see also gmm.scratch):
    - `step(lr_mixture, lr_component)` -> 0-d tensor: the NLL of the parameters before the update; updates them.
    - `clamp(clamp)` -> None if nothing was below the floor, else (clamped (K',) bool, smallest ratio
      variance / floor (K',) before clamping): applies the variance floor `clamp` (a float, or (D,)
      per-axis floors; the same object at every step) after the update (see Family.clamp_).
    - `mass()` -> (K,): responsibility mass of each component at the parameters of the last step.
    - `reset_moments(components)`: zero the optimizer moments of those components.
    - `restart()`: zero every optimizer moment and step count (Adam starts afresh from the current parameters).
    - `compile_time`: seconds spent compiling (0 for eager).
    """

    compile_time = 0.0

    def __init__(
        self, model: MixtureModel, x: Tensor, opts: FitOptions, quadratic: bool, generator: torch.Generator | None = None
    ):
        self.model = model
        self.num_samples = x.shape[0]
        self.quadratic = quadratic
        components = [model.locs] + ([model.raw_cov] if model.family.trainable else [])
        self.optimizer = FusedAdam([[model.logits], components])
        self.params = self.optimizer.params
        self.rows = chunk_rows(model.num_components, model.num_dims) * (4 if quadratic else 1)
        self.center = x.mean(0)
        self.batch_size = opts.batch_size if opts.batch_size and opts.batch_size < x.shape[0] else None
        if self.batch_size:  # mini-batches are drawn (and prepared) at every step
            self.x, self.generator = x, generator if generator is not None else make_generator(0)
            self.chunks = self._prepare(x[: self.batch_size])
        else:
            self.chunks = self._prepare(x)
        self.scale = -1.0 / (self.batch_size or self.num_samples)
        self.logits_before = model.logits.detach().clone()
        self._logits = model.logits.detach()  # a view: reading it costs no autograd bookkeeping
        # the clamp's check reads a detached view of the floored entries (raw is updated in place, so the
        # view stays current); clamping itself, rare, goes through Family.clamp_
        self._floor_view = model.family.floor_view(model.raw_cov.detach())
        self._floor_of: tuple[object, float | Tensor] | None = None  # (clamp, raw floor) of the last clamp call
        self._loss_fn = self._loss
        if opts.compile:
            self._compile()

    def _prepare(self, x: Tensor) -> list[Tensor]:
        """Chunks of the loss input: quadratic features, or the data with a ones column (likelihood.py)."""
        if self.quadratic:
            return [likelihood.quadratic_features(c, self.center, self.model.family.cholesky) for c in x.split(self.rows)]
        return [likelihood.augment(c) for c in x.split(self.rows)]

    def _compile(self) -> None:
        """torch.compile the chunk loss (forward and backward graphs); eager when that fails."""
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self._loss, dynamic=False)
            compiled(self.chunks[0]).backward()  # compile now, so the loop's wall time excludes it
            self._loss_fn = compiled
        except Exception as err:  # noqa: BLE001  (any compiler failure: fall back, say so)
            log.warning("torch.compile failed (%s: %s); running eagerly", type(err).__name__, err)
        finally:
            for p in self.params:
                p.grad = None
        self.compile_time = time.perf_counter() - t0

    def _loss(self, chunk: Tensor) -> Tensor:
        m = self.model
        if not self.quadratic:
            return likelihood.mixture_nll_sum(chunk, m.logits, m.locs, m.raw_cov, m.family, self.scale, augmented=True)
        joint = chunk @ likelihood.quadratic_weights(m.logits, m.locs, m.covariance(), self.center)
        return likelihood.logsumexp(joint).sum() * self.scale

    def step(self, lr_mixture: float, lr_component: float) -> Tensor:
        for p in self.params:
            p.grad = None
        if self.batch_size:
            rows = torch.randint(self.num_samples, (self.batch_size,), generator=self.generator)
            self.chunks = self._prepare(self.x[rows.to(self.x.device)])
        if len(self.chunks) == 1:
            loss = self._loss_fn(self.chunks[0])
            _backward(loss)
            nll = loss.detach()
        else:
            nll = torch.zeros((), dtype=torch.float64, device=self.model.device)
            for chunk in self.chunks:
                loss = self._loss_fn(chunk)
                _backward(loss)
                nll += loss.detach()
        self.logits_before.copy_(self._logits)
        self.optimizer.step([lr_mixture, lr_component])
        return nll

    def clamp(self, clamp: float) -> tuple[Tensor, Tensor] | None:
        """Apply the variance floor after the update: None when nothing was below it, else
        (clamped (K',) bool, smallest variance (K',) before clamping)."""
        if self._floor_of is None or self._floor_of[0] is not clamp:
            self._floor_of = (clamp, self.model.family.raw_floor(clamp))
        floor = self._floor_of[1]
        # the common case, nothing below the floor: one reduction on a detached view, no autograd
        if isinstance(floor, float):
            if not bool(self._floor_view.amin() < floor):
                return None
        elif not bool((self._floor_view < floor).any()):
            return None
        return self.model.family.clamp_(self.model.raw_cov, clamp)

    def mass(self) -> Tensor:
        """(K,) sum_n p(k | x_n) at the parameters of the last step, from the logit gradient."""
        grad = self.model.logits.grad.detach()  # d mean-NLL / d logit_k = pi_k - mean_n p(k | x_n)
        return (torch.softmax(self.logits_before, -1) - grad) * self.num_samples  # a batch's, scaled to N

    def restart(self) -> None:
        self.optimizer.restart()

    def reset_moments(self, components: Tensor) -> None:
        m = self.model
        per_component = [m.logits, m.locs] + ([m.raw_cov] if m.family.trainable and not m.family.shared else [])
        self.optimizer.reset_rows(per_component, components)


_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _backward(loss: Tensor) -> None:
    """loss.backward() for a 0-d loss, straight into autograd's engine: `Tensor.backward` first checks and
    builds its arguments in Python, about 5 us a call, a few percent of a small step."""
    if _run_backward is None:  # a torch without the private entry point
        loss.backward()
        return
    _run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)


def make_step(
    model: MixtureModel,
    x: Tensor,
    opts: FitOptions,
    quadratic: bool,
    generator: torch.Generator | None = None,
    clamp: float | Tensor | None = None,
):
    """The step function for `opts.gradients` / `opts.compile` (`generator` draws mini-batches; `clamp` is the
    floor the analytic step fuses in, default `opts.clamp`)."""
    if opts.gradients == "analytic":
        if opts.batch_size:
            raise ValueError("batch_size needs gradients='autograd'; drop batch_size or use autograd gradients")
        from . import scratch  # noqa: PLC0415  (optional path, imported only when asked)

        return scratch.make_step(model, x, opts, quadratic, clamp)
    return AutogradStep(model, x, opts, quadratic, generator)


# -- the loop ---------------------------------------------------------------------------------------------
def _use_quadratic(opts: FitOptions, n: int, k: int, d: int) -> bool:
    if opts.quadratic is not None:
        return opts.quadratic
    # mini-batches would rebuild the quadratic features at every step, which costs more than they save
    return (opts.batch_size is None or opts.batch_size >= n) and n * k * d >= _QUADRATIC_MIN_ELEMENTS


def _progress_bar(opts: FitOptions, total: int):
    show = opts.progress if opts.progress is not None else (sys.stderr.isatty() and total >= 2000)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fit", unit="step", leave=False, dynamic_ncols=True)


@torch.no_grad()
def _reset(model: MixtureModel, x: Tensor, components: list[int], g: torch.Generator, reset_raw: Tensor) -> list[int]:
    """Reset `components` (see module docstring); returns the data rows their means moved to."""
    lp = model.log_prob(x)
    worst = lp.topk(max(len(components), math.ceil(_WORST_FRACTION * x.shape[0])), largest=False).indices
    rows = worst[torch.randperm(worst.shape[0], generator=g)[: len(components)].to(worst.device)]
    idx = torch.tensor(components, device=x.device)
    model.locs[idx] = x[rows]
    model.logits[idx] = model.logits.mean()
    if model.family.trainable and not model.family.shared:
        model.raw_cov[idx] = reset_raw[idx]
    return rows.tolist()


@contextmanager
def _intra_op_threads(opts: FitOptions, num_elements: int, device: torch.device) -> Iterator[None]:
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


def fit(model: MixtureModel, data, options: FitOptions | None = None, **overrides) -> FitResult:
    """Fit `model` to `data` (N, D) by Adam on the mean NLL. See `FitOptions` and the module docstring.

    A batched model (`batch_shape=(B,)`) is fit as a population by `gmm.population.fit_population`, which
    returns a `PopulationResult` (one FitResult per member).

    Returns:
        The FitResult, also stored as `model.fit_result_` (a partial one, `completed=False`, when the
        fit raises, e.g. on KeyboardInterrupt, a non-finite NLL or an exception from the callback).

    Raises:
        ValueError / TypeError: bad data or options, with the fix in the message.
        NonFiniteNLLError: the NLL became NaN or infinite (the model keeps its last finite parameters).

    Warns:
        ConvergenceWarning: the last iterate ended above the start, spikes were rolled back, or `tol` was
            given and not reached (the messages are also in `FitResult.warnings`).
    """
    if model.batch_shape:  # B mixtures: one batched loop (gmm.population), options may be per member
        from .population import fit_population  # noqa: PLC0415  (population imports this module)

        return fit_population(model, data, options, **overrides)
    opts = make_options(options, **overrides)
    if opts.device is not None or opts.dtype is not None:
        model.to(device=opts.device, dtype=opts.dtype)
    check_dtype_device(model.dtype, model.device, "model")  # a model converted by hand with .to() too
    x = check_data(data, num_dims=model.num_dims, min_samples=model.num_components, dtype=model.dtype, device=model.device)
    n, k, d = x.shape[0], model.num_components, model.num_dims
    with _intra_op_threads(opts, n * k * d * opts.n_init, x.device):
        if opts.n_init == 1:
            result = _fit(model, x, opts)
        elif _batchable(opts):
            result = _fit_starts_population(model, x, opts)
        else:
            result = _fit_starts(model, x, opts)
    for message in result.warnings:
        warnings.warn(message, ConvergenceWarning, stacklevel=2)
    return result


# -- restarts ---------------------------------------------------------------------------------------------
def start_seeds(opts: FitOptions) -> list[int | None]:
    """The seeds of the `n_init` starts: seed, seed + 1, ... (so start 0 is the fit with n_init=1), or drawn
    from `generator` (or fresh entropy when seed is None) when no seed fixes them."""
    if opts.n_init == 1:
        return [opts.seed]
    if opts.generator is None and opts.seed is not None:
        return [opts.seed + i for i in range(opts.n_init)]
    g = make_generator(None, opts.generator)
    return torch.randint(0, 2**62, (opts.n_init,), generator=g).tolist()


def _batchable(opts: FitOptions) -> bool:
    """Whether restarts run as a population (gmm.population): full-batch autograd steps, and no callback (it
    would see B members at once instead of one start at a time)."""
    simple = opts.batch_size is None and opts.gradients == "autograd" and not opts.compile and not opts.quadratic
    return simple and opts.callback is None


def _fit_starts_population(model: MixtureModel, x: Tensor, opts: FitOptions) -> FitResult:
    """`n_init` starts (the seeds of `start_seeds`) fit together as one population (gmm.population): the same
    records as `_fit_starts` up to rounding, in about the time of one start at small sizes. The model keeps the
    parameters of the start with the lowest final NLL; a start whose NLL became non-finite is recorded and
    skipped (all of them failing raises the first error). Interrupted, the model keeps its parameters."""
    from .population import fit_members, start_population  # noqa: PLC0415  (population imports this module)

    seeds = start_seeds(opts)
    population = start_population(model, len(seeds))
    shared = dataclasses.replace(opts, generator=None, n_init=1, seed=seeds[0])
    try:
        result = fit_members(population, x[None], [dataclasses.replace(shared, seed=s) for s in seeds])
    except BaseException:
        if population.fit_result_ is not None:  # None: stopped while the starts were made, nothing recorded
            partial = population.fit_result_.members
            starts = tuple(dataclasses.replace(r, start=i) for i, r in enumerate(partial))
            model.fit_result_ = dataclasses.replace(starts[0], starts=starts)
        raise
    records = tuple(dataclasses.replace(r, start=i) for i, r in enumerate(result.members))
    finished = [r for r in records if r.completed]
    if not finished:
        model.fit_result_ = dataclasses.replace(records[-1], starts=records)
        raise next(e for e in result.errors if e is not None)
    kept = min(finished, key=lambda r: r.final_nll)
    with torch.no_grad():
        one = population.member(kept.start)
        torch._foreach_copy_(parameter_tensors(model), parameter_tensors(one))
    notes = kept.warnings
    failed = [r.start for r in records if not r.completed]
    if failed:
        notes += (f"start(s) {failed} of {opts.n_init} stopped on a non-finite NLL and were skipped",)
    kept = dataclasses.replace(kept, warnings=notes, starts=records)
    model.fit_result_ = kept
    return kept


def _fit_starts(model: MixtureModel, x: Tensor, opts: FitOptions) -> FitResult:
    """`n_init` fits from the starts of `start_seeds`, one after the other (for the options the population loop
    does not run: mini-batches, analytic or compiled steps, the quadratic path); the model keeps the parameters of
    the start with the lowest final NLL, and its record lists every start's record (`starts`). A start whose
    NLL becomes non-finite is recorded and skipped (all of them failing raises the last error)."""
    records: list[FitResult] = []
    best: tuple[float, int, list[Tensor]] | None = None  # (final NLL, start, parameters)
    failure: NonFiniteNLLError | None = None
    for i, seed in enumerate(start_seeds(opts)):
        try:
            result = _fit(model, x, dataclasses.replace(opts, seed=seed, generator=None, n_init=1))
        except NonFiniteNLLError as err:
            failure = err
            records.append(dataclasses.replace(model.fit_result_, start=i))
            continue
        except BaseException:
            if best is not None:  # the model keeps the best finished start
                torch._foreach_copy_(parameter_tensors(model), best[2])
            model.fit_result_ = dataclasses.replace(model.fit_result_, start=i, starts=(*records, model.fit_result_))
            raise
        records.append(dataclasses.replace(result, start=i))
        if best is None or result.final_nll < best[0]:
            best = (result.final_nll, i, [p.clone() for p in parameter_tensors(model)])
    if best is None:
        model.fit_result_ = dataclasses.replace(model.fit_result_, starts=tuple(records))
        raise failure
    torch._foreach_copy_(parameter_tensors(model), best[2])
    kept = records[best[1]]
    notes = kept.warnings
    failed = [r.start for r in records if not r.completed]
    if failed:
        notes += (f"start(s) {failed} of {opts.n_init} stopped on a non-finite NLL and were skipped",)
    kept = dataclasses.replace(kept, warnings=notes, starts=tuple(records))
    model.fit_result_ = kept
    return kept


# -- one start --------------------------------------------------------------------------------------------
class _Iterates:
    """Snapshots of the parameters for the best iterate and the last finite one, without a copy per
    improvement: four buffers; each step copies the parameters into one that holds neither the previous
    step's parameters nor the best's, and an improvement only moves the best's index."""

    def __init__(self, params: list[Tensor]):
        self.params = params
        self.buffers = [[torch.empty_like(p) for p in params] for _ in range(4)]
        self.current = self.previous = self.best = -1  # theta_(t-1), theta_(t-2), the best iterate

    def _free(self) -> int:
        return next(i for i in range(4) if i not in (self.current, self.previous, self.best))

    def save(self) -> None:
        """Before step t: copy theta_(t-1) (the parameters whose NLL step t computes)."""
        self.previous = self.current
        self.current = self._free()
        torch._foreach_copy_(self.buffers[self.current], self.params)

    def save_best(self) -> None:
        """Copy the current parameters as the best iterate (mini-batch log points)."""
        index = self._free()
        torch._foreach_copy_(self.buffers[index], self.params)
        self.best = index

    def restore(self, index: int) -> bool:
        if index < 0:
            return False
        torch._foreach_copy_(self.params, self.buffers[index])
        return True


class _Recovery:
    """Watches clamped components until they recover (module docstring, item 4) and records "recovered" events.

    `clamped(step, new_events)` starts a watch for the components of this step's clamp events (one already
    watched keeps its first clamp). For every exact NLL, `look()` reads which watched components are off the
    floor in the parameters of that iterate, then `measured(index, nll, events)` is given the iterate's
    index in the history and its NLL (in z: the data units' differ by a constant) and checks the watches.
    Both cost nothing while no component is watched.

    Args:
        family, raw_cov: the model's family and raw covariance tensor (updated in place: a view stays current).
        floor: the variance floor of the fit (a float, or (D,) per-axis floors in z).
        shift: added to the NLLs shown in event details (the data units' NLL).
        member: the population member whose component it watches (gmm.population), None for one fit.
    """

    def __init__(self, family, raw_cov: Tensor, floor: float | Tensor, shift: float = 0.0, member: int | None = None):
        self.family, self.raw_cov, self.floor, self.shift, self.member = family, raw_cov, floor, shift, member
        self.view: Tensor | None = None  # the floored raw entries (K', m), made at the first clamp
        self.watched: dict[int, tuple[int, float]] = {}  # component (-1: shared) -> (clamp step, NLL before it)
        self.newest = math.nan  # the newest exact NLL: a clamp's pre-collapse level
        self.off: list[bool] = []  # per component (K'), from look(): every floored entry off the floor

    def clamped(self, step: int, new_events: list[FitEvent]) -> None:
        for e in new_events:
            if e.kind == "clamp" and e.component not in self.watched:
                self.watched[e.component] = (step, self.newest)
        if self.watched and self.view is None:
            self.view = self.family.floor_view(self.raw_cov.detach())
            self.above = self.family.raw_floor(RECOVERY_FLOOR_FACTOR * self.floor)

    def look(self) -> None:
        if self.watched:
            self.off = (self.view > self.above).all(-1).tolist()

    def measured(self, index: int, nll: float, events: list[FitEvent]) -> None:
        for c, (first, before) in list(self.watched.items()):
            if self.off[max(c, 0)] and nll <= before + RECOVERY_MARGIN:
                del self.watched[c]
                detail = f"off the floor, NLL {nll + self.shift:.6g} <= {before + self.shift:.6g} + "
                detail += f"{RECOVERY_MARGIN:g}; {index - first} steps after its clamp at step {first}"
                events.append(FitEvent(index, c, "recovered", detail, member=self.member))
        self.newest = nll


def _fit(model: MixtureModel, x: Tensor, opts: FitOptions) -> FitResult:
    n, k, d = x.shape[0], model.num_components, model.num_dims
    g = make_generator(None if opts.generator is not None else opts.seed, opts.generator)
    total = opts.num_iterations
    min_mass = float(d + 1) if opts.reset_min_mass is None else opts.reset_min_mass
    log_freq = opts.log_freq or max(1, total // 100)

    t0 = time.perf_counter()
    initialize(model, x, opts.init, g, clamp=opts.clamp, radius=opts.radius)
    model.family.clamp_(model.raw_cov, opts.clamp)
    coords = Standardizer.of(x, model, opts.standardize)
    z = coords.data(x)
    clamp = coords.clamp(opts.clamp)  # the floor in z: (D,) clamp / scale^2
    reset_raw = model.family.from_covariances(
        base_covariance(x, k, opts.clamp).to(model.device, model.dtype).expand(k, d, d)
    )
    if not coords.identity and model.family.trainable:
        model.family.rescale_(reset_raw, coords.scale)
    init_time = time.perf_counter() - t0

    stepper = make_step(model, z, opts, _use_quadratic(opts, n, k, d), g, clamp)
    compile_time = stepper.compile_time
    coords.to_standard_(model)
    model.family.clamp_(model.raw_cov, clamp)  # absorbs the rounding of the map

    history: list[float] = []  # NLLs in z (the data units' NLL is this + coords.log_det)
    events: list[FitEvent] = []
    reported = 0  # events already passed to the callback
    converged = False
    bar = _progress_bar(opts, total)
    step = 0
    iterates = _Iterates(parameter_tensors(model))
    best_nll, best_step = math.inf, 0
    lr_scale, rollbacks, last_reset = 1.0, 0, -1
    shift = coords.log_det

    def record(
        completed: bool, wall: float, final: float | None = None, notes: tuple[str, ...] = (), kept_step: int = -1
    ) -> FitResult:
        """`final`: the data-unit NLL of the parameters left in the model, those of step `kept_step`."""
        kept = torch.tensor(history, dtype=torch.float64) + shift
        if final is not None and 0 <= kept_step < len(history):
            kept[kept_step] = final  # computed on the data itself, after the map back
        result = FitResult(
            kept,
            tuple(events),
            max(0, len(history) - 1),
            wall,
            init_time,
            compile_time,
            converged,
            final if final is not None else (float(kept[-1]) if len(history) else float("nan")),
            opts,
            completed,
            getattr(stepper, "batch_size", None),
            best_step=best_step,
            best_nll=float(kept[best_step]) if len(history) > best_step else float("nan"),
            warnings=notes,
            scale=coords.scale.detach().cpu(),
            seed=opts.seed if opts.generator is None else None,
        )
        model.fit_result_ = result
        return result

    @contextmanager
    def in_data_units() -> Iterator[None]:
        """The model in data units meanwhile (for the callback and exact NLLs), back in z afterwards: restored
        bit for bit, unless the parameters were changed meanwhile (by the callback), then mapped."""
        if coords.identity:
            yield
            return
        saved = [p.clone() for p in iterates.params]
        coords.to_data_(model, opts.clamp)
        shown = [p.clone() for p in iterates.params]
        try:
            yield
        finally:
            if all(torch.equal(a, b) for a, b in zip(shown, iterates.params, strict=True)):
                torch._foreach_copy_(iterates.params, saved)
            else:
                coords.to_standard_(model)

    def show(step: int, nll: float, new_events: list) -> None:
        """The callback, with the model in data units; `nll` in z."""
        with in_data_units():
            opts.callback(step, nll + shift, new_events)

    def exact_nll() -> float:
        """The full data's NLL of the current parameters, in z terms, computed in data units (so the callback
        sees exactly the NLL it would compute itself)."""
        with in_data_units():
            return _full_nll(model, x) - shift

    def on_spike(step: int, before: float, after: float) -> bool:
        """Log a spike; roll back when asked (see the module docstring). Returns whether it rolled back."""
        nonlocal lr_scale, rollbacks
        jump = f"NLL {before + shift:.6g} -> {after + shift:.6g} (+{after - before:.3g} > {opts.spike_threshold:g})"
        rolled = opts.spike_rollback and iterates.restore(iterates.best)
        if rolled:
            stepper.restart()
            lr_scale *= 0.5
            rollbacks += 1
            jump += f"; rolled back to step {best_step} (NLL {best_nll + shift:.6g}), learning rates x{lr_scale:g}"
        events.append(FitEvent(step, -1, "spike", jump))
        return rolled

    batched = getattr(stepper, "batch_size", None) is not None  # None also when batch_size >= N
    exact: float | None = None  # mini-batches: full-data NLL of the current parameters, from the last log point
    last_exact: float | None = None  # mini-batches: the previous log point's, for `tol` and spikes
    start_nll: float | None = None  # mini-batches: the start's exact NLL (history[0] is a batch's)
    spikes = opts.spike_threshold if opts.spike_threshold is not None else math.inf
    recovery = _Recovery(model.family, model.raw_cov, clamp, shift)
    start = time.perf_counter()
    try:
        if batched:  # the start is a candidate for the best iterate too
            best_nll = start_nll = exact_nll()
            iterates.save_best()
            recovery.measured(0, start_nll, events)
        for step in range(1, total + 1):
            iterates.save()
            if not batched:  # this step's NLL is exact: of the parameters as they are now
                recovery.look()
            factor = lr_factor(opts.lr_schedule, step - 1, total) * lr_scale
            value = float(stepper.step(opts.mixture_lr * factor, opts.component_lr * factor))
            if exact is not None:  # the exact value replaces the batch estimate
                value, exact = exact, None
            if not math.isfinite(value):
                iterates.restore(iterates.previous)  # theta_(t-2): the last finite one
                raise NonFiniteNLLError(step - 1, value)
            history.append(value)
            if not batched:
                recovery.measured(step - 1, value, events)
                if value < best_nll:
                    iterates.best, best_nll, best_step = iterates.current, value, step - 1
                elif step >= 2 and value - history[-2] > spikes and last_reset != step - 1:
                    on_spike(step - 1, history[-2], value)
            seen = len(events)
            hit = stepper.clamp(clamp)
            if hit is not None and _on_clamp(model, z, stepper, step, *hit, opts, min_mass, g, reset_raw, events):
                # the low NLLs before a reset came from the collapsing component: the best is sought afresh
                last_reset, best_nll, iterates.best = step, math.inf, -1
            if len(events) > seen:
                recovery.clamped(step, events[seen:])
            if not batched and opts.tol is not None and step >= 2 and abs(history[-1] - history[-2]) < opts.tol:
                converged = True
                break
            if step % log_freq == 0:
                if batched:  # the full data's NLL after this update, recorded as the next history entry
                    nll = exact = exact_nll()
                    if not math.isfinite(nll):
                        iterates.restore(iterates.current)
                        raise NonFiniteNLLError(step, nll)
                    if nll < best_nll:
                        iterates.save_best()
                        best_nll, best_step = nll, step
                    elif last_exact is not None and nll - last_exact > spikes and last_reset <= step - log_freq:
                        if on_spike(step, last_exact, nll):
                            nll = exact = best_nll  # the parameters are the best iterate's now
                    recovery.look()
                    recovery.measured(step, nll, events)
                    if opts.tol is not None and last_exact is not None and abs(nll - last_exact) < opts.tol:
                        converged = True
                        break  # the closing callback reports this step
                    last_exact = nll
                else:
                    nll = history[-1]
                log.debug("step %d: nll %.6f", step, nll + shift)
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(nll=f"{nll + shift:.4f}", refresh=False)
                if opts.callback is not None:
                    show(step, nll, events[reported:])
                    reported = len(events)
        last = exact if exact is not None else _full_nll(model, z)  # in z: the data units' comes at the end
        if not math.isfinite(last):
            iterates.restore(iterates.current)
            raise NonFiniteNLLError(len(history), last)
        history.append(last)
        recovery.look()
        recovery.measured(len(history) - 1, last, events)
        if opts.callback is not None and (total % log_freq != 0 or converged or events[reported:]):
            show(step, last, events[reported:])
        wall = time.perf_counter() - start
        kept_step = len(history) - 1  # the iterate left in the model
        if last <= best_nll:
            best_nll, best_step = last, kept_step
        elif opts.keep_best:
            iterates.restore(iterates.best)
            kept_step = best_step
    except BaseException:
        # keep what was recorded: the history up to the last finished step, and every event
        coords.to_data_(model, opts.clamp)
        record(False, time.perf_counter() - start)
        raise
    finally:
        if bar is not None:
            bar.close()
    coords.to_data_(model, opts.clamp)
    final = last if coords.identity and kept_step == len(history) - 1 else _full_nll(model, x)
    first = history[0] if start_nll is None else start_nll
    notes = _warnings(first + shift, last + shift, final, kept_step, rollbacks, lr_scale, opts, converged)
    return record(True, wall, final, notes, kept_step)


def _warnings(start, last, final, best_step, rollbacks, lr_scale, opts: FitOptions, converged: bool) -> tuple[str, ...]:
    """The ConvergenceWarning messages of a finished fit (see ConvergenceWarning)."""
    notes = []
    if last - start > 1e-6 * max(1.0, abs(start)):  # above rounding (float32 parameters)
        kept = (
            f"the model holds the best iterate (step {best_step}, NLL {final:.6g})"
            if opts.keep_best
            else ("the model holds it (keep_best=False)")
        )
        notes.append(f"the fit's last NLL {last:.6g} is above its start's {start:.6g}; {kept}; lower the learning rates")
    if rollbacks:
        notes.append(
            f"{rollbacks} NLL spike(s) above {opts.spike_threshold:g} nats were rolled back to the best iterate "
            f"and the learning rates halved each time (now x{lr_scale:g}); lower the learning rates"
        )
    if opts.tol is not None and not converged:
        notes.append(f"tol={opts.tol:g} was not reached in {opts.num_iterations} iterations; raise num_iterations or tol")
    return tuple(notes)


def _full_nll(model: MixtureModel, x: Tensor) -> float:
    """The mean NLL of all of `x` (chunked over N, no gradients, accumulated in float64)."""
    return -model.score(x)


def _on_clamp(model, x, stepper, step, clamped, smallest, opts, min_mass, g, reset_raw, events) -> bool:
    """Record clamp events for the components touched and reset the collapsed ones; True if any was reset.
    `smallest` is the smallest variance / floor ratio; events give the variance in the data's units."""
    shared = model.family.shared
    for c in clamped.nonzero()[:, 0].tolist():
        variance = float(smallest[c]) * opts.clamp
        events.append(FitEvent(step, -1 if shared else c, "clamp", f"variance {variance:.3g} raised to {opts.clamp:.3g}"))
    if not opts.reset:
        return False
    mass = stepper.mass()
    touched = clamped.expand(model.num_components) if shared else clamped
    collapsed = (touched & (mass < min_mass)).nonzero()[:, 0].tolist()
    if not collapsed:
        return False
    rows = _reset(model, x, collapsed, g, reset_raw)
    stepper.reset_moments(torch.tensor(collapsed, device=model.device))
    for c, row in zip(collapsed, rows, strict=True):
        events.append(
            FitEvent(step, c, "reset", f"mass {float(mass[c]):.3g} < {min_mass:.3g} on the floor; mean -> sample {row}")
        )
    return True
