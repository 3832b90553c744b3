"""A study's outcome: the summary record, the closing table, and the best trial as a config file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .storage import PROJECT_ROOT

log = logging.getLogger(__name__)

BEST_DIR = PROJECT_ROOT / "studies" / "best"  # where studies.run writes <study>.json


@dataclass(frozen=True)
class StudySummary:
    """One study after an invocation (the counts cover the whole study, not only this invocation)."""

    study_name: str
    family: str
    added: int  # trials this invocation finished
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_trial: int | None
    best_config: dict | None  # ExperimentConfig overrides of the best trial
    resets_best: int | None  # collapse resets in the best trial's fits
    resets_all: int  # collapse resets over every finished trial
    clamps_best: int | None = None  # clamp events in the best trial's fits
    clamps_all: int = 0  # clamp events over every finished trial
    with_clamps: int = 0  # finished trials (complete or pruned) with at least one clamp event
    finished: int = 0  # complete + pruned trials
    clamp_importance: float | None = None  # Optuna's (fANOVA) importance of clamp over the complete trials
    wall_time: float = 0.0  # seconds this invocation spent on the study
    best_file: str | None = None


def summarize(study: optuna.Study, settings, added: int, wall_time: float, best_file: str | None) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = min(complete, key=lambda t: t.value) if complete else None  # pruned values are partial: never ranked
    return StudySummary(
        study_name=study.study_name,
        family=settings.family,
        added=added,
        complete=count[TrialState.COMPLETE],
        pruned=count[TrialState.PRUNED],
        failed=count[TrialState.FAIL],
        running=count[TrialState.RUNNING],
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        best_config=settings.space.to_config(best.params) if best else None,
        resets_best=int(best.user_attrs.get("reset_count", 0)) if best else None,
        resets_all=int(sum(t.user_attrs.get("reset_count", 0) for t in trials)),
        clamps_best=int(best.user_attrs.get("clamp_count", 0)) if best else None,
        clamps_all=int(sum(t.user_attrs.get("clamp_count", 0) for t in trials)),
        with_clamps=sum(t.user_attrs.get("clamp_count", 0) > 0 for t in finished),
        finished=len(finished),
        clamp_importance=clamp_importance(study),
        wall_time=wall_time,
        best_file=best_file,
    )


def clamp_importance(study: optuna.Study) -> float | None:
    """Optuna's importance of `clamp` (fANOVA, seeded) over the complete trials and the parameters every one
    of them has; None when clamp is not searched or fewer than 5 trials are complete."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    common = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    if len(complete) < 5 or "clamp" not in common:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return float(optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(common))["clamp"])
    except Exception as err:  # every trial with the same value, scikit-learn (fANOVA's) missing, ...: no figure
        log.debug("no clamp importance: %s", err)
        return None


def best_config_dict(settings, overrides: dict) -> dict:
    """The best trial as an ExperimentConfig file: the family, the study's fit length, a data file's fields
    (a study of your own data), the tuned values."""
    from experiments.config import ExperimentConfig

    d = {"family": settings.family, "iterations": settings.iterations, "seed": settings.seed, **settings.data, **overrides}
    ExperimentConfig.from_dict(d)  # validates; the file keeps only the keys that matter
    return d


def write_best(study: optuna.Study, settings, folder: Path) -> Path | None:
    """Write <folder>/<study>.json (ExperimentConfig.from_file format) of the best trial, or None if none."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    path = Path(folder) / f"{study.study_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(best_config_dict(settings, settings.space.to_config(best.params)), indent=2) + "\n")
    return path


def _fmt_params(config: dict | None) -> str:
    if not config:
        return "-"
    parts = []
    for k, v in config.items():
        if k == "mixture_lr" and v == 0:
            parts.append("mixture_lr=frozen")
        else:
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def format_table(summaries: list[StudySummary]) -> str:
    """The closing table: one row per study."""
    head = (
        "study",
        "best val NLL",
        "trial",
        "complete",
        "pruned",
        "failed",
        "resets best/all",
        "clamps best/all",
        "trials with clamps",
        "clamp importance",
        "time",
        "best params",
    )
    rows = [head]
    for s in summaries:
        rows.append(
            (
                s.study_name,
                f"{s.best_value:.4f}" if s.best_value is not None else "-",
                f"#{s.best_trial}" if s.best_trial is not None else "-",
                str(s.complete),
                str(s.pruned),
                str(s.failed) + (f" (+{s.running} running)" if s.running else ""),
                f"{s.resets_best if s.resets_best is not None else '-'}/{s.resets_all}",
                f"{s.clamps_best if s.clamps_best is not None else '-'}/{s.clamps_all}",
                f"{s.with_clamps}/{s.finished}",
                f"{s.clamp_importance:.2f}" if s.clamp_importance is not None else "-",
                f"{s.wall_time:.0f} s",
                _fmt_params(s.best_config),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def fit_best_hint(best_file: str, settings) -> str:
    """How to fit the best parameters again, and on which data (the best file holds a data file's fields,
    but not a named dataset: a study fits several of those)."""
    try:
        best_file = str(Path(best_file).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    if settings.data:
        return f"fit them on the same data: make run CONFIG={best_file}"
    return (
        f"fit them on one of the study's datasets ({', '.join(settings.datasets)}): make run CONFIG={best_file} "
        f"RUN_ARGS='--dataset {settings.datasets[0]}' (without --dataset, make run fits generated data)"
    )
