"""The collapse rules of the fit loop (gmm.fitting's module docstring, items 2-4): clamp events, resets of
collapsed components, the recovery watch, and the parameter snapshots the loop rolls back to."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .model import MixtureModel
from .records import FitEvent
from .steps import Step

WORST_FRACTION = 0.1  # resets draw from this fraction of worst-explained points
RECOVERY_FLOOR_FACTOR = 2.0  # a clamped component has left the floor once every floored entry exceeds this x floor
RECOVERY_MARGIN = 0.05  # nats per sample: recovered once the NLL is back within this of its pre-collapse level


def copy_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """Copy `sources` into `targets` (detached tensors), one by one: for the rare copies (restores, restarts,
    callbacks); the per-step snapshot uses torch._foreach_copy_ (see Iterates.save)."""
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)


def clamp_events(step: int, clamped: Tensor, smallest: Tensor, clamp: float, shared: bool, member=None) -> list[FitEvent]:
    """One "clamp" event per component the floor touched (one, component -1, for a shared covariance);
    `smallest` is the smallest variance / floor ratio, so the events give the variance in the data's units."""
    return [clamp_event(step, c, float(smallest[c]), clamp, shared, member) for c in clamped.nonzero()[:, 0].tolist()]


def clamp_event(step: int, component: int, ratio: float, clamp: float, shared: bool, member=None) -> FitEvent:
    """The "clamp" event of one component whose smallest variance was `ratio` x the floor `clamp`."""
    detail = f"variance {ratio * clamp:.3g} raised to {clamp:.3g}"
    return FitEvent(step=step, component=-1 if shared else component, kind="clamp", detail=detail, member=member)


def collapsed_components(clamped: Tensor, mass: Tensor, min_mass: float, shared: bool) -> list[int]:
    """The collapsed components: touched by the clamp (all of them for a shared covariance) with a
    responsibility mass below `min_mass`."""
    touched = clamped.expand(mass.shape[-1]) if shared else clamped
    return (touched & (mass < min_mass)).nonzero()[:, 0].tolist()


def reset_events(step: int, components: list[int], rows: list[int], mass: Tensor, min_mass: float, member=None):
    """One "reset" event per collapsed component, naming the data row its mean moved to."""
    detail = "mass {:.3g} < {:.3g} on the floor; mean -> sample {}"
    return [
        FitEvent(step=step, component=c, kind="reset", detail=detail.format(float(mass[c]), min_mass, row), member=member)
        for c, row in zip(components, rows, strict=True)
    ]


def worst_rows(lp: Tensor, count: int, g: torch.Generator) -> Tensor:
    """`count` rows drawn with `g` from the WORST_FRACTION of rows with the lowest log density `lp` (N,)."""
    worst = lp.topk(max(count, math.ceil(WORST_FRACTION * lp.shape[0])), largest=False).indices
    return worst[torch.randperm(worst.shape[0], generator=g)[:count].to(worst.device)]


def on_clamp(model, x, stepper: Step, step, clamped, smallest, opts, min_mass, g, reset_raw, events) -> bool:
    """Record clamp events for the components touched and reset the collapsed ones; True if any was reset."""
    shared = model.family.shared
    events += clamp_events(step, clamped, smallest, opts.clamp, shared)
    if not opts.reset:
        return False
    mass = stepper.mass()
    collapsed = collapsed_components(clamped, mass, min_mass, shared)
    if not collapsed:
        return False
    rows = reset(model, x, collapsed, g, reset_raw)
    stepper.reset_moments(torch.tensor(collapsed, device=model.device))
    events += reset_events(step, collapsed, rows, mass, min_mass)
    return True


@torch.no_grad()
def reset(model: MixtureModel, x: Tensor, components: list[int], g: torch.Generator, reset_raw: Tensor) -> list[int]:
    """Reset `components` (gmm.fitting's module docstring, item 3); returns the data rows their means moved to."""
    rows = worst_rows(model.log_prob(x), len(components), g)
    idx = torch.tensor(components, device=x.device)
    model.locs[idx] = x[rows]
    model.logits[idx] = model.logits.mean()
    if model.family.trainable and not model.family.shared:
        model.raw_cov[idx] = reset_raw[idx]
    return rows.tolist()


class Iterates:
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
        # hot (every step): the private foreach op copies every parameter in one dispatch (tests/test_optim.py
        # fails loudly if it changes)
        torch._foreach_copy_(self.buffers[self.current], self.params)

    def save_best(self) -> None:
        """Copy the current parameters as the best iterate (mini-batch log points)."""
        index = self._free()
        copy_(self.buffers[index], self.params)
        self.best = index

    def restore(self, index: int) -> bool:
        if index < 0:
            return False
        copy_(self.params, self.buffers[index])
        return True


class Recovery:
    """Watches clamped components until they recover (gmm.fitting's module docstring, item 4) and records "recovered" events.

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
                events.append(FitEvent(step=index, component=c, kind="recovered", detail=detail, member=self.member))
        self.newest = nll
