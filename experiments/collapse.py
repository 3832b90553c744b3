"""Whether a fit collapses: the protocol of the collapse benchmark, its measure, and the table of
`python -m experiments.datasets --collapse`.

    from experiments.collapse import COLLAPSE_PROTOCOL, measure_collapse
    m = measure_collapse("full-point-mass")      # 10 fit seeds, no MLflow
    m.rate, m.clamp_rate, m.runaway_rate         # shares of the seeds

A fit *collapses* (`CollapseMeasure`) when it records a clamp event, its NLL goes non-finite, or it *runs
away*: at a log point within the budget the smallest eigenvalue of a component's covariance is below
`RUNAWAY` (1e-4) x the smallest per-axis variance of the training data (a standard deviation at 1% of the
data's). Why variance is the measure of "the NLL runs away towards -inf": a component's log density at a
point is at most -1/2 (D log 2 pi + log det Sigma_k) <= -1/2 (D log 2 pi + log lambda_min + (D - 1) log
lambda_max), so the NLL can fall without bound only as some lambda_min -> 0 (the other eigenvalues are bounded
by the data's spread), and a term in log lambda_min is what it gains. Under Adam a component reaches the 1e-8
floor only where its mean's gradient is exactly zero (a point mass, a grid point); elsewhere Adam's steps of
about the learning rate keep the mean jittering and the variance stalls near the square of that jitter, yet it
still falls by 4 to 8 orders of magnitude (over-specified K, a full or tied covariance on a line), while the
controls stay above 3e-2 x the data's variance. The clamp would stop such a fit only at a higher floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import gmm

from .datasets import DATASETS, load_dataset

RUNAWAY = 1e-4  # a fit runs away once a covariance eigenvalue < this x the data's smallest per-axis variance


@dataclass(frozen=True)
class CollapseProtocol:
    """How a collapse dataset is shown to collapse: fits with resets off and the clamp at the low end of
    studies/space.yaml, for the studies' iteration budget, at a learning rate inside the search space.
    A fit *collapses* when it records a clamp event, its NLL goes non-finite, or it runs away (`RUNAWAY`)."""

    clamp: float = 1e-8  # the low end of the studies' clamp range
    component_lr: float = 0.1  # inside the studies' component_lr range (1e-3..3e-1)
    mixture_lr: float = 0.01
    iterations: int = 1000  # the studies' default budget (studies.run.DEFAULT_ITERATIONS)
    seeds: tuple[int, ...] = tuple(range(10))  # fit seeds (initialization)

    def fit_options(self, seed: int) -> dict:
        return {
            "num_iterations": self.iterations,
            "clamp": self.clamp,
            "component_lr": self.component_lr,
            "mixture_lr": self.mixture_lr,
            "reset": False,
            "seed": seed,
        }


COLLAPSE_PROTOCOL = CollapseProtocol()


def relative_min_variance(covariances: Tensor, train: Tensor) -> float:
    """The smallest eigenvalue of any of the (K, D, D) `covariances`, over the smallest per-axis variance of
    the (N, D) training points: below RUNAWAY the fit has run away (module docstring). 0 where rounding of a
    collapsed float32 covariance makes the eigenvalue negative."""
    smallest = max(float(torch.linalg.eigvalsh(covariances.double()).min()), 0.0)
    return smallest / float(train.double().var(0).min())


@dataclass(frozen=True)
class CollapseMeasure:
    """One dataset under a CollapseProtocol, per seed: the step of the first clamp event and the step of the
    first runaway log point (None: none), whether the NLL went non-finite, the smallest `relative_min_variance`
    over the fit's log points (NaN for a diverged fit), and the final validation NLL (NaN for a fit stopped
    early)."""

    name: str
    first_clamp: tuple[int | None, ...]
    diverged: tuple[bool, ...]
    val_nll: tuple[float, ...]
    first_runaway: tuple[int | None, ...]
    min_variance: tuple[float, ...]

    @property
    def clamped(self) -> tuple[bool, ...]:
        return tuple(c is not None for c in self.first_clamp)

    @property
    def ran_away(self) -> tuple[bool, ...]:
        return tuple(r is not None for r in self.first_runaway)

    @property
    def collapsed(self) -> tuple[bool, ...]:
        return tuple(any(x) for x in zip(self.clamped, self.diverged, self.ran_away, strict=True))

    @property
    def rate(self) -> float:
        """Share of seeds that collapsed (a clamp event, a non-finite NLL or a runaway)."""
        return _share(self.collapsed)

    @property
    def clamp_rate(self) -> float:
        """Share of seeds with a clamp event."""
        return _share(self.clamped)

    @property
    def runaway_rate(self) -> float:
        """Share of seeds that ran away (diverged fits count: their NLL went to -inf or NaN)."""
        return _share(tuple(r or d for r, d in zip(self.ran_away, self.diverged, strict=True)))


def _share(flags: tuple[bool, ...]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def measure_collapse(
    name: str, protocol: CollapseProtocol = COLLAPSE_PROTOCOL, *, stop_at_runaway: bool = False
) -> CollapseMeasure:
    """Fit the named dataset's model under `protocol`, once per seed (no MLflow; a few seconds). A fit stops at
    its first clamp event, which is all it has to show; with `stop_at_runaway` also at its first runaway (then
    a clamp that would have come later is not seen: a fast check of the runaway alone)."""
    ds = load_dataset(name)
    spec = ds.spec
    first, diverged, val, runaway, smallest = [], [], [], [], []
    for seed in protocol.seeds:
        model = gmm.make_model(spec.family, spec.fit_components, spec.num_dims)
        watch = _Watch(model, ds.train, stop_at_runaway)
        try:
            result = gmm.fit(model, ds.train, **protocol.fit_options(seed), callback=watch)
        except _Collapsed:
            result = model.fit_result_
        except FloatingPointError:
            first.append(None), diverged.append(True), val.append(float("nan"))
            runaway.append(watch.first_runaway), smallest.append(float("nan"))
            continue
        first.append(next((e.step for e in result.events if e.kind == "clamp"), None))
        diverged.append(False)
        val.append(model.nll(ds.val) if ds.val.shape[0] and result.completed else float("nan"))
        runaway.append(watch.first_runaway), smallest.append(watch.smallest)
    return CollapseMeasure(name, tuple(first), tuple(diverged), tuple(val), tuple(runaway), tuple(smallest))


class _Collapsed(Exception):
    """Raised by `stop_at_first_clamp` and `_Watch`: the fit has shown what it had to."""


def stop_at_first_clamp(step: int, nll: float, new_events: list) -> None:
    """A fit callback that ends the fit (raising) at the first log point after a clamp event."""
    if any(e.kind == "clamp" for e in new_events):
        raise _Collapsed(step)


class _Watch:
    """A fit callback: records the smallest relative variance and the first runaway log point, and ends the fit
    at the first clamp event (and at the first runaway, with `stop_at_runaway`)."""

    def __init__(self, model: gmm.MixtureModel, train: Tensor, stop_at_runaway: bool):
        self.model, self.train, self.stop_at_runaway = model, train, stop_at_runaway
        self.smallest, self.first_runaway = math.inf, None

    def __call__(self, step: int, nll: float, new_events: list) -> None:
        # the callback sees the model in data units
        self.smallest = min(self.smallest, relative_min_variance(self.model.covariances, self.train))
        if self.first_runaway is None and self.smallest < RUNAWAY:
            self.first_runaway = step
            if self.stop_at_runaway:
                raise _Collapsed(step)
        stop_at_first_clamp(step, nll, new_events)


def print_collapse(names: list[str]) -> int:
    """Measure each named dataset under COLLAPSE_PROTOCOL and print one row per dataset; returns 0."""
    p = COLLAPSE_PROTOCOL
    print(
        f"per dataset, over {len(p.seeds)} fit seeds (resets off, clamp {p.clamp:g}, component_lr {p.component_lr:g}, "
        f"mixture_lr {p.mixture_lr:g}, {p.iterations} steps): the share with a clamp event, the share that ran "
        f"away (a covariance eigenvalue < {RUNAWAY:g} x the data's smallest per-axis variance, or a non-finite "
        "NLL), the collapse rate (either), and the largest of the seeds' smallest relative variances"
    )
    print(f"{'dataset':30s} {'cause':13s} {'clamp':>6s} {'runaway':>8s} {'collapse':>9s}  {'max min var':>11s}  first clamp")
    for name in names:
        m = measure_collapse(name)
        steps = [c for c in m.first_clamp if c is not None]
        first = f"step {min(steps)}-{max(steps)}" if steps else "none"
        finite = [v for v in m.min_variance if math.isfinite(v)]
        worst = f"{max(finite):.1e}" if finite else "-"
        print(
            f"{name:30s} {DATASETS[name].cause:13s} {100 * m.clamp_rate:5.0f}% {100 * m.runaway_rate:7.0f}% "
            f"{100 * m.rate:8.0f}%  {worst:>11s}  {first}",
            flush=True,
        )
    return 0
