"""Population fits: B independent mixtures of one family, K and D, fit by one batched Adam loop.

    model = gmm.make_model("full", 5, 2, batch_shape=(32,))
    nlls = model.fit(x, component_lr=[0.01] * 16 + [0.05] * 16, seed=list(range(32)))   # (32,) final NLLs
    model.fit_result_.members[3]        # member 3's FitResult: history, events, best iterate, warnings
    model.member(3)                     # member 3 as an ordinary model

At small sizes a step is bound by per-op overhead, not arithmetic (PERFORMANCE.md): one step over B
same-shaped mixtures costs about what one costs, so studies, restarts, seed reports and sweeps that fit many
same-shaped models gain nearly a factor B.

Each member follows the rules of `gmm.fit` (gmm.fitting's module docstring) exactly, on its own: its own start from its
own seed, standardized coordinates of its own data, Adam moments and step count, clamp floor, clamp events,
collapse resets drawn with its own generator, recovery watch, best iterate, spike rollback with its own
learning-rate halving, and `tol`. Member i's record equals the record of `gmm.fit` on `model.member(i)` with
member i's options, up to rounding (tests/test_population.py compares float64 histories to 1e-10).

What differs from one fit:
- options in `PER_MEMBER` take a scalar (all members) or a sequence of B values; the others are shared;
- data is (N, D), shared by every member, or (B, N, D), one data set per member;
- a member whose NLL becomes non-finite stops alone (its record says why, in `stop_reason`; the model keeps its
  last finite parameters), and a member that reaches `tol` stops alone; a stopped member no longer changes;
- the callback is `callback(step, nlls, new_events)` with `nlls` the B members' NLLs (data units; NaN once a
  member has stopped) and events carrying their `member`; it may return member indices to stop (pruning);
  changes it makes to the parameters are discarded (unlike one fit's callback);
- not supported yet, each with a clear error: mini-batches (`batch_size`), `gradients="analytic"`, `compile`,
  the quadratic path, `n_init`, a `generator` (pass per-member seeds).
The fit chunks over N so that B x N x K x D never sits in memory at once.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import likelihood
from .loop import make_start
from .model import MixtureModel, check_batch_data, parameter_tensors
from .options import PER_MEMBER, FitOptions, intra_op_threads, lr_factor, member_options, progress_bar
from .records import ConvergenceWarning, FitEvent, FitResult, NonFiniteNLLError, fit_warnings
from .recovery import RECOVERY_FLOOR_FACTOR, Recovery, clamp_event, copy_, reset_events, worst_rows
from .standardize import Standardizer
from .steps import PopulationStep
from .validation import make_generator

__all__ = ["PER_MEMBER", "PopulationResult", "fit_members", "fit_population", "start_population"]


@dataclass(frozen=True)
class PopulationResult:
    """The record of a population fit: one FitResult per member, in member order.

    Attributes:
        members: (B,) FitResults; member i's `events` carry `member == i`.
        wall_time: seconds in the batched loop (init excluded); init_time: seconds initializing all members.
    """

    members: tuple[FitResult, ...]
    wall_time: float
    init_time: float = 0.0
    errors: tuple[NonFiniteNLLError | None, ...] = field(default=(), repr=False)  # per member, None if none

    @property
    def final_nll(self) -> Tensor:
        """(B,) float64: each member's final NLL (NaN where a member stopped on a non-finite NLL)."""
        return torch.tensor([r.final_nll for r in self.members], dtype=torch.float64)

    @property
    def completed(self) -> bool:
        return all(r.completed for r in self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> FitResult:
        return self.members[index]

    def __iter__(self):
        return iter(self.members)


def fit_population(model: MixtureModel, data, options: FitOptions | None = None, **overrides) -> PopulationResult:
    """Fit every member of a batched `model` (batch_shape (B,)) by one batched Adam loop; see the module docstring.

    Returns:
        The PopulationResult, also stored as `model.fit_result_` (partial, members with `completed=False`,
        when the fit raises, e.g. on KeyboardInterrupt or an exception from the callback).

    Raises:
        ValueError / TypeError: bad data or options (a sequence of the wrong length, an option that is shared).

    Warns:
        ConvergenceWarning: per member, as `gmm.fit` does (the message names the member).
    """
    if not model.batch_shape:
        raise ValueError("fit_population needs a batched model (batch_shape=(B,)); use gmm.fit for one mixture")
    num_members = model.num_members
    opts = member_options(num_members, options, overrides)
    if opts[0].device is not None or opts[0].dtype is not None:
        model.to(device=opts[0].device, dtype=opts[0].dtype)
    x = check_batch_data(data, num_members, model.num_dims, model.dtype, model.device, min_samples=model.num_components)
    n, k, d = x.shape[1], model.num_components, model.num_dims
    with intra_op_threads(opts[0], num_members * n * k * d, x.device):
        result = fit_members(model, x, opts)
    for i, member in enumerate(result.members):
        for message in member.warnings:
            warnings.warn(f"member {i}: {message}", ConvergenceWarning, stacklevel=3)  # the caller of gmm.fit
    return result


def fit_members(model: MixtureModel, x: Tensor, opts: list[FitOptions]) -> PopulationResult:
    """The population loop on checked data x (1 or B, N, D) with one FitOptions per member; no warnings issued
    (gmm.fit's restarts keep only the kept start's)."""
    return _Population(model, x, opts).run()


# -- one member's bookkeeping -------------------------------------------------------------------------------
@dataclass
class _Member:
    """The state `gmm.fit` keeps for one fit, for member `index` of a population."""

    index: int
    opts: FitOptions
    x: Tensor  # (N, D) data units
    z: Tensor  # (N, D) its standardized coordinates
    coords: Standardizer
    g: torch.Generator
    clamp: float | Tensor  # the floor in z
    reset_raw: Tensor
    min_mass: float
    recovery: Recovery
    history: list[float] = field(default_factory=list)
    events: list[FitEvent] = field(default_factory=list)
    best_nll: float = math.inf
    best_step: int = 0
    has_best: bool = False
    lr_scale: float = 1.0
    rollbacks: int = 0
    last_reset: int = -1
    converged: bool = False
    stop_reason: str = ""
    failed: bool = False  # stopped on a non-finite NLL
    error: NonFiniteNLLError | None = None
    reported: int = 0

    @property
    def running(self) -> bool:
        return not self.stop_reason

    @property
    def shift(self) -> float:
        return self.coords.log_det


class _Population:
    """One population fit: setup per member, the batched loop, the records. See the module docstring."""

    def __init__(self, model: MixtureModel, x: Tensor, opts: list[FitOptions]):
        self.model, self.x, self.opts = model, x, opts
        self.total = opts[0].num_iterations
        self.log_freq = opts[0].log_freq or max(1, self.total // 100)
        self.callback: Callable | None = opts[0].callback
        self.params = parameter_tensors(model)

    # -- setup ------------------------------------------------------------------------------------------
    def _data_index(self, i: int) -> int:
        """Member i's row of the data (1 or B, N, D)."""
        return i if self.x.shape[0] > 1 else 0

    def _setup_member(self, i: int, shared: dict | None) -> tuple[_Member, MixtureModel]:
        """Member i's start, coordinates and floors, exactly as gmm.fit makes them for one model (`shared`: the
        k-means runs of members on its data and seed, gmm.init.initialize)."""
        opts, model = self.opts[i], self.model
        x = self.x[self._data_index(i)]
        one = model.member(i)
        g = make_generator(opts.seed)
        start = make_start(one, x, opts, g, shared)
        start.coords.to_standard_(one)
        one.family.clamp_(one.raw_cov, start.clamp)  # written into the batch once every member is set up (run)
        recovery = Recovery(model.family, model.raw_cov.detach()[i], start.clamp, start.coords.log_det, member=i)
        member = _Member(
            index=i, opts=opts, x=x, z=start.z, coords=start.coords, g=g, clamp=start.clamp, reset_raw=start.reset_raw,
            min_mass=start.min_mass, recovery=recovery,
        )  # fmt: skip
        return member, one

    def _floor(self, members: list[_Member]) -> Tensor:
        """(B, 1, D) variance floors in z, broadcasting against the floored entries."""
        d = self.model.num_dims
        return torch.stack(
            [torch.as_tensor(m.clamp, dtype=self.model.dtype, device=self.model.device).expand(d) for m in members]
        ).unsqueeze(1)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> PopulationResult:
        model = self.model
        t0 = time.perf_counter()
        # every member's start on its own copy first: an error or Ctrl-C here leaves the model as it was
        # members on the same data with the same seed make their k-means runs once (gmm.init); a seed alone keeps none
        keys = [(self._data_index(i), opts.seed) for i, opts in enumerate(self.opts)]
        repeats = collections.Counter(keys)
        shared: dict = {}
        try:
            setups = [self._setup_member(i, shared if repeats[key] > 1 else None) for i, key in enumerate(keys)]
        finally:
            shared.clear()
        self.members, self.ones = zip(*setups, strict=True)
        for i, one in enumerate(self.ones):
            model.set_member(i, one)
        same = all(m.z is self.members[0].z or torch.equal(m.z, self.members[0].z) for m in self.members)
        z = self.members[0].z[None] if same else torch.stack([m.z for m in self.members])
        self.clamp = self._floor(self.members)
        self.init_time = time.perf_counter() - t0
        self.stepper = PopulationStep(model, z)
        self.min_mass = torch.tensor([[m.min_mass] for m in self.members], dtype=model.dtype, device=model.device)
        self.resets = torch.tensor([[m.opts.reset] for m in self.members], device=model.device)  # (B, 1)
        # each member's recovery threshold in raw units, as its Recovery makes it, stacked to (B, 1, m)
        view = self.stepper.floor_view
        above = [model.family.raw_floor(RECOVERY_FLOOR_FACTOR * m.clamp) for m in self.members]
        self.above = torch.stack([torch.as_tensor(a, dtype=view.dtype).expand(view.shape[-1]) for a in above]).unsqueeze(1)
        self.z = z
        dev = model.device
        self.base_mixture = torch.tensor([m.opts.mixture_lr for m in self.members], dtype=torch.float64, device=dev)
        self.base_component = torch.tensor([m.opts.component_lr for m in self.members], dtype=torch.float64, device=dev)
        # theta_(t-1), theta_(t-2); both the start at first, so a member whose very first NLL is non-finite
        # is frozen at its start
        self.buffers = [[p.clone() for p in self.params] for _ in range(2)]
        self.best = [p.clone() for p in self.params]
        self.cur, self.prev = 0, 1
        self.frozen: dict[int, list[Tensor]] = {}  # failed members' parameters
        bar = progress_bar(self.opts[0], self.total)
        start = time.perf_counter()
        step = 0
        try:
            for step in range(1, self.total + 1):
                if not self._step(step, bar):
                    break
            self._finish(step)
        except BaseException:
            self.wall = time.perf_counter() - start
            self._records(completed=False)
            raise
        finally:
            if bar is not None:
                bar.close()
        self.wall = time.perf_counter() - start
        return self._records(completed=True)

    def _lrs(self) -> tuple[Tensor, Tensor]:
        factors = torch.tensor(
            [
                lr_factor(m.opts.lr_schedule, self._step_index, self.total) * m.lr_scale if m.running else 0.0
                for m in self.members
            ],
            dtype=torch.float64,
            device=self.model.device,
        )
        return self.base_mixture * factors, self.base_component * factors

    def _step(self, step: int, bar) -> bool:
        """Step `step` for every running member; False once none runs."""
        members = self.members
        self.cur, self.prev = self.prev, self.cur
        # theta_(step-1), the parameters this step scores; hot (every step): one dispatch (gmm.recovery.Iterates.save)
        torch._foreach_copy_(self.buffers[self.cur], self.params)
        self._look()
        self._step_index = step - 1
        values = self.stepper.step(*self._lrs()).tolist()
        for i, frozen in self.frozen.items():  # a failed member's gradient may be NaN: its parameters stay put
            self._restore(i, frozen)
        improved = [m.index for m in members if m.running and self._track(m, step, values[m.index])]
        if len(improved) == len(members):  # every member (early in a fit, most steps): one dispatch
            torch._foreach_copy_(self.best, self.buffers[self.cur])
        elif improved:
            rows = torch.tensor(improved, device=self.model.device)
            for best, current in zip(self.best, self.buffers[self.cur], strict=True):
                best[rows] = current[rows]
        self._clamp(step)
        for m in members:
            tol = m.opts.tol
            if m.running and tol is not None and step >= 2 and abs(m.history[-1] - m.history[-2]) < tol:
                m.converged = True
                self._stop(m, f"converged: |NLL change| < tol={tol:g} at step {step}")
        if step % self.log_freq == 0:
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(running=sum(m.running for m in members), refresh=False)
            if self.callback is not None:
                self._show(step, [m.history[-1] if m.running else math.nan for m in members])
        return any(m.running for m in members)

    def _track(self, m: _Member, step: int, value: float) -> bool:
        """Member m's NLL at update `step` (of theta_(step-1)): a non-finite one stops it; else its history,
        recovery watch, best iterate and spike rule. True when it is m's best so far."""
        if not math.isfinite(value):
            self._restore(m.index, self.buffers[self.prev])  # theta_(step-2): the last finite one
            m.failed = True
            self.frozen[m.index] = [p.clone() for p in self.params]
            m.error = NonFiniteNLLError(step - 1, value)
            self._stop(m, str(m.error))
            return False
        m.history.append(value)
        m.recovery.measured(step - 1, value, m.events)
        if value < m.best_nll:
            m.best_nll, m.best_step, m.has_best = value, step - 1, True
            return True
        if step >= 2 and value - m.history[-2] > _spikes(m.opts) and m.last_reset != step - 1:
            self._on_spike(m, step - 1, m.history[-2], value)
        return False

    def _look(self) -> None:
        """Every watching member's Recovery.look, from one comparison over the batch (the same entries and
        thresholds as each member's own)."""
        watching = [m for m in self.members if m.running and m.recovery.watched]
        if watching:
            off = (self.stepper.floor_view > self.above).all(-1).tolist()  # (B, K')
            for m in watching:
                m.recovery.off = off[m.index]

    def _clamp(self, step: int) -> None:
        """The variance floor after update `step`: every member's clamp events, resets and recovery watches
        (gmm.recovery.on_clamp per member, with one pass over the batch's tensors)."""
        hit = self.stepper.clamp(self.clamp)
        if hit is None:
            return
        clamped, smallest = hit  # (B, K')
        running = torch.tensor([[m.running] for m in self.members], device=clamped.device)
        acting = clamped & running  # a stopped member's entries are floored but it records nothing more
        pairs = acting.nonzero().tolist()
        if not pairs:
            return
        ratios = smallest[acting].tolist()
        shared = self.model.family.shared
        new: dict[int, list[FitEvent]] = {}
        for (i, c), ratio in zip(pairs, ratios, strict=True):
            new.setdefault(i, []).append(clamp_event(step, c, ratio, self.members[i].opts.clamp, shared, member=i))
        collapsed: dict[int, list[int]] = {}
        mass = None
        if any(self.members[i].opts.reset for i in new):
            mass = self.stepper.mass()  # (B, K)
            touched = acting.expand_as(mass) if shared else acting
            for i, c in (touched & self.resets & (mass < self.min_mass)).nonzero().tolist():
                collapsed.setdefault(i, []).append(c)
        for i, events in new.items():
            m = self.members[i]
            m.events += events
            if i in collapsed:
                rows = self._reset(m, collapsed[i])
                self.stepper.reset_moments(torch.tensor(collapsed[i], device=self.model.device), i)
                resets = reset_events(step, collapsed[i], rows, mass[i], m.min_mass, member=i)
                m.events += resets
                events = events + resets
                m.last_reset, m.best_nll, m.has_best = step, math.inf, False
            m.recovery.clamped(step, events)

    def _finish(self, step: int) -> None:
        """The exact NLL after the last update for every member that did not fail; keep_best; the last callback."""
        lasts = self.stepper.nll().tolist()
        for m in self.members:
            if m.failed:
                continue
            last = lasts[m.index]
            if not math.isfinite(last):
                self._restore(m.index, self.buffers[self.cur])
                m.failed = True
                m.error = NonFiniteNLLError(len(m.history), last)
                m.stop_reason = str(m.error)
                continue
            m.history.append(last)
            m.recovery.look()
            m.recovery.measured(len(m.history) - 1, last, m.events)
        pending = any(len(m.events) > m.reported or m.converged for m in self.members)
        if self.callback is not None and (self.total % self.log_freq != 0 or pending):
            self._show(step, [lasts[m.index] if not m.failed else math.nan for m in self.members])
        for m in self.members:
            if m.failed:
                continue
            m.kept_step = len(m.history) - 1
            last = m.history[-1]
            if last <= m.best_nll:
                m.best_nll, m.best_step = last, m.kept_step
            elif m.opts.keep_best and m.has_best:
                self._restore(m.index, self.best)
                m.kept_step = m.best_step

    # -- per-member actions -----------------------------------------------------------------------------
    def _restore(self, i: int, source: list[Tensor]) -> None:
        for p, s in zip(self.params, source, strict=True):
            p[i] = s[i]

    def _stop(self, m: _Member, reason: str) -> None:
        """Member m no longer changes: learning rate 0 (see _lrs) and zeroed moments (a NaN gradient of a failed
        member must not reach its parameters through them)."""
        m.stop_reason = reason
        self.stepper.restart(m.index)

    def _on_spike(self, m: _Member, step: int, before: float, after: float) -> None:
        shift, opts = m.shift, m.opts
        jump = f"NLL {before + shift:.6g} -> {after + shift:.6g} (+{after - before:.3g} > {opts.spike_threshold:g})"
        if opts.spike_rollback and m.has_best:
            self._restore(m.index, self.best)
            self.stepper.restart(m.index)
            m.lr_scale *= 0.5
            m.rollbacks += 1
            jump += f"; rolled back to step {m.best_step} (NLL {m.best_nll + shift:.6g}), learning rates x{m.lr_scale:g}"
        m.events.append(FitEvent(step=step, component=-1, kind="spike", detail=jump, member=m.index))

    @torch.no_grad()
    def _reset(self, m: _Member, components: list[int]) -> list[int]:
        """gmm.recovery.reset for member m: means to points drawn from its worst-explained 10%."""
        model, i, z = self.model, m.index, m.z
        cov = model.family.covariance(model.raw_cov[i : i + 1])
        lp = likelihood.batched_log_prob(z[None], model.logits[i : i + 1], model.locs[i : i + 1], cov)[0]
        rows = worst_rows(lp, len(components), m.g)
        idx = torch.tensor(components, device=z.device)
        model.locs[i, idx] = z[rows]
        model.logits[i, idx] = model.logits[i].mean()
        if model.family.trainable and not model.family.shared:
            model.raw_cov[i, idx] = m.reset_raw[idx]
        return rows.tolist()

    # -- data units -------------------------------------------------------------------------------------
    def _to_data(self, i: int) -> MixtureModel:
        """Member i's current parameters mapped to data units, in its unbatched model (the batch is unchanged)."""
        one, m = self.ones[i], self.members[i]
        with torch.no_grad():
            for mine, their in zip(self.params, parameter_tensors(one), strict=True):
                their.copy_(mine[i])
        m.coords.to_data_(one, m.opts.clamp)
        return one

    def _show(self, step: int, nlls: list[float]) -> None:
        """The callback, with the batched model in data units meanwhile; members it returns are stopped."""
        saved = [p.clone() for p in self.params]
        for i in range(len(self.members)):
            self.model.set_member(i, self._to_data(i))
        new = [e for m in self.members for e in m.events[m.reported :]]
        for m in self.members:
            m.reported = len(m.events)
        try:
            shown = [v + m.shift for v, m in zip(nlls, self.members, strict=True)]
            stop = self.callback(step, shown, new)
        finally:
            copy_(self.params, saved)
        for i in stop or ():
            m = self.members[int(i)]
            if m.running:
                self._stop(m, f"stopped by the callback at step {step}")

    def _records(self, completed: bool) -> PopulationResult:
        """Every member's FitResult; the batched model left in data units."""
        results = []
        for m in self.members:
            one = self._to_data(m.index)
            kept = torch.tensor(m.history, dtype=torch.float64) + m.shift
            finished = completed and not m.failed
            final = float("nan")
            notes: tuple[str, ...] = ()
            if finished:
                last = float(kept[-1])
                final = last if m.coords.identity and m.kept_step == len(m.history) - 1 else one.nll(m.x)
                kept[m.kept_step] = final  # computed on the data itself, after the map back
                first = m.history[0] + m.shift
                notes = fit_warnings(first, last, final, m.kept_step, m.rollbacks, m.lr_scale, m.opts, m.converged)
            elif len(kept):
                final = float(kept[-1])
            result = FitResult(
                nll_history=kept, events=tuple(m.events), num_iterations=max(0, len(m.history) - 1),
                wall_time=self.wall, init_time=self.init_time, compile_time=0.0, converged=m.converged,
                final_nll=final, options=m.opts, completed=finished, batch_size=None, best_step=m.best_step,
                best_nll=float(kept[m.best_step]) if len(kept) > m.best_step else float("nan"),
                warnings=notes, scale=m.coords.scale.detach().cpu(), seed=m.opts.seed, stop_reason=m.stop_reason,
            )  # fmt: skip
            one.fit_result_ = result
            self.model.set_member(m.index, one)
            results.append(result)
        errors = tuple(m.error for m in self.members)
        out = PopulationResult(members=tuple(results), wall_time=self.wall, init_time=self.init_time, errors=errors)
        self.model.fit_result_ = out
        return out


def _spikes(opts: FitOptions) -> float:
    return opts.spike_threshold if opts.spike_threshold is not None else math.inf


def start_population(model: MixtureModel, num_members: int) -> MixtureModel:
    """A batched model of `num_members` copies of an unbatched `model` (for restarts)."""
    out = type(model)(
        model.num_components, model.num_dims, model.family.name, variance=model.variance, dtype=model.dtype,
        device=model.device, batch_shape=(num_members,),
    )  # fmt: skip
    for i in range(num_members):
        out.set_member(i, model)
    return out
