"""The study objective: one trial = one fit per dataset of the family, scored by the mean validation NLL.

Training NLL rewards collapse (a component shrinking onto duplicated points drives it down without bound);
validation NLL punishes it, so the objective is the validation NLL averaged over the family's datasets.

Every fit is a population fit (experiments.population.run_population; `run_experiment` for options a population
cannot batch), nested in MLflow as
    study invocation (parent run) > trial run (params, final metrics) > one run per dataset (curves, events).
With `--batch B` (`Objective.run_batch`) B trials run together: per dataset, the trials still running are one
population; with `--batch 1` each trial's fits are populations of one. A member's arithmetic does not depend on
B, so a trial's value is the same in either (tests/test_study_e2e.py checks it).
Pruning compares like with like: after the i-th dataset's fit the trial reports, at step i (1-based), the
mean final validation NLL of its first i datasets. Every trial fits the same datasets in the same order, so
at a given step all reported values average the same datasets; a value inside a fit (where the first
steps of a fast and a slow learning rate differ by noise) is never reported. A pruned trial's runs end
FINISHED with a tag "pruned" saying after which dataset (KILLED is kept for interrupts), and the trial
becomes optuna.TrialPruned; a fit whose NLL goes non-finite or whose linear algebra fails raises
`TrialFailed` (runs end FAILED), which the study catches, recording the reason in the trial's user
attribute "fail_reason".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import optuna
import torch
from mlflow.entities import Metric
from optuna.trial import TrialState

from experiments.config import ExperimentConfig
from experiments.run import StopRun, run_experiment
from experiments.tracking import history_metrics, log_metrics_batched, log_params, real_run_id, tracked_run

from .space import SearchSpace
from .storage import worker_tag

log = logging.getLogger(__name__)

WORKER_TAG = "studies.worker"  # MLflow tag "<host>:<pid>" of the process that owns a run (orphan clean-up)


class TrialFailed(Exception):
    """A trial's fit diverged (non-finite NLL, failed factorization); the study records it and goes on."""


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines what a study's trials measure; a resumed study must keep it unchanged.

    Attributes:
        family: the covariance family fitted (and the family that generated the datasets).
        datasets: names in experiments.datasets.DATASETS, fitted in this order by every trial.
        space: the search space (studies/space.yaml, maybe overridden).
        iterations: Adam steps per fit.
        eval_every: steps between validation NLLs of a fit (logged as curves; a non-finite one fails the trial).
        seed: fit seed (initialization and resets), the same for every trial: trials differ only in params.
        log_every: step of the training-NLL curve each dataset run logs to MLflow.
        fingerprints: {dataset: sha256} of the data the study was started on.
        data: for a study of your own data file, the ExperimentConfig fields that load it (data_file,
            columns, standardize, components, data_seed); `datasets` then holds the file's name. Empty for
            the named datasets.
    """

    family: str
    datasets: tuple[str, ...]
    space: SearchSpace
    iterations: int = 1000
    eval_every: int = 50
    seed: int = 42
    log_every: int = 10
    fingerprints: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def config(self, dataset: str, overrides: dict) -> ExperimentConfig:
        """The ExperimentConfig of one fit of a trial: study settings, then the trial's `overrides`."""
        source = dict(self.data) if self.data else {"dataset": dataset}
        base = ExperimentConfig(
            **source,
            family=self.family,
            iterations=self.iterations,
            eval_every=self.eval_every,
            seed=self.seed,
            log_every=self.log_every,
            log_figures=False,  # figures per trial fit cost more than the fit; the study logs its own plots
            log_model=False,
        )
        return base.replace(**overrides)

    @classmethod
    def from_dict(cls, d: dict) -> StudySettings:
        """The settings a study recorded (`as_dict`), e.g. for a worker joining it from another machine.

        Raises:
            ValueError: a record that is not an `as_dict` of this version (the message names the key).
        """
        from .space import SearchSpace, make_param

        try:
            family, space = d["family"], d["space"]
            params = tuple(make_param(name, entry) for name, entry in space["params"].items())
            return cls(
                family=family,
                datasets=tuple(d["datasets"]),
                space=SearchSpace(family, params, dict(space.get("fixed") or {})),
                iterations=int(d["iterations"]),
                eval_every=int(d["eval_every"]),
                seed=int(d["seed"]),
                fingerprints=dict(d.get("fingerprints") or {}),
                data=dict(d.get("data") or {}),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the study's recorded settings are incomplete or malformed ({e!r})") from None

    def as_dict(self) -> dict:
        """JSON-able; stored as the study's user attribute "settings" and checked on resume."""
        return {
            "family": self.family,
            "datasets": list(self.datasets),
            "space": self.space.as_dict(),
            "iterations": self.iterations,
            "eval_every": self.eval_every,
            "seed": self.seed,
            "fingerprints": dict(self.fingerprints),
            **({"data": dict(self.data)} if self.data else {}),  # absent for named datasets, as recorded before
        }


class Objective:
    """Callable objective for `study.optimize`: returns the mean validation NLL of the trial's fits.

    Args:
        settings: the study's settings.
        tracking_uri: MLflow tracking URI (see experiments.tracking.resolve_tracking_uri).
        experiment_name: MLflow experiment of the study's runs.
        parent_run_id: the study invocation's MLflow run; trial runs nest under it.
        study_name: recorded as a tag on every run.
    """

    def __init__(
        self,
        settings: StudySettings,
        tracking_uri: str,
        experiment_name: str,
        parent_run_id: str | None = None,
        study_name: str | None = None,
    ):
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self.study_name = study_name

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.settings
        overrides = s.space.suggest(trial)
        configs = [s.config(name, overrides) for name in s.datasets]  # fails fast on a bad override
        tags = self._tags(trial)
        state = _TrialState(trial, s.iterations, len(s.datasets))
        start = time.perf_counter()
        try:
            with tracked_run(
                self.tracking_uri,
                self.experiment_name,
                run_name=f"trial {trial.number}",
                parent_run_id=self.parent_run_id,
                tags={**tags, "kind": "trial"},
            ) as (client, run_id):
                state.run = (client, run_id)
                state.link(wait=False)
                log_params(client, run_id, {**trial.params, **overrides, "datasets": ",".join(s.datasets)})
                try:
                    for i, (name, config) in enumerate(zip(s.datasets, configs, strict=True)):
                        state.begin(i, name)
                        try:
                            fit_tags = {**tags, "dataset": name}
                            result = self._fit(config, run_id, f"trial {trial.number} {name}", fit_tags, state)
                        except (FloatingPointError, torch.linalg.LinAlgError) as e:
                            raise StopRun(f"{name}: {e}", status="FAILED") from e
                        state.end(name, result)
                        state.link()  # made by now, unless the store lags a whole fit
                        state.report(i + 1)
                finally:
                    state.wall_time = time.perf_counter() - start
                    state.record(client, run_id)
        except StopRun as e:
            reason = str(getattr(e, "reason", e))
            if state.pruned:
                trial.set_user_attr("prune_reason", reason)
                raise optuna.TrialPruned(reason) from None
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from None
        if not math.isfinite(state.value):
            reason = f"the mean validation NLL is {state.value}"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        return state.value

    def _tags(self, trial: optuna.Trial) -> dict[str, str]:
        """The MLflow tags of a trial's runs (its trial run and its fits add "kind" and "dataset")."""
        return {
            "study": self.study_name or "",
            "trial": str(trial.number),
            "family": self.settings.family,
            WORKER_TAG: worker_tag(),
        }

    def _fit(self, config: ExperimentConfig, parent: str, name: str, tags: dict, state: _TrialState):
        """One trial's fit of one dataset, as a population of one when the config batches: the arithmetic of
        `run_batch`, so a trial's value does not depend on `--batch` (a member's numbers do not depend on B,
        while the unbatched fit rounds otherwise, and collapsing fits can end apart); `run_experiment` else."""
        from experiments.population import population_options, run_population

        kwargs = {"parent_run_id": parent, "run_name": name, "tags": {**tags, "kind": "fit"}, "on_eval": state.on_eval}
        try:
            population_options([config])
        except ValueError:
            return run_experiment(config, self.tracking_uri, self.experiment_name, **kwargs)
        (outcome,) = run_population(
            [config], self.tracking_uri, self.experiment_name, parent_run_ids=parent, run_names=[name],
            tags=[kwargs["tags"]], on_eval=lambda _, step, value: state.on_eval(step, value),
        )  # fmt: skip
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # opens the batch's trial runs by hand and ends each with its own outcome, on success and on an interrupt
    def run_batch(self, trials: list[optuna.Trial]) -> list[tuple[TrialState, float | None]]:
        """Run `trials` together (`--batch`): per dataset, the trials still running are fit as one population
        (experiments.population: one batched fit, one MLflow run per trial and dataset, as `__call__` logs
        them); after each dataset every trial reports and may be pruned, exactly as in `__call__`.

        Returns:
            Per trial, (state, value) for `study.tell`: COMPLETE with the mean validation NLL, PRUNED, or
            FAIL (the reason in the trial's user attribute, as `__call__` records it).
        """
        import sys

        from experiments.population import population_options

        s = self.settings
        overrides = [s.space.suggest(t) for t in trials]
        configs = [[s.config(name, ov) for name in s.datasets] for ov in overrides]
        try:
            for i in range(len(s.datasets)):
                population_options([c[i] for c in configs])
        except ValueError:  # the space searches an option a population shares: one trial after the other
            return [_told(lambda t=t: self(t)) for t in trials]
        tags = [self._tags(t) for t in trials]
        states = [_TrialState(t, s.iterations, len(s.datasets)) for t in trials]
        contexts = [
            tracked_run(
                self.tracking_uri, self.experiment_name, run_name=f"trial {t.number}", parent_run_id=self.parent_run_id,
                tags={**tag, "kind": "trial"},
            )
            for t, tag in zip(trials, tags, strict=True)
        ]  # fmt: skip
        opened: list[tuple] = []
        ends: dict[int, StopRun] = {}
        start = time.perf_counter()
        try:
            for t, cm, state, ov in zip(trials, contexts, states, overrides, strict=True):
                opened.append(cm.__enter__())
                client, run_id = state.run = opened[-1]
                state.link(wait=False)
                log_params(client, run_id, {**t.params, **ov, "datasets": ",".join(s.datasets)})
            alive = list(range(len(trials)))
            for i, name in enumerate(s.datasets):
                if not alive:  # every trial of the batch was pruned or failed
                    break
                batch = _Batch(trials, states, [c[i] for c in configs], [run_id for _, run_id in opened], tags, ends)
                alive = self._fit_dataset(batch, i, name, alive)
                for state in states:
                    state.link()  # made by now, unless the store lags a whole population
        except BaseException as err:
            info = sys.exc_info()
            ended = {}  # trials pruned or failed before the interrupt keep that outcome (told by optimize_batched)
            for k, (state, (client, run_id), cm) in enumerate(zip(states, opened, contexts, strict=False)):
                state.wall_time = time.perf_counter() - start
                own = ends.get(k)
                try:
                    state.record(client, run_id)
                finally:
                    _exit(cm, own, info)
                if own is not None:
                    ended[trials[k].number] = _told(lambda state=state, own=own: _outcome_of(state, own))
            with contextlib.suppress(AttributeError):
                err.batch_outcomes = ended
            raise
        told = []
        for k, (state, (client, run_id), cm) in enumerate(zip(states, opened, contexts, strict=True)):
            state.wall_time = time.perf_counter() - start
            state.record(client, run_id)
            end = ends.get(k)
            _exit(cm, end)
            told.append(_told(lambda state=state, end=end: _outcome_of(state, end)))
        return told

    def _fit_dataset(self, batch: _Batch, i: int, name: str, alive: list[int]) -> list[int]:
        """Fit dataset `name` (the `i`-th) for the batch's trials `alive` as one population, record each trial's
        result or its end (`batch.ends`: pruned, failed), and report; returns the trials still alive."""
        from experiments.population import run_population

        for k in alive:
            batch.states[k].begin(i, name)
        outcomes = run_population(
            [batch.configs[k] for k in alive],
            self.tracking_uri,
            self.experiment_name,
            parent_run_ids=[batch.run_ids[k] for k in alive],
            run_names=[f"trial {batch.trials[k].number} {name}" for k in alive],
            tags=[{**batch.tags[k], "kind": "fit", "dataset": name} for k in alive],
            on_eval=lambda m, step, value: batch.states[alive[m]].on_eval(step, value),
        )
        for k, out in zip(alive, outcomes, strict=True):
            if isinstance(out, StopRun):
                batch.ends[k] = out
            elif isinstance(out, (FloatingPointError, torch.linalg.LinAlgError)):
                batch.ends[k] = StopRun(f"{name}: {out}", status="FAILED")
            elif isinstance(out, BaseException):
                raise out
            else:
                batch.states[k].end(name, out)
                try:
                    batch.states[k].report(i + 1)
                except StopRun as e:
                    batch.ends[k] = e
        return [k for k in alive if k not in batch.ends]


@dataclass(frozen=True)
class _Batch:
    """A batch's trials for one dataset, by position k: state, config, trial run id, tags; `ends` (shared with
    run_batch) gets the StopRun of each trial pruned or failed so far."""

    trials: list[optuna.Trial]
    states: list[_TrialState]
    configs: list[ExperimentConfig]
    run_ids: list[str]
    tags: list[dict[str, str]]
    ends: dict[int, StopRun]


def _exit(run, end: BaseException | None, info: tuple = (None, None, None)) -> None:
    """End a trial's `tracked_run` (entered by hand: a batch holds several open) with its own StopRun `end`,
    else with the exception being handled (`info`, from sys.exc_info()) or none."""
    run.__exit__(*((type(end), end, end.__traceback__) if end is not None else info))


def _outcome_of(state: _TrialState, end: StopRun | None) -> float:
    """A trial's value, or the exception `__call__` would raise (pruned, failed)."""
    trial = state.trial
    if end is not None:
        reason = str(getattr(end, "reason", end))
        if state.pruned:
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)
    if not math.isfinite(state.value):
        reason = f"the mean validation NLL is {state.value}"
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)
    return state.value


def _told(run) -> tuple[TrialState, float | None]:
    """(state, value) for study.tell from running `run`, which returns a value or raises as an objective does."""
    try:
        return TrialState.COMPLETE, run()
    except optuna.TrialPruned:
        return TrialState.PRUNED, None
    except TrialFailed:
        return TrialState.FAIL, None


class _TrialState:
    """What one trial has measured so far; reports to Optuna and decides pruning."""

    def __init__(self, trial: optuna.Trial, iterations: int, num_datasets: int):
        self.trial = trial
        self.iterations = iterations
        self.num_datasets = num_datasets
        self.index = 0
        self.name = ""
        self.final_val: list[float] = []
        self.attrs: dict[str, float | int] = {}
        self.steps: list[int] = []
        self.reports: list[float] = []
        self.pruned = False
        self.wall_time = 0.0
        self.value = math.nan
        self.run: tuple | None = None  # (client, run_id) of the trial's MLflow run
        self.linked = False

    def link(self, wait: bool = True) -> None:
        """The trial's MLflow run (`run`, once it is open) as its user attribute `mlflow_run_id`, once
        (studies.stale ends a dead worker's runs through it). Inside write_behind the helper makes the run:
        this waits until it has (wait=False: nothing yet if it has not; every evaluation tries again)."""
        if self.run is not None and not self.linked and (real := real_run_id(*self.run, wait=wait)) is not None:
            self.trial.set_user_attr("mlflow_run_id", real)
            self.linked = True

    def begin(self, index: int, name: str) -> None:
        self.index, self.name = index, name

    def on_eval(self, step: int, val_nll: float) -> None:
        self.link(wait=False)
        if not math.isfinite(val_nll):
            raise StopRun(f"{self.name}: the validation NLL became {val_nll} at step {step}", status="FAILED")

    def report(self, step: int) -> None:
        """Report the mean validation NLL of the first `step` datasets; stop the trial if it is pruned."""
        value = sum(self.final_val) / len(self.final_val)
        self.trial.report(value, step)
        self.steps.append(step)
        self.reports.append(value)
        if step < self.num_datasets and self.trial.should_prune():
            self.pruned = True
            where = f"after {step} of {self.num_datasets} datasets ({self.name}): mean validation NLL {value:.4f}"
            raise StopRun(f"pruned {where}", status="FINISHED", tags={"pruned": where})

    def end(self, name: str, result) -> None:
        self.final_val.append(float(result.val_nll))
        self.attrs[f"val_nll/{name}"] = float(result.val_nll)
        self.attrs[f"train_nll/{name}"] = float(result.train_nll)
        self.attrs[f"clamp_count/{name}"] = int(result.clamp_count)
        self.attrs[f"reset_count/{name}"] = int(result.reset_count)
        self.attrs[f"fit_time/{name}"] = float(result.wall_time)
        self.value = sum(self.final_val) / len(self.final_val)

    def record(self, client, run_id: str) -> None:
        """User attributes on the trial, final metrics and the reported curve on its MLflow run."""
        self.link()
        counts = {
            "clamp_count": sum(v for k, v in self.attrs.items() if k.startswith("clamp_count/")),
            "reset_count": sum(v for k, v in self.attrs.items() if k.startswith("reset_count/")),
            "datasets_done": len(self.final_val),
            "wall_time": self.wall_time,
        }
        for key, value in {**self.attrs, **counts}.items():
            self.trial.set_user_attr(key, value)
        metrics = {**self.attrs, **counts}
        if len(self.final_val) == self.num_datasets:
            metrics["val_nll_mean"] = self.value  # the objective, only for a trial that fitted every dataset
        now = int(time.time() * 1000)
        finals = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        log_metrics_batched(client, run_id, finals + history_metrics("objective_reported", self.reports, self.steps))
