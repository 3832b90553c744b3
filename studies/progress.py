"""The progress of an invocation: a tqdm bar on a terminal, one log line per finished trial otherwise."""

from __future__ import annotations

import logging
import sys
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from .storage import OWNER_KEY

log = logging.getLogger(__name__)


class Progress:
    """tqdm bar of this invocation's finished trials and the study's best value (only on a terminal)."""

    def __init__(self, total: int, name: str, show: bool | None, start_number: int, owners: set[str] | None = None):
        from tqdm.auto import tqdm

        enabled = sys.stderr.isatty() if show is None else show
        self.bar = tqdm(total=total, desc=name, unit="trial", disable=not enabled, dynamic_ncols=True)
        self.start_number = start_number
        self.owners = owners  # "host:pid" of this invocation's processes; None: every new trial is ours
        self.done = 0
        self.total = total
        self.started = time.monotonic()
        self.logged: set[int] = set()  # trial numbers already logged (trials finish out of order)

    def mine(self, trial: FrozenTrial) -> bool:
        """Whether this invocation ran `trial` (other workers may add trials to the study meanwhile)."""

        if trial.number < self.start_number:
            return False
        return self.owners is None or trial.system_attrs.get(OWNER_KEY) in self.owners

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:  # an Optuna callback (in-process worker)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        mine = [t for t in trials if self.mine(t) and t.state.is_finished()]
        count = {s: sum(t.state == s for t in mine) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        values = [t.value for t in trials if t.state == TrialState.COMPLETE]
        if len(mine) > self.done:
            elapsed = time.monotonic() - self.started
            for t in sorted(mine, key=lambda t: t.number):
                if t.number not in self.logged:
                    self.logged.add(t.number)
                    k = len(self.logged)
                    left = time_left(elapsed, k, self.total)
                    log.info("%d/%d: trial %d %s%s", k, self.total, t.number, _outcome(t), left)
            self.bar.update(len(mine) - self.done)
            self.done = len(mine)
        self.bar.set_postfix(
            best=f"{min(values):.4f}" if values else "-",
            pruned=count[TrialState.PRUNED],
            failed=count[TrialState.FAIL],
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def time_left(elapsed: float, done: int, total: int) -> str:
    """ ", about 2 min left" from the mean time per finished trial so far (empty when done or unknown)."""
    if done >= total or done <= 0 or total <= 0:
        return ""
    left = elapsed / done * (total - done)
    return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


def _outcome(trial: FrozenTrial) -> str:
    """'complete: 3.8102', 'pruned at step 100 (...)', 'fail (reason)': a pruned trial's value is a partial
    objective, not comparable with complete ones, so it is not shown as one."""
    state = trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        return f"{state}: {trial.value:.4f}"
    reason = _reason(trial)
    if reason.startswith(state):
        return reason
    return f"{state} ({reason})" if reason else state


def _reason(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("prune_reason") or trial.user_attrs.get("fail_reason") or "")
