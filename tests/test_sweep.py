"""The clamp sweep (experiments.sweep*) and the "recovered" event it measures (gmm.recovery.Recovery).

Recovery is checked on built states: a component put on the floor by hand, then lifted off it, with NLL
values chosen on either side of the margin, or on one to seven steps from a built state; never on where a
long fit happens to go. The sweep itself runs once, in one test, on tiny settings (full-outliers, 60 steps,
3 clamps x 2 seeds) with two worker processes into a real MLflow store in a temporary folder; the test
checks its files, its MLflow runs, a serial re-run and --verify.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

import gmm
from experiments import datasets, sweep, sweep_outputs, sweep_plan
from experiments.sweep_plan import NO_CLAMP, ROW_COLUMNS
from gmm.records import FitEvent
from gmm.recovery import RECOVERY_FLOOR_FACTOR, RECOVERY_MARGIN
from gmm.recovery import Recovery as _Recovery

CLAMP = 1e-3
fit_module = importlib.import_module("gmm.recovery")  # where the recovery rule reads RECOVERY_MARGIN


# -- recovery on built states ------------------------------------------------------------------------------
def _model(family: str, variances: tuple[float, float]) -> gmm.MixtureModel:
    """Two components in 2-D, float64, isotropic covariances with the given variances."""
    model = gmm.make_model(family, 2, 2, dtype=torch.float64)
    covs = torch.stack([v * torch.eye(2, dtype=torch.float64) for v in variances])
    if model.family.shared:
        covs = covs[:1].expand(2, 2, 2)
    model.set_parameters(means=torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=torch.float64), covariances=covs)
    return model


def _set_variance(model: gmm.MixtureModel, component: int, variances) -> None:
    covs = model.covariances.clone()
    covs[component if not model.family.shared else slice(None)] = torch.diag(
        torch.as_tensor(variances, dtype=torch.float64).expand(2)
    )
    model.set_parameters(covariances=covs)


def _clamp_event(step: int, component: int) -> FitEvent:
    return FitEvent(step, component, "clamp", "built")


def _measure(recovery: _Recovery, index: int, nll: float, events: list) -> list:
    recovery.look()
    recovery.measured(index, nll, events)
    return [(e.step, e.component, e.kind) for e in events]


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_recovered_needs_both_off_the_floor_and_the_nll_back(family):
    model = _model(family, (CLAMP, 1.0))
    recovery, events = _Recovery(model.family, model.raw_cov, CLAMP), []
    recovery.measured(0, 1.0, events)  # the start's NLL: the level before the clamp of step 1
    recovery.clamped(1, [_clamp_event(1, 0)])
    assert recovery.watched == {0: (1, 1.0)}
    _set_variance(model, 0, 3 * CLAMP)  # off the floor, but the NLL is too high
    assert _measure(recovery, 1, 1.0 + 2 * RECOVERY_MARGIN, events) == []
    _set_variance(model, 0, 0.99 * RECOVERY_FLOOR_FACTOR * CLAMP)  # the NLL is back, but still on the floor
    assert _measure(recovery, 2, 1.0 + 0.5 * RECOVERY_MARGIN, events) == []
    _set_variance(model, 0, 1.01 * RECOVERY_FLOOR_FACTOR * CLAMP)  # both
    assert _measure(recovery, 3, 1.0 + 0.5 * RECOVERY_MARGIN, events) == [(3, 0, "recovered")]
    assert "2 steps after its clamp at step 1" in events[0].detail and recovery.watched == {}
    # a later clamp of the same component starts a new watch, from the newest NLL before it
    recovery.clamped(4, [_clamp_event(4, 0)])
    assert recovery.watched == {0: (4, 1.0 + 0.5 * RECOVERY_MARGIN)}
    recovery.clamped(5, [_clamp_event(5, 0)])  # and a clamp of a watched component keeps its first one
    assert recovery.watched == {0: (4, 1.0 + 0.5 * RECOVERY_MARGIN)}


def test_per_axis_floors_need_every_axis_off_its_floor():
    """Standardized fits floor each axis at clamp / std_j^2: a diagonal component off the floor on one axis
    only has not left it."""
    model = _model("diagonal", (CLAMP, 1.0))
    floors = torch.tensor([CLAMP, 100 * CLAMP], dtype=torch.float64)
    recovery, events = _Recovery(model.family, model.raw_cov, floors), []
    recovery.measured(0, 1.0, events)
    recovery.clamped(1, [_clamp_event(1, 0)])
    _set_variance(model, 0, [3 * CLAMP, 3 * CLAMP])  # axis 1 is still below 2 x its floor
    assert _measure(recovery, 1, 1.0, events) == []
    _set_variance(model, 0, [3 * CLAMP, 300 * CLAMP])
    assert _measure(recovery, 2, 1.0, events) == [(2, 0, "recovered")]


def test_a_shared_covariance_recovers_as_component_minus_one():
    model = _model("tied", (CLAMP, CLAMP))
    recovery, events = _Recovery(model.family, model.raw_cov, CLAMP), []
    recovery.measured(0, 1.0, events)
    recovery.clamped(1, [_clamp_event(1, -1), FitEvent(1, -1, "spike", "not a clamp")])
    assert recovery.watched == {-1: (1, 1.0)}
    _set_variance(model, 0, 1.0)
    assert _measure(recovery, 1, 1.0, events) == [(1, -1, "recovered")]


def _far_point(family: str, **options) -> gmm.FitResult:
    """Component 0 alone on a far point P just above the floor, component 1 on a cluster of 99 points: step 1
    clamps component 0 and (resets on) resets it, which lifts it onto the worst-explained points."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(99, 2, generator=g, dtype=torch.float64), torch.tensor([[30.0, 30.0]], dtype=torch.float64)])
    model = gmm.make_model(family, 2, 2, dtype=torch.float64)
    covs = torch.stack([1.05 * CLAMP * torch.eye(2), torch.cov(x[:99].T)]).double()
    model.set_parameters(means=torch.stack([x[99], x[:99].mean(0)]), covariances=covs)
    options = {"component_lr": 0.1, "clamp": CLAMP, "lr_schedule": "constant", "init": "keep", **options}
    return gmm.fit(model, x, **options)


@pytest.mark.filterwarnings("ignore::gmm.ConvergenceWarning")
def test_a_reset_that_costs_more_than_the_margin_is_not_a_recovery(monkeypatch):
    """After the reset nobody explains P any more, so the NLL rises above the level before the clamp: no
    recovery within the margin; with a huge margin the same fit recovers at the reset's own step."""
    kinds = [(e.step, e.component, e.kind) for e in _far_point("diagonal", num_iterations=2).events]
    assert kinds[:2] == [(1, 0, "clamp"), (1, 0, "reset")] and all(k != "recovered" for _, _, k in kinds)
    monkeypatch.setattr(fit_module, "RECOVERY_MARGIN", 1e9)
    result = _far_point("diagonal", num_iterations=2)
    kinds = [(e.step, e.component, e.kind) for e in result.events]
    assert kinds[:3] == [(1, 0, "clamp"), (1, 0, "reset"), (1, 0, "recovered")]
    assert result.recovered_count == 1


@pytest.mark.filterwarnings("ignore::gmm.ConvergenceWarning")
@pytest.mark.parametrize("family", ["full", "isotropic"])
def test_mini_batch_fits_recover_only_at_exact_nlls(monkeypatch, family):
    """With mini-batches the NLL is exact only at the start, every log_freq steps and at the end: a
    "recovered" event can only fall there; without resets component 0 stays on P's floor and never does."""
    monkeypatch.setattr(fit_module, "RECOVERY_MARGIN", 1e9)  # the NLL side always holds: the floor decides
    result = _far_point(family, num_iterations=7, batch_size=20, log_freq=3)
    recovered = [e.step for e in result.events if e.kind == "recovered"]
    assert recovered and all(s in (3, 6, 7) for s in recovered), result.events
    stuck = _far_point(family, num_iterations=7, batch_size=20, log_freq=3, reset=False)
    assert stuck.clamp_count >= 1 and stuck.recovered_count == 0


# -- fit measures and the plan -----------------------------------------------------------------------------
def test_collapsed_means_on_the_floor_degenerate_or_runaway():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for variances, clamp, expected in (((CLAMP, 1.0), CLAMP, 1), ((1.0, 1.0), CLAMP, 0), ((1e-9, 1.0), 1e-12, 1)):
        model = _model("isotropic", variances)
        result = gmm.fit(model, x, num_iterations=1, component_lr=0.0, mixture_lr=0.0, clamp=clamp, init="keep")
        floor = sweep_plan.DEGENERATE_RATIO * float(x.var(0).amin())
        measures = sweep_plan.fit_measures(model, result, clamp, x, data_floor=floor)
        assert measures["collapsed"] == expected, variances
        assert math.isnan(measures["recovered"]) == (measures["clamps"] == 0)
    assert sweep_plan.fit_measures(model, result, CLAMP, x, 0.0, runaway=True)["collapsed"] == 1


def test_clamp_grid_spans_the_search_space_in_log_steps_plus_no_clamp(tmp_path):
    grid = sweep_plan.clamp_grid("full", 10)
    assert grid[0] == NO_CLAMP and len(grid) == 11
    low, high = sweep_plan.clamp_range("full")
    assert grid[1] == pytest.approx(low) and grid[-1] == pytest.approx(high)
    ratios = [b / a for a, b in zip(grid[1:], grid[2:], strict=False)]
    assert max(ratios) / min(ratios) < 1.01  # evenly spaced in log (3 significant digits)
    assert sweep_plan.clamp_grid("constant") == []
    space = tmp_path / "space.yaml"
    space.write_text("default:\n  clamp: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert sweep_plan.clamp_grid("full", 3, space)[1:] == [1e-4, 1e-3, 1e-2]
    with pytest.raises(ValueError, match="families_of|trains no covariance"):
        sweep.families_of("constant")
    with pytest.raises(ValueError, match="unknown dataset"):
        sweep_plan.select_datasets(["full", "tied"], ["full-nope"])
    assert [d.name for d in sweep_plan.select_datasets(["full", "tied"], ["tied-quantized"])["tied"]] == ["tied-quantized"]


def test_default_datasets_are_the_registry_s_structural_collapse_datasets_and_a_control():
    """From experiments.datasets: the datasets that collapse within a sweep's budget, then one control; a
    family without such datasets (shared covariances) sweeps all its collapse datasets."""
    for family in ("full", "diagonal", "isotropic"):
        data = sweep_plan.sweep_datasets(family)
        assert [d.name for d in data] == [f"{family}-point-mass", f"{family}-outliers", f"{family}-separated"]
        assert [d.role for d in data] == ["collapse", "collapse", "control"]
        assert data[0].cause == datasets.describe(f"{family}-point-mass")
        assert data[0].components == datasets.get_spec(f"{family}-point-mass").fit_components
    assert [d.name for d in sweep_plan.sweep_datasets("tied")] == [*datasets.collapse_datasets("tied"), "tied-separated"]
    assert sweep_plan.sweep_datasets("full")[0].fingerprint() == datasets.stored_fingerprints()["full-point-mass"]


def test_figures_and_paragraph_cope_with_cells_where_nothing_clamped():
    """A dataset where no fit clamped has no recovery rate or steps: its panels stay empty, and the paragraph
    says no clamp let mini-batch fits recover."""
    rows = [
        {
            "family": "full",
            "dataset": "d",
            "clamp": c,
            "seed": s,
            "batch": b,
            "reset": r,
            "train_nll": 1.0,
            "val_nll": 2.0 + s,
            "clamps": 0,
            "resets": 0,
            "collapsed": 0,
            "recovered": math.nan,
            "recovery_steps": math.nan,
        }
        for c in (NO_CLAMP, 1e-8, 1e-1)
        for b in (0, 64)
        for r in (1, 0)
        for s in range(3)
    ]
    summary = sweep_outputs.summarize(sweep_outputs.sweep_frame(rows))
    assert len(summary) == 12 and (summary["val_nll_median"] == 3.0).all() and summary["recovery_rate"].isna().all()
    figures = sweep_outputs.family_figures("full", summary)
    assert sorted(figures) == ["collapse_full.png", "recovery_full.png", "val_nll_full.png"]
    paragraph = sweep_outputs.family_paragraph(summary, "full", {"d": "collapse"})
    assert "at none of the swept clamps do mini-batch fits recover" in paragraph


# -- the sweep, end to end ---------------------------------------------------------------------------------
# the end-to-end sweep: 3 clamps x 2 seeds x 2 batch modes x 2 reset settings, 60 steps a fit
TINY = ["--family", "full", "--datasets", "full-outliers", "--seeds", "2", "--clamps", "2", "--iterations", "60"]


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = sweep.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_the_sweep_end_to_end(tmp_path, capsys):
    """One tiny sweep run as `make clamp-sweep JOBS=2` runs it (two worker processes, a real MLflow store; one
    test, so the store and the workers are paid for once), then its folder, its MLflow runs, a serial re-run
    of its cells, and --verify passing and failing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "sweeps" / "tiny"
    code, out, err = _run([*TINY, "--jobs", "2", "--out", str(folder), "--tracking-uri", uri], capsys)
    assert code == 0, out + err

    # the folder: one row per fit, one summary row per cell, figures, report
    for name in ("sweep.csv", "summary.csv", "manifest.json", "report.md", "report.html"):
        assert (folder / name).is_file(), name
    for name in ("val_nll_full.png", "collapse_full.png", "recovery_full.png"):
        assert (folder / "figures" / name).read_bytes().startswith(b"\x89PNG")
    rows = sweep_outputs.read_csv(folder / "sweep.csv")
    assert list(rows.columns) == list(ROW_COLUMNS)
    assert len(rows) == 3 * 2 * 2 * 2  # clamps (none + 2) x batch x reset x seeds
    assert sorted(set(rows["clamp"])) == [NO_CLAMP, 1e-8, 0.1]
    assert sorted(set(rows["batch"])) == [0, 64]
    assert set(rows["collapsed"]) <= {0, 1}
    clamped = rows["clamps"] > 0
    assert rows.loc[~clamped, "recovered"].isna().all() and rows.loc[clamped, "recovered"].notna().all()
    summary = sweep_outputs.read_csv(folder / "summary.csv")
    assert len(summary) == 12 and (summary["fits"] == 2).all()
    report_md = (folder / "report.md").read_text()
    assert "**full.**" in report_md and "figures/val_nll_full.png" in report_md

    # MLflow: one parent run holding the folder, a nested run per setting; with two workers, every run
    # FINISHED, none RUNNING, KILLED or tagged with a stop reason
    manifest = json.loads((folder / "manifest.json").read_text())
    client = MlflowClient(uri)
    parent = client.get_run(manifest["mlflow"]["parent_run_id"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweep.csv", "sweep/figures", "sweep/report.html"} <= names
    experiment = client.get_experiment_by_name(sweep.EXPERIMENT).experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # (dataset) x (full, mini) x (reset on, off)
    history = client.get_metric_history(children[0].info.run_id, "collapse_rate")
    assert sorted(m.step for m in history) == [0, 1, 2]  # one value per clamp of the grid
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}
    assert not any("stop_reason" in r.data.tags or "error" in r.data.tags for r in runs)

    # JOBS=2 gives byte for byte the sweep.csv of a serial run of the same cells
    assert manifest["jobs"] == 2
    settings = sweep_plan.SweepSettings(**manifest["settings"])
    cells = sweep_plan.plan_cells(["full"], (0, 1), settings, ["full-outliers"], 2)
    serial = sweep_outputs.sweep_frame([row for rows in sweep.run_cells(cells, jobs=1) for row in rows])
    assert sweep_outputs.csv_text(serial) == (folder / "sweep.csv").read_text()

    # --verify re-runs the manifest: PASS unchanged; FAIL naming the file, row, column and number when edited
    code, out, _ = _run(["--verify", str(folder)], capsys)
    assert code == 0 and out.startswith("PASS"), out
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    rows.loc[5, "val_nll"] += 0.5
    (edited / "sweep.csv").write_text(sweep_outputs.csv_text(rows))
    code, out, _ = _run(["--verify", str(edited)], capsys)
    assert code == 1
    assert out.startswith(f"FAIL: {edited}/sweep.csv: row 7 ") and "column val_nll" in out, out
    assert repr(float(rows.loc[5, "val_nll"])) in out
    assert "made it" not in out  # this commit's own sweep; another commit's FAIL names that commit
    manifest["git"]["commit"] = "0123456789ab" + "c" * 28
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2))
    code, out, _ = _run(["--verify", str(edited)], capsys)
    assert code == 1 and "commit 0123456789ab made it" in out and "check out 0123456789ab" in out, out


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    for argv in (["--family", "constant"], ["--family", "ful"], [*TINY, "--jobs", "0"], ["--verify", str(tmp_path)]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
