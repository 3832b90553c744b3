"""One start of `gmm.fit`: the loop of gmm.fitting's module docstring, as a small state class (`SingleFit`),
and the start every fit makes (`make_start`, shared with gmm.population)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .init import base_covariance, initialize
from .model import MixtureModel, parameter_tensors
from .options import FitOptions, lr_factor, progress_bar, use_quadratic
from .records import FitEvent, FitResult, NonFiniteNLLError, fit_warnings
from .recovery import Iterates, Recovery, copy_, on_clamp
from .standardize import Standardizer
from .steps import make_step
from .validation import make_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """What a fit's start fixes, besides the model's initial parameters (data units; mapped to z by the caller).

    Attributes:
        coords: the map to the standardized coordinates z; z: (N, D) the data in them.
        clamp: the variance floor in z (a float, or (D,) clamp / scale^2).
        reset_raw: (K, ...) the raw covariance a reset component gets, in z.
        min_mass: the collapse threshold on responsibility mass (`reset_min_mass`, default D + 1).
    """

    coords: Standardizer
    z: Tensor
    clamp: float | Tensor
    reset_raw: Tensor
    min_mass: float


def make_start(model: MixtureModel, x: Tensor, opts: FitOptions, g: torch.Generator, shared: dict | None = None) -> Start:
    """Initialize `model` on `x` (N, D) with `g`, floored in data units, and the coordinates and floors of the fit
    (`shared`: see gmm.init.initialize)."""
    k, d = model.num_components, model.num_dims
    initialize(model, x, opts.init, g, clamp=opts.clamp, init_radius=opts.init_radius, shared=shared)
    model.family.clamp_(model.raw_cov, opts.clamp)
    coords = Standardizer.of(x, model, opts.standardize)
    base = base_covariance(x, k, opts.clamp).to(model.device, model.dtype)
    reset_raw = model.family.from_covariances(base.expand(k, d, d))
    if not coords.identity and model.family.trainable:
        model.family.rescale_(reset_raw, coords.scale)
    min_mass = float(d + 1) if opts.reset_min_mass is None else opts.reset_min_mass
    # the floor in z: (D,) clamp / scale^2
    return Start(coords=coords, z=coords.data(x), clamp=coords.clamp(opts.clamp), reset_raw=reset_raw, min_mass=min_mass)


def full_nll(model: MixtureModel, x: Tensor) -> float:
    """The mean NLL of all of `x` (chunked over N, no gradients, accumulated in float64)."""
    return -model.score(x)


class SingleFit:
    """One start of `gmm.fit` on checked data `x` (N, D): `SingleFit(model, x, opts).run()` -> FitResult.

    NLLs are kept in z (the fit's coordinates); the data units' differ by the constant `shift`.
    """

    def __init__(self, model: MixtureModel, x: Tensor, opts: FitOptions):
        n, k, d = x.shape[0], model.num_components, model.num_dims
        self.model, self.x, self.opts = model, x, opts
        self.g = make_generator(None if opts.generator is not None else opts.seed, opts.generator)
        self.total = opts.num_iterations
        self.log_freq = opts.log_freq or max(1, self.total // 100)
        t0 = time.perf_counter()
        self.start = make_start(model, x, opts, self.g)
        self.coords, self.clamp, self.shift = self.start.coords, self.start.clamp, self.start.coords.log_det
        self.init_time = time.perf_counter() - t0
        self.stepper = make_step(model, self.start.z, opts, use_quadratic(opts, n, k, d), self.g, self.clamp)
        self.coords.to_standard_(model)
        model.family.clamp_(model.raw_cov, self.clamp)  # absorbs the rounding of the map
        self.history: list[float] = []  # NLLs in z
        self.events: list[FitEvent] = []
        self.reported = 0  # events already passed to the callback
        self.converged = False
        self.iterates = Iterates(parameter_tensors(model))
        self.best_nll, self.best_step = math.inf, 0
        self.lr_scale, self.rollbacks, self.last_reset = 1.0, 0, -1
        self.batched = self.stepper.batch_size is not None  # None also when batch_size >= N
        self.exact: float | None = None  # mini-batches: full-data NLL of the current parameters, from the last log point
        self.last_exact: float | None = None  # mini-batches: the previous log point's, for `tol` and spikes
        self.start_nll: float | None = None  # mini-batches: the start's exact NLL (history[0] is a batch's)
        self.spikes = opts.spike_threshold if opts.spike_threshold is not None else math.inf
        self.recovery = Recovery(model.family, model.raw_cov, self.clamp, self.shift)
        self.bar = None

    def run(self) -> FitResult:
        """The loop; the record, also stored as `model.fit_result_` (a partial one when it raises)."""
        self.bar = progress_bar(self.opts, self.total)
        self.t_start = time.perf_counter()
        try:
            if self.batched:  # the start is a candidate for the best iterate too
                self.best_nll = self.start_nll = self._exact_nll()
                self.iterates.save_best()
                self.recovery.measured(0, self.start_nll, self.events)
            step = 0
            for step in range(1, self.total + 1):
                if not self._step(step):
                    break
            wall, kept_step = self._finish(step)
        except BaseException:
            # keep what was recorded: the history up to the last finished step, and every event
            self.coords.to_data_(self.model, self.opts.clamp)
            self._record(False, time.perf_counter() - self.t_start)
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        self.coords.to_data_(self.model, self.opts.clamp)
        last = self.history[-1]
        final = last if self.coords.identity and kept_step == len(self.history) - 1 else full_nll(self.model, self.x)
        first = self.history[0] if self.start_nll is None else self.start_nll
        notes = fit_warnings(
            first + self.shift, last + self.shift, final, kept_step, self.rollbacks, self.lr_scale, self.opts, self.converged
        )
        return self._record(True, wall, final, notes, kept_step)

    def _step(self, step: int) -> bool:
        """Update `step` (1-based) and its bookkeeping; False when `tol` stops the fit."""
        opts, iterates = self.opts, self.iterates
        iterates.save()
        if not self.batched:  # this step's NLL is exact: of the parameters as they are now
            self.recovery.look()
        factor = lr_factor(opts.lr_schedule, step - 1, self.total) * self.lr_scale
        value = float(self.stepper.step(opts.mixture_lr * factor, opts.component_lr * factor))
        if self.exact is not None:  # the exact value replaces the batch estimate
            value, self.exact = self.exact, None
        if not math.isfinite(value):
            iterates.restore(iterates.previous)  # theta_(t-2): the last finite one
            raise NonFiniteNLLError(step - 1, value)
        history = self.history
        history.append(value)
        if not self.batched:
            self.recovery.measured(step - 1, value, self.events)
            if value < self.best_nll:
                iterates.best, self.best_nll, self.best_step = iterates.current, value, step - 1
            elif step >= 2 and value - history[-2] > self.spikes and self.last_reset != step - 1:
                self._on_spike(step - 1, history[-2], value)
        self._clamp(step)
        if not self.batched and opts.tol is not None and step >= 2 and abs(history[-1] - history[-2]) < opts.tol:
            self.converged = True
            return False
        return self._log_point(step) if step % self.log_freq == 0 else True

    def _clamp(self, step: int) -> None:
        """The variance floor after update `step`, its events, resets and recovery watches."""
        events = self.events
        seen = len(events)
        hit = self.stepper.clamp(self.clamp)
        s = self.start
        if hit is not None and on_clamp(
            self.model, s.z, self.stepper, step, *hit, self.opts, s.min_mass, self.g, s.reset_raw, events
        ):
            # the low NLLs before a reset came from the collapsing component: the best is sought afresh
            self.last_reset, self.best_nll, self.iterates.best = step, math.inf, -1
        if len(events) > seen:
            self.recovery.clamped(step, events[seen:])

    def _log_point(self, step: int) -> bool:
        """Every `log_freq` updates: (mini-batches) the exact NLL, then the log line, bar and callback. False when
        `tol` stops the fit (the closing callback reports this step)."""
        if self.batched:  # the full data's NLL after this update, recorded as the next history entry
            nll = self._measure(step)
            if nll is None:
                return False
        else:
            nll = self.history[-1]
        log.debug("step %d: nll %.6f", step, nll + self.shift)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(nll=f"{nll + self.shift:.4f}", refresh=False)
        if self.opts.callback is not None:
            self._show(step, nll)
        return True

    def _measure(self, step: int) -> float | None:
        """Mini-batches: the exact NLL at log point `step`: best iterate, spikes, recovery; None when `tol` is met."""
        nll = self.exact = self._exact_nll()
        if not math.isfinite(nll):
            self.iterates.restore(self.iterates.current)
            raise NonFiniteNLLError(step, nll)
        if nll < self.best_nll:
            self.iterates.save_best()
            self.best_nll, self.best_step = nll, step
        elif self.last_exact is not None and nll - self.last_exact > self.spikes and self.last_reset <= step - self.log_freq:
            if self._on_spike(step, self.last_exact, nll):
                nll = self.exact = self.best_nll  # the parameters are the best iterate's now
        self.recovery.look()
        self.recovery.measured(step, nll, self.events)
        tol = self.opts.tol
        if tol is not None and self.last_exact is not None and abs(nll - self.last_exact) < tol:
            self.converged = True
            return None
        self.last_exact = nll
        return nll

    def _finish(self, step: int) -> tuple[float, int]:
        """The exact NLL after the last update, the closing callback, keep_best. Returns (wall time, kept step)."""
        history = self.history
        last = self.exact if self.exact is not None else full_nll(self.model, self.start.z)  # in z
        if not math.isfinite(last):
            self.iterates.restore(self.iterates.current)
            raise NonFiniteNLLError(len(history), last)
        history.append(last)
        self.recovery.look()
        self.recovery.measured(len(history) - 1, last, self.events)
        pending = self.total % self.log_freq != 0 or self.converged or self.events[self.reported :]
        if self.opts.callback is not None and pending:
            self._show(step, last)
        wall = time.perf_counter() - self.t_start
        kept_step = len(history) - 1  # the iterate left in the model
        if last <= self.best_nll:
            self.best_nll, self.best_step = last, kept_step
        elif self.opts.keep_best:
            self.iterates.restore(self.iterates.best)
            kept_step = self.best_step
        return wall, kept_step

    def _on_spike(self, step: int, before: float, after: float) -> bool:
        """Log a spike; roll back when asked (gmm.fitting's module docstring). Returns whether it rolled back."""
        shift, opts = self.shift, self.opts
        jump = f"NLL {before + shift:.6g} -> {after + shift:.6g} (+{after - before:.3g} > {opts.spike_threshold:g})"
        rolled = opts.spike_rollback and self.iterates.restore(self.iterates.best)
        if rolled:
            self.stepper.restart()
            self.lr_scale *= 0.5
            self.rollbacks += 1
            jump += f"; rolled back to step {self.best_step} (NLL {self.best_nll + shift:.6g}), "
            jump += f"learning rates x{self.lr_scale:g}"
        self.events.append(FitEvent(step=step, component=-1, kind="spike", detail=jump))
        return rolled

    @contextmanager
    def _in_data_units(self) -> Iterator[None]:
        """The model in data units meanwhile (for the callback and exact NLLs), back in z afterwards: restored
        bit for bit, unless the parameters were changed meanwhile (by the callback), then mapped."""
        coords, params = self.coords, self.iterates.params
        if coords.identity:
            yield
            return
        saved = [p.clone() for p in params]
        coords.to_data_(self.model, self.opts.clamp)
        shown = [p.clone() for p in params]
        try:
            yield
        finally:
            if all(torch.equal(a, b) for a, b in zip(shown, params, strict=True)):
                copy_(params, saved)
            else:
                coords.to_standard_(self.model)

    def _show(self, step: int, nll: float) -> None:
        """The callback with the events it has not seen, the model in data units; `nll` in z."""
        new_events = self.events[self.reported :]
        with self._in_data_units():
            self.opts.callback(step, nll + self.shift, new_events)
        self.reported = len(self.events)

    def _exact_nll(self) -> float:
        """The full data's NLL of the current parameters, in z terms, computed in data units (so the callback
        sees exactly the NLL it would compute itself)."""
        with self._in_data_units():
            return full_nll(self.model, self.x) - self.shift

    def _record(
        self, completed: bool, wall: float, final: float | None = None, notes: tuple[str, ...] = (), kept_step: int = -1
    ) -> FitResult:
        """The FitResult so far; `final`: the data-unit NLL of the parameters left in the model, those of step
        `kept_step`."""
        history = self.history
        kept = torch.tensor(history, dtype=torch.float64) + self.shift
        if final is not None and 0 <= kept_step < len(history):
            kept[kept_step] = final  # computed on the data itself, after the map back
        if final is None:
            final = float(kept[-1]) if len(history) else float("nan")
        opts = self.opts
        result = FitResult(
            nll_history=kept,
            events=tuple(self.events),
            num_iterations=max(0, len(history) - 1),
            wall_time=wall,
            init_time=self.init_time,
            compile_time=self.stepper.compile_time,
            converged=self.converged,
            final_nll=final,
            options=opts,
            completed=completed,
            batch_size=self.stepper.batch_size,
            best_step=self.best_step,
            best_nll=float(kept[self.best_step]) if len(history) > self.best_step else float("nan"),
            warnings=notes,
            scale=self.coords.scale.detach().cpu(),
            seed=opts.seed if opts.generator is None else None,
        )
        self.model.fit_result_ = result
        return result
