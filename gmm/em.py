"""Expectation-maximization for every covariance family: the baseline gradient descent is measured against.

Each iteration t = 1..T is an M-step from the responsibilities of the current parameters, then the E-step
of the new parameters (which gives history[t]):

* E-step: r_nk = p(k | x_n) = softmax_k(log pi_k + log N(x_n | mu_k, Sigma_k)) (`gmm.likelihood`);
  the mean NLL is -(1/N) sum_n logsumexp_k(...).
* M-step (closed form): N_k = sum_n r_nk, pi_k = N_k / N, mu_k = sum_n r_nk x_n / N_k, per-component
  scatter S_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k, then
  raw = family.from_covariances(S_k + clamp I, weights=pi), which is the maximizing member of the family:

  | family             | covariance update                                  |
  |--------------------|----------------------------------------------------|
  | `full`             | S_k + clamp I                                      |
  | `tied`             | sum_k pi_k S_k + clamp I                           |
  | `diagonal`         | diag(S_k) + clamp                                  |
  | `isotropic`        | tr(S_k) / D + clamp                                |
  | `shared_isotropic` | sum_k pi_k tr(S_k) / D + clamp                     |
  | `constant`         | not updated (only weights and means move)          |

`clamp` acts as scikit-learn's `reg_covar`: it is added to every covariance diagonal, so given the same
start, `clamp == reg_covar` and a tight `tol`, the fit converges to scikit-learn's `GaussianMixture`
optimum (tested to 1e-4 nats). A "clamp" event is recorded whenever a component's scatter variance fell
below `clamp` (the floor then dominates that covariance: a collapsing component).

The start is `gmm.init.initialize` with the same `init`, `seed` / `generator` and `clamp` as `gmm.fit`, so
gradient descent and EM begin from the same parameters.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import likelihood
from .init import initialize
from .model import MixtureModel, chunk_rows
from .options import FitOptions, make_options
from .records import ConvergenceWarning, FitEvent, FitResult, NonFiniteNLLError
from .validation import check_data, check_float, make_generator, suggest

log = logging.getLogger(__name__)

_RENAMED = {"max_iter": "num_iterations", "radius": "init_radius"}  # fit_em's names before they became gmm.fit's


# over 60 lines: half of it is the docstring of every argument (the body is the checks, the start, the loop)
def fit_em(
    model: MixtureModel,
    data,
    *,
    num_iterations: int = 1000,
    tol: float | None = 1e-6,
    clamp: float = 1e-6,
    init: str = "kmeans++",
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    init_radius: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[int, float, list], None] | None = None,
    **unknown,
) -> FitResult:
    """Fit `model` to `data` (N, D) by expectation-maximization (see the module docstring).

    Args:
        model: any `MixtureModel`; its parameters are overwritten (start and result).
        data: (N, D) tensor or array.
        num_iterations: at most this many EM iterations (>= 1).
        tol: stop when the mean NLL changes by less than `tol` nats in one iteration; None or 0 runs
            all `num_iterations` iterations. A ConvergenceWarning is issued when `tol` is not reached.
        clamp: added to every covariance diagonal at each M-step (scikit-learn's `reg_covar`), variance units.
        init, seed, generator, init_radius: the start, exactly as in `gmm.fit` (same seed, same start).
        device, dtype: move the model first (default: keep its own).
        callback: callback(iteration, nll, new_events) after every iteration; may raise to stop the fit
            (the partial record is then in `model.fit_result_` with completed=False).

    Returns:
        A `gmm.FitResult` (also stored as `model.fit_result_`): nll_history[t] is the mean NLL after t
        iterations (entry 0: the start), `converged` says whether `tol` was reached, `wall_time` is the
        time in the loop (init excluded).

    Raises:
        ValueError / TypeError: bad data or options.
        NonFiniteNLLError: the NLL became NaN or infinite.
    """
    if unknown:  # the names of gmm.fit; an old one (max_iter, radius) gets its new name
        names = [n for n in inspect.signature(fit_em).parameters if n not in ("model", "data", "unknown")]
        hints = "".join(f" ({u} is now {_RENAMED[u]!r})" if u in _RENAMED else suggest(u, names) for u in unknown)
        raise TypeError(f"unknown fit_em option(s) {', '.join(unknown)}{hints}")
    opts = _em_options(num_iterations, tol, clamp, init, seed, generator, init_radius, device, dtype, callback)
    if opts.device is not None or opts.dtype is not None:
        model.to(device=opts.device, dtype=opts.dtype)
    x = check_data(data, num_dims=model.num_dims, min_samples=model.num_components, dtype=model.dtype, device=model.device)
    g = make_generator(None if opts.generator is not None else opts.seed, opts.generator)

    t0 = time.perf_counter()
    initialize(model, x, opts.init, g, clamp=opts.clamp, init_radius=opts.init_radius)
    model.family.clamp_(model.raw_cov, opts.clamp)
    run = _Run(model, opts, init_time=time.perf_counter() - t0)

    chunks = list(x.split(chunk_rows(model.num_components, model.num_dims)))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            run.iterate(chunks)
    except BaseException:
        run.record(False, time.perf_counter() - start)
        raise
    wall = time.perf_counter() - start
    notes = ()
    if opts.tol is not None and not run.converged:
        notes = (run.not_converged(),)
        warnings.warn(notes[0], ConvergenceWarning, stacklevel=2)
    return run.record(True, wall, notes)


def _em_options(num_iterations, tol, clamp, init, seed, generator, init_radius, device, dtype, callback) -> FitOptions:
    """fit_em's arguments as the fit's options; EM's tol (0 or None: run every iteration) is checked here."""
    if tol is not None:
        tol = check_float(tol, "tol")
        if tol < 0:
            raise ValueError(f"tol must be >= 0 (0 or None runs all num_iterations iterations); got {tol}")
    return make_options(
        num_iterations=num_iterations,
        tol=tol or None,
        clamp=clamp,
        init=init,
        seed=None if generator is not None and seed == 0 else seed,  # the default seed gives way to a generator
        generator=generator,
        init_radius=init_radius,
        device=device,
        dtype=dtype,
        callback=callback,
    )


class _Run:
    """The state of one EM fit: the NLL after each iteration, the events, whether `tol` was reached."""

    def __init__(self, model: MixtureModel, opts: FitOptions, init_time: float):
        self.model, self.opts, self.init_time = model, opts, init_time
        self.history: list[float] = []
        self.events: list[FitEvent] = []
        self.converged = False

    def iterate(self, chunks: list[Tensor]) -> None:
        """The start's E-step, then up to `num_iterations` M-step + E-step pairs (stops early at `tol`)."""
        model, opts, history = self.model, self.opts, self.history
        nll, resp = _e_step(model, chunks)
        history.append(_checked(nll, 0))
        for it in range(1, opts.num_iterations + 1):
            new_events = _m_step(model, chunks, resp, opts.clamp, it)
            self.events.extend(new_events)
            nll, resp = _e_step(model, chunks)
            history.append(_checked(nll, it))
            if opts.callback is not None:
                opts.callback(it, history[-1], new_events)
            if opts.tol is not None and abs(history[-1] - history[-2]) < opts.tol:
                self.converged = True
                return

    def not_converged(self) -> str:
        """The ConvergenceWarning's message when `tol` was not reached."""
        change = abs(self.history[-1] - self.history[-2])
        return (
            f"EM did not converge: the NLL still changed by {change:.3g} > tol={self.opts.tol:g} "
            f"after num_iterations={self.opts.num_iterations} iterations; raise num_iterations or tol"
        )

    def record(self, completed: bool, wall: float, notes: tuple[str, ...] = ()) -> FitResult:
        """The FitResult of the iterations so far, also stored as `model.fit_result_`."""
        history, opts = self.history, self.opts
        best = min(range(len(history)), key=history.__getitem__) if history else 0
        result = FitResult(
            nll_history=torch.tensor(history, dtype=torch.float64),
            events=tuple(self.events),
            num_iterations=max(0, len(history) - 1),
            wall_time=wall,
            init_time=self.init_time,
            compile_time=0.0,
            converged=self.converged,
            final_nll=history[-1] if history else float("nan"),
            options=opts,
            completed=completed,
            best_step=best,
            best_nll=history[best] if history else float("nan"),
            warnings=notes,
            seed=opts.seed if opts.generator is None else None,
        )
        self.model.fit_result_ = result
        return result


def _checked(nll: float, iteration: int) -> float:
    if not math.isfinite(nll):
        raise NonFiniteNLLError(iteration, nll)
    return nll


def _e_step(model: MixtureModel, chunks: list[Tensor]) -> tuple[float, Tensor]:
    """Mean NLL of the current parameters and the (N, K) responsibilities."""
    cov = model.covariance()
    total = 0.0
    resp = []
    num_samples = 0
    for chunk in chunks:
        joint = likelihood.joint_log_prob(chunk, model.logits, model.locs, cov)  # (n, K)
        lse = likelihood.logsumexp(joint)  # (n,)
        total += float(lse.double().sum())
        num_samples += chunk.shape[0]
        resp.append((joint - lse.unsqueeze(-1)).exp())
    return -total / num_samples, torch.cat(resp)


def _m_step(model: MixtureModel, chunks: list[Tensor], resp: Tensor, clamp: float, iteration: int) -> list[FitEvent]:
    """Closed-form update of weights, means and (unless `constant`) covariances. Returns clamp events."""
    num_samples = resp.shape[0]
    k, d = model.num_components, model.num_dims
    counts = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps  # (K,) N_k; an empty component stays finite
    x_rows = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    means = (resp.T @ x_rows) / counts.unsqueeze(-1)  # (K, D)
    weights = counts / num_samples
    model.logits.copy_(weights.log())
    model.locs.copy_(means)
    family = model.family
    if not family.trainable:
        return []
    cholesky = family.cholesky
    scatter = torch.zeros((k, d, d) if cholesky else (k, d), dtype=resp.dtype, device=resp.device)
    offset = 0
    for chunk in chunks:
        r = resp[offset : offset + chunk.shape[0]]  # (n, K)
        offset += chunk.shape[0]
        diff = chunk.unsqueeze(1) - means  # (n, K, D)
        if cholesky:
            scatter += torch.einsum("nk,nkd,nke->kde", r, diff, diff)
        else:
            scatter += torch.einsum("nk,nkd->kd", r, diff.square())
    scatter = scatter / counts.view(k, *([1] * (scatter.ndim - 1)))
    if not cholesky:
        scatter = torch.diag_embed(scatter)
    eye = torch.eye(d, dtype=scatter.dtype, device=scatter.device)
    model.raw_cov.copy_(family.from_covariances(scatter + clamp * eye, weights))
    # where the floor acted: the scatter's own variance (after projection) was below clamp
    smallest = (family.variances_of(model.raw_cov) - clamp).amin(-1)  # (K',)
    acted = (smallest < clamp).nonzero()[:, 0].tolist()
    return [
        FitEvent(
            iteration,
            -1 if family.shared else c,
            "clamp",
            f"scatter variance {float(smallest[c]):.3g} below clamp {clamp:.3g}; the floor dominates",
        )
        for c in acted
    ]
