"""The records of a fit: `FitEvent`, `FitResult`, and what a fit warns about or raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .options import FitOptions


@dataclass(frozen=True)
class FitEvent:
    """A clamp, reset, spike or recovery. `component` is -1 for a shared covariance and for spikes; `member` is
    the member index in a population fit (gmm.population), None for one model."""

    step: int
    component: int
    kind: str  # "clamp", "reset", "spike" or "recovered"
    detail: str
    member: int | None = None


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

    def count(self, kind: str) -> int:
        """The number of events of `kind` ("clamp", "reset", "spike" or "recovered")."""
        return sum(e.kind == kind for e in self.events)

    clamp_count = property(lambda self: self.count("clamp"))
    reset_count = property(lambda self: self.count("reset"))
    spike_count = property(lambda self: self.count("spike"))
    recovered_count = property(lambda self: self.count("recovered"))

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


def fit_warnings(start, last, final, best_step, rollbacks, lr_scale, opts: FitOptions, converged: bool) -> tuple[str, ...]:
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
