"""How a study picks and stops trials: the TPE sampler, the pruners, and per-worker sampler seeds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

PRUNERS = ("median", "hyperband", "none")

STARTUP_TRIALS = 10  # TPE's random trials before it models the objective


def make_sampler(seed: int, parallel: bool, batch: int = 1) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, grouped); `parallel`: other trials run meanwhile, so it lies about them (constant
    liar). With batches of B trials, the random start is min(10, B) trials: the first batch, not two batches
    of which the second would be random too (10 complete trials are needed before TPE models anything)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=min(STARTUP_TRIALS, batch) if batch > 1 else STARTUP_TRIALS,
            multivariate=True,
            group=True,
            constant_liar=parallel or batch > 1,
            seed=seed,
        )


PRUNE_MARGIN = 0.05  # nats: a trial is pruned only this far above the median of the others at the same step


class MarginPruner(optuna.pruners.BasePruner):
    """Median rule with a margin: prune a trial whose intermediate value at a step exceeds the median of the
    other trials' values at that step by more than `margin`, once `min_trials` finished trials reported
    there, and never before step `warmup_steps` (studies.objective reports after each dataset)."""

    def __init__(self, margin: float, min_trials: int = 5, warmup_steps: int = 1):
        self.margin, self.min_trials, self.warmup_steps = margin, min_trials, warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if step in t.intermediate_values and math.isfinite(t.intermediate_values[step])
        ]
        if len(others) < self.min_trials:
            return False
        return trial.intermediate_values[step] > float(np.median(others)) + self.margin


def make_pruner(name: str, settings) -> optuna.pruners.BasePruner:
    """Steps are datasets (see studies.objective): nothing is pruned before half of them are done."""
    num = len(settings.datasets)
    if name == "median":
        return MarginPruner(PRUNE_MARGIN, min_trials=5, warmup_steps=max(1, num // 2))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, num // 2), max_resource=num)
    return optuna.pruners.NopPruner()


def sampler_seed(seed: int, existing: int, worker: int) -> int:
    """Distinct per worker and per resumption, so a resumed study does not redraw its first random trials."""
    return int(np.random.SeedSequence([seed, existing, worker]).generate_state(1)[0])
