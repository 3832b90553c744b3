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
import warnings

import torch
from torch import Tensor

from .loop import SingleFit
from .model import MixtureModel, parameter_tensors
from .options import FitOptions, fit_keywords, intra_op_threads, make_options, same_options_as
from .population import fit_members, fit_population, start_population
from .records import ConvergenceWarning, FitResult, NonFiniteNLLError
from .recovery import copy_
from .validation import check_data, check_dtype_device, make_generator

log = logging.getLogger(__name__)


@same_options_as(fit_keywords)
def fit(model: MixtureModel, data, options: FitOptions | None = None, **overrides) -> FitResult:
    """Fit `model` to `data` (N, D) by Adam on the mean NLL. See `FitOptions` and the module docstring.

    Takes the keyword options of `gmm.options.fit_keywords` (every field of FitOptions, with its default); those
    given override `options`. An unknown keyword raises TypeError naming the closest option.

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
        return fit_population(model, data, options, **overrides)
    opts = make_options(options, **overrides)
    if opts.device is not None or opts.dtype is not None:
        model.to(device=opts.device, dtype=opts.dtype)
    check_dtype_device(model.dtype, model.device, "model")  # a model converted by hand with .to() too
    x = check_data(data, num_dims=model.num_dims, min_samples=model.num_components, dtype=model.dtype, device=model.device)
    n, k, d = x.shape[0], model.num_components, model.num_dims
    with intra_op_threads(opts, n * k * d * opts.n_init, x.device):
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
        copy_(parameter_tensors(model), parameter_tensors(one))
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
                copy_(parameter_tensors(model), best[2])
            model.fit_result_ = dataclasses.replace(model.fit_result_, start=i, starts=(*records, model.fit_result_))
            raise
        records.append(dataclasses.replace(result, start=i))
        if best is None or result.final_nll < best[0]:
            best = (result.final_nll, i, [p.clone() for p in parameter_tensors(model)])
    if best is None:
        model.fit_result_ = dataclasses.replace(model.fit_result_, starts=tuple(records))
        raise failure
    copy_(parameter_tensors(model), best[2])
    kept = records[best[1]]
    notes = kept.warnings
    failed = [r.start for r in records if not r.completed]
    if failed:
        notes += (f"start(s) {failed} of {opts.n_init} stopped on a non-finite NLL and were skipped",)
    kept = dataclasses.replace(kept, warnings=notes, starts=tuple(records))
    model.fit_result_ = kept
    return kept


def _fit(model: MixtureModel, x: Tensor, opts: FitOptions) -> FitResult:
    """One start (gmm.loop.SingleFit)."""
    return SingleFit(model, x, opts).run()
