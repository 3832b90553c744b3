"""Study-level artifacts on the invocation's parent MLflow run: best_params.json, trials.csv and figures."""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from .summary import StudySummary, best_config_dict

log = logging.getLogger(__name__)


def log_study_artifacts(
    client, run_id: str, study: optuna.Study, summary: StudySummary, settings, plots: bool = True
) -> None:
    """best_params.json, trials.csv and (unless `plots` is False) Optuna's matplotlib plots on the
    invocation's parent run."""
    from mlflow.entities import Metric

    best = None
    if summary.best_trial is not None:
        trial = study.best_trial
        best = {
            "study": study.study_name,
            "value": trial.value,
            "trial": trial.number,
            "params": trial.params,
            "config": best_config_dict(settings, summary.best_config),
            "user_attrs": trial.user_attrs,
        }
    client.log_dict(run_id, best or {"study": study.study_name, "value": None}, "best_params.json")
    client.log_text(run_id, trials_csv(study), "trials.csv")
    now = int(time.time() * 1000)
    metrics = {
        "trials_complete": summary.complete,
        "trials_pruned": summary.pruned,
        "trials_failed": summary.failed,
        "trials_added": summary.added,
        "resets_all": summary.resets_all,
        "clamps_all": summary.clamps_all,
        "trials_with_clamps": summary.with_clamps,
        "study_time": summary.wall_time,
    }
    if summary.best_value is not None:
        metrics["best_value"] = summary.best_value
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    if not plots:
        return
    figures = list(study_figures(study))
    nll_vs_clamp = plot_nll_vs_clamp(study)
    if nll_vs_clamp is not None:
        figures.append(("nll_vs_clamp", nll_vs_clamp))
    for name, fig in figures:
        with warnings.catch_warnings():  # Optuna's slice plot of many parameters cannot fit tight_layout
            warnings.filterwarnings("ignore", message="Tight layout not applied")
            client.log_figure(run_id, fig, f"plots/{name}.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def trials_csv(study: optuna.Study) -> str:
    """Optuna's trials table as CSV, with a pruned trial's value moved from `value` (complete trials only,
    the objective) to `partial_value` (the mean over the datasets it fitted before it was pruned), so the
    two are never sorted or ranked together."""
    frame = study.trials_dataframe()
    if "value" in frame:
        pruned = frame["state"] == TrialState.PRUNED.name
        frame.insert(frame.columns.get_loc("value") + 1, "partial_value", frame["value"].where(pruned))
        frame.loc[pruned, "value"] = float("nan")
    return frame.to_csv(index=False)


def plot_nll_vs_clamp(study: optuna.Study):
    """Validation NLL (the objective) against clamp of the complete trials, colored by component_lr; None
    when fewer than two complete trials searched clamp. A Figure without pyplot (no backend, no global state)."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "clamp" in t.params and t.value is not None and math.isfinite(t.value)
    ]
    if len(trials) < 2:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    lrs = [t.params.get("component_lr") for t in trials]
    colored = all(v is not None for v in lrs)  # a NaN colour would hide its point: one colour when lr is fixed
    points = ax.scatter(
        [t.params["clamp"] for t in trials],
        [t.value for t in trials],
        c=lrs if colored else "tab:blue",
        cmap="viridis" if colored else None,
        norm=LogNorm() if colored and all(v > 0 for v in lrs) else None,
        edgecolors=["red" if t.user_attrs.get("clamp_count", 0) else "none" for t in trials],
        linewidths=1.5,
    )
    if colored:
        fig.colorbar(points, ax=ax, label="component_lr")
    ax.set(xscale="log", xlabel="clamp (variance floor)", ylabel="mean validation NLL")
    values = [t.value for t in trials]
    if max(values) - min(values) > 100 * max(abs(min(values)), 1.0):  # a collapsed trial would flatten the rest
        if min(values) > 0:
            ax.set_yscale("log")
            ax.set_ylabel("mean validation NLL (log scale)")
        else:  # NLLs below 0 (peaked densities): linear around 0, logarithmic beyond
            ax.set_yscale("symlog", linthresh=max(abs(min(values)), 1.0))
            ax.set_ylim(bottom=min(values) * 1.1)
            ax.set_ylabel("mean validation NLL (symmetric log scale)")
    ax.set_title(f"{study.study_name}: complete trials (red edge: clamp events)", fontsize=10)
    fig.tight_layout()
    return fig


def study_figures(study: optuna.Study):
    """(name, matplotlib Figure) for each of Optuna's plots the study has enough trials for. Optuna draws
    with pyplot, in its current backend: the study command selects Agg (off-screen) at its start."""
    from optuna.visualization import matplotlib as vm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {p for t in complete for p in t.params}
    plots = []
    if complete:
        plots += [("optimization_history", vm.plot_optimization_history), ("slice", vm.plot_slice)]
    if len(complete) >= 2:  # importances need a fit over at least two trials
        plots.append(("param_importances", vm.plot_param_importances))
    if len(complete) >= 2 and len(names) >= 2:
        plots.append(("contour", vm.plot_contour))
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots.append(("intermediate_values", vm.plot_intermediate_values))
    for name, fn in plots:
        try:
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length is less than 2", per param
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    axes = fn(study)
            finally:
                optuna.logging.set_verbosity(verbosity)
        except Exception as e:  # a plot the data cannot support (e.g. importances of constant params): skip it
            log.warning("skipped the %s plot: %s", name, e)
            continue
        first = axes.flat[0] if isinstance(axes, np.ndarray) else axes
        yield name, first.figure
