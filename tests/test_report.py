"""Seed reports (experiments.report): the folder's files, --verify (pass, a tampered number, tolerance),
serial == parallel, atomic writes, and one-line errors with exit status 2.

One tiny 3-seed report (200 samples, 100 steps) is written once per module; the tests read it or copy it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import gmm
from experiments import document, report, runs_table, seeds
from experiments.config import ExperimentConfig
from experiments.report import RUN_COLUMNS, TIMING_COLUMNS, main, read_runs_csv

TINY = ["--samples", "200", "--iterations", "100", "--no-log-figures", "--no-log-model"]
SEEDS = 3
PNG = b"\x89PNG\r\n\x1a\n"


def _run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A 3-seed report of the full family: (folder, tracking URI, stdout)."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    folder = root / "reports" / "tiny"
    code = main(["--family", "full", "--seeds", str(SEEDS), *TINY, "--out", str(folder), "--tracking-uri", uri])
    assert code == 0
    return folder, uri


def _one_line_error(code, err):
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("python -m experiments.report: error: ")


# -- the folder --------------------------------------------------------------------------------------------
def test_every_file_is_written_and_well_formed(written):
    folder, _ = written
    for name in ("report.md", "report.html", "runs.csv", "summary.csv", "manifest.json"):
        assert (folder / name).is_file(), name
    figures = sorted(p.name for p in (folder / "figures").iterdir())
    assert figures == ["final_nll_full.png", "fit_full.png", "nll_curves_full.png"]
    for name in figures:
        assert (folder / "figures" / name).read_bytes().startswith(PNG)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    runs = read_runs_csv(folder / "runs.csv")
    assert tuple(runs.columns) == RUN_COLUMNS
    assert len(runs) == 2 * SEEDS
    assert runs.groupby("seed")["method"].apply(sorted).tolist() == [["em", "gd"]] * SEEDS
    assert sorted(set(runs["seed"])) == [42, 43, 44] and sorted(set(runs["data_seed"])) == [0, 1, 2]
    for column in ("train_nll", "val_nll", "true_nll_train", "recovery_error", "ari"):
        assert runs[column].map(math.isfinite).all(), column
    gd, em = runs[runs["method"] == "gd"], runs[runs["method"] == "em"]
    assert gd["gd_em_gap"].map(math.isfinite).all() and em["gd_em_gap"].isna().all()
    assert (gd["gd_em_gap"].to_numpy() == gd["train_nll"].to_numpy() - em["train_nll"].to_numpy()).all()
    assert (gd["iterations"] == 100).all() and (em["iterations"] >= 1).all()

    summary = pd.read_csv(folder / "summary.csv")
    assert list(summary.columns) == ["family", "method", "metric", "count", "mean", "std", "min", "max"]
    train = summary[(summary["metric"] == "train_nll")].set_index("method")
    assert sorted(train.index) == ["em", "gd"]
    for method in ("gd", "em"):
        rows = runs[runs["method"] == method]["train_nll"]
        assert train.loc[method, "count"] == SEEDS
        assert train.loc[method, "mean"] == pytest.approx(rows.mean(), rel=1e-12)
        assert train.loc[method, "min"] == rows.min() and train.loc[method, "max"] == rows.max()
    assert not ((summary["method"] == "em") & (summary["metric"] == "gd_em_gap")).any()


def test_html_is_self_contained_and_markdown_links_the_figures(written):
    folder, _ = written
    page = (folder / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('<img src="data:image/png;base64,') == 3
    assert 'src="figures/' not in page
    first = page.split('<img src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(first).startswith(PNG)
    assert "<table>" in page and "train_nll" in page
    md = (folder / "report.md").read_text()
    for name in ("nll_curves_full.png", "final_nll_full.png", "fit_full.png"):
        assert f"](figures/{name})" in md
    assert "| metric |" in md and "--verify" in md


def test_manifest_records_what_reproduces_the_report(written):
    folder, uri = written
    manifest = json.loads((folder / "manifest.json").read_text())
    config = ExperimentConfig.from_dict(manifest["config"])
    assert (config.samples, config.iterations, config.em, config.family) == (200, 100, True, "full")
    assert manifest["families"] == ["full"]
    assert manifest["seeds"] == [{"seed": 42 + i, "data_seed": i} for i in range(SEEDS)]
    assert len(manifest["runs"]) == SEEDS
    for run in manifest["runs"]:
        assert len(run["dataset_fingerprint"]) == 64 and int(run["dataset_fingerprint"], 16) >= 0
    assert set(manifest["git"]) == {"commit", "dirty"} and manifest["git"]["dirty"] in (True, False, None)
    assert {"python", "torch", "numpy", "pandas", "mlflow"} <= set(manifest["versions"])
    assert {"platform", "system", "machine", "cpu_capability"} <= set(manifest["platform"])
    assert manifest["runs_csv"]["excluded_from_sha256"] == list(TIMING_COLUMNS)
    text = read_runs_csv(folder / "runs.csv").drop(columns=list(TIMING_COLUMNS))
    expected = hashlib.sha256(text.to_csv(index=False, lineterminator="\n").encode()).hexdigest()
    assert manifest["runs_csv"]["sha256"] == expected
    assert manifest["mlflow"]["tracking_uri"] == uri


def test_seeds_are_nested_mlflow_runs_and_the_folder_is_an_artifact(written):
    folder, uri = written
    manifest = json.loads((folder / "manifest.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    parent_id = manifest["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["report.name"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {"report/manifest.json", "report/runs.csv", "report/report.html", "report/figures"} <= artifacts
    for run in manifest["runs"]:
        child = client.get_run(run["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["report.name"] == "tiny"
        assert child.data.tags["dataset.fingerprint"] == run["dataset_fingerprint"]
        assert "summary/em_nll_train" in child.data.metrics


def test_a_metric_added_in_one_place_reaches_mlflow_runs_csv_the_summary_and_the_glossary(tmp_path, mlflow_uri, monkeypatch):
    """The registry is the one place: a throwaway metric appended to experiments.metrics.METRICS shows up in
    each seed's MLflow run, the ExperimentResult, runs.csv (last column, gd and em rows), the summary and the
    glossary of report.md, with no other edit."""
    from experiments import metrics

    throwaway = metrics.Metric(
        "throwaway", "a metric that exists only in this test", gd=lambda m: m.fit.num_iterations + 0.5,
        em=lambda m: 2.5, em_section="summary", report=True,
    )  # fmt: skip
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, throwaway))
    config = report.REPORT_DEFAULTS.replace(samples=200, iterations=20, log_figures=False, log_model=False)
    made = report.make_report(config, ["full"], 2, tmp_path / "r", tracking_uri=mlflow_uri)
    runs = read_runs_csv(made.folder / "runs.csv")
    assert tuple(runs.columns) == (*RUN_COLUMNS, "throwaway")
    assert runs.set_index("method")["throwaway"].to_dict() == {"gd": 20.5, "em": 2.5}
    assert set(made.summary[made.summary["metric"] == "throwaway"]["method"]) == {"gd", "em"}
    assert "| throwaway | a metric that exists only in this test |" in (made.folder / "report.md").read_text()
    client = MlflowClient(mlflow_uri)
    for run in made.manifest["runs"]:
        logged = client.get_run(run["run_id"]).data.metrics
        assert (logged["summary/throwaway"], logged["summary/em_throwaway"]) == (20.5, 2.5)


# -- verification ------------------------------------------------------------------------------------------
def test_verify_passes(written, mlflow_uri, capsys):
    folder, _ = written
    code, out, err = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 0, out + err
    assert out.startswith("PASS: ") and "exactly" in out


def test_verify_fails_naming_the_edited_number(written, tmp_path, mlflow_uri, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(written[0], folder)
    runs = read_runs_csv(folder / "runs.csv")
    row = runs.index[(runs["seed"] == 43) & (runs["method"] == "em")][0]
    original = float(runs.loc[row, "val_nll"])
    runs.loc[row, "val_nll"] = original + 0.25
    (folder / "runs.csv").write_text(runs.to_csv(index=False, lineterminator="\n"))

    code, out, _ = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 1
    assert out.startswith("FAIL: ")
    assert "seed 43, method em, column val_nll" in out
    assert f"expected {original + 0.25!r}, got {original!r}" in out
    assert "1 differing value;" in out and "sha256" in out


@pytest.mark.parametrize(
    "tamper, names",
    [
        (lambda m: m["runs"][0].update(dataset_fingerprint="0" * 64), "column dataset_fingerprint"),
        (lambda m: m["runs_csv"].update(sha256="0" * 64), "does not match the manifest's sha256"),
    ],
    ids=["dataset-fingerprint", "runs-csv-sha256"],
)
def test_verify_fails_when_the_manifest_no_longer_matches(written, tmp_path, mlflow_uri, capsys, tamper, names):
    """runs.csv is untouched (the re-run matches it), but the manifest records another dataset or another
    file: either means the numbers are no longer the ones the manifest vouches for."""
    folder = tmp_path / "tampered"
    shutil.copytree(written[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    tamper(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    code, out, _ = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 1 and out.startswith("FAIL: ") and names in out, out


def test_a_failed_verify_names_the_commit_that_made_the_report(written, tmp_path, mlflow_uri, capsys):
    """Exact verification looks at Python, torch and numpy; another commit of this project may round differently,
    so a FAIL of a report another commit made says which one to check out (and a report of this commit does not)."""
    folder = tmp_path / "older"
    shutil.copytree(written[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["git"]["commit"] not in ("", "unknown")  # this checkout's own commit
    manifest["runs"][0]["dataset_fingerprint"] = "0" * 64  # a FAIL
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    code, out, _ = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 1 and "made it" not in out, out
    manifest["git"]["commit"] = "0123456789ab" + "c" * 28
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    code, out, _ = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 1 and "commit 0123456789ab made it" in out and "check out 0123456789ab" in out, out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("summary.csv", "full,gd,", "full,gd ,"),
        ("report.md", "# Seed report", "# Seed Report"),
        ("report.html", "<h1>Seed report", "<h1>Seed Report"),
        ("figures/fit_full.png", None, None),
    ],
)
def test_verify_names_an_edited_file_of_the_report(written, tmp_path, name, old, new):
    """Every file is regenerated from the folder's manifest and runs.csv and compared; compare_files without
    the re-run's figures (exact=False) keeps this fast (the CLI runs the same check after its re-run)."""
    folder = tmp_path / "edited"
    shutil.copytree(written[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    runs = runs_table.normalized(read_runs_csv(folder / "runs.csv"))
    assert report.compare_files(folder, manifest, runs, [], [], exact=False)[0] is None
    path = folder / name
    if old is None:  # a figure: the HTML embeds the folder's figures, so it no longer matches them
        path.write_bytes(path.read_bytes() + b"\0")
        name = "report.html"
    else:
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new, 1))
    problem, count = report.compare_files(folder, manifest, runs, [], [], exact=False)
    assert problem is not None and problem.startswith(f"{name} differs"), problem
    assert count == len(json.loads((folder / report.MARKER).read_text())["files"]) + 1


def test_verify_cli_names_the_edited_file(written, tmp_path, mlflow_uri, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(written[0], folder)
    (folder / "notes.txt").write_text("mine")
    code, out, _ = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 1 and out.startswith("FAIL: ") and "notes.txt is not part of the report" in out, out


def test_cross_platform_tolerance_is_one_part_in_a_thousand():
    """The documented tolerance, written out here (not read from the module, so widening it fails):
    |got - expected| <= 1e-4 + 1e-3 * |expected|."""
    base = pd.DataFrame([["full", 1, 0, "gd", *([2.0] * 7), 0, 0, 100, 0, 0.5]], columns=list(RUN_COLUMNS))
    within, beyond = base.copy(), base.copy()
    within.loc[0, "val_nll"] = 2.0 + 0.9 * (1e-4 + 2e-3)
    beyond.loc[0, "val_nll"] = 2.0 + 1.1 * (1e-4 + 2e-3)
    assert report.first_difference(base, within, exact=False) == (None, 0)
    diff, count = report.first_difference(base, beyond, exact=False)
    assert count == 1 and diff["column"] == "val_nll"


def test_first_difference_is_exact_on_the_same_platform_and_tolerant_across():
    base = pd.DataFrame(
        [["full", 1, 0, "gd", *([1.0] * 7), 0, 0, 100, 0, 0.5], ["full", 1, 0, "em", *([2.0] * 7), 0, 0, 9, 1, 0.1]],
        columns=list(RUN_COLUMNS),
    )
    slower = base.assign(wall_time=[9.0, 9.0])
    assert report.first_difference(base, slower, exact=True) == (None, 0)
    nudged = base.copy()
    nudged.loc[1, "ari"] = 2.0 + 1e-9
    diff, count = report.first_difference(base, nudged, exact=True)
    assert count == 1 and (diff["seed"], diff["method"], diff["column"]) == (1, "em", "ari")
    assert report.first_difference(base, nudged, exact=False) == (None, 0)
    recount = base.copy()
    recount.loc[0, "reset_count"] = 1
    diff, _ = report.first_difference(base, recount, exact=False)  # counts are exact even across platforms
    assert diff["column"] == "reset_count" and (diff["expected"], diff["got"]) == (0, 1)
    diff, count = report.first_difference(base, base.iloc[:1], exact=True)
    assert count == 1 and diff["column"] == "(row)" and diff["method"] == "em"


# -- parallel == serial ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_jobs_give_the_serial_runs_csv(tmp_path, mlflow_uri, capsys):
    # every family, 2 seeds: six populations shared by this process and two spawned workers, each taking the
    # next family when it is free, against all six in this process
    argv = ["--family", "all", "--seeds", "2", *TINY, "--tracking-uri", mlflow_uri]
    frames, manifests = [], []
    for jobs in ("1", "3"):
        folder = tmp_path / f"jobs{jobs}"
        code, out, err = _run([*argv, "--jobs", jobs, "--out", str(folder)], capsys)
        assert code == 0, out + err
        frames.append(read_runs_csv(folder / "runs.csv").drop(columns=list(TIMING_COLUMNS)))
        manifests.append(json.loads((folder / "manifest.json").read_text()))
    assert sorted(set(frames[1]["family"])) == sorted(gmm.FAMILIES)
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)
    assert manifests[0]["runs_csv"]["sha256"] == manifests[1]["runs_csv"]["sha256"]
    assert [m["jobs"] for m in manifests] == [1, 3]
    runs = MlflowClient(mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_uri).search_experiments()], max_results=100
    )
    assert len(runs) == 2 * (1 + 6 * 2) and {r.info.status for r in runs} == {"FINISHED"}


_STOPPED = threading.Event()  # set in this process when seeds._share has seen a worker's group fail


class _OnStop(logging.Handler):
    def emit(self, record):
        if "no more groups are handed out" in record.getMessage():
            _STOPPED.set()


def _group(tasks):
    """A group for seeds._share (module level: spawned workers import it): (name, wait, fail, log) logs its
    start, waits (if asked, in this process) until _share has seen the failure, logs its end, and fails when asked."""
    name, wait, fail, log = tasks[0]
    log = Path(log)
    with log.open("a") as f:
        f.write(f"start-{name}\n")
    if wait:
        assert _STOPPED.wait(120), "seeds._share never saw the worker's failure"
    with log.open("a") as f:
        f.write(f"{'failed' if fail else 'end'}-{name}\n")
    if fail:
        raise ValueError(f"group {name} failed")
    return [name]


@pytest.mark.slow
def test_a_group_failed_in_a_worker_stops_the_hand_out_and_is_raised(tmp_path):
    # the worker takes a, which fails; this process holds b until it has seen that: c and d must never start
    log = tmp_path / "log"
    log.touch()
    spec = {"a": ("a", False, True), "b": ("b", True, False), "c": ("c", False, False), "d": ("d", False, False)}
    order = ["a", "b", "c", "d"]
    done = []
    handler, logger = _OnStop(), logging.getLogger(seeds.__name__)
    _STOPPED.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(ValueError, match="group a failed"):
            seeds._share(
                [[i] for i in range(4)], 1, _group, lambda g: [(*spec[order[i]], str(log)) for i in g],
                lambda g, outcomes: done.append(outcomes),
            )  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = log.read_text().split()
    assert lines == ["start-b", "start-a", "failed-a", "end-b"] or lines == ["start-a", "start-b", "failed-a", "end-b"], (
        lines
    )
    assert done == [["b"]]


def test_one_by_one_gives_the_population_s_numbers_to_rounding_and_verifies_its_own_way(
    written, tmp_path, mlflow_uri, capsys
):
    # the population report (the fixture) and a --one-by-one one: the same seeds, data and starts, so the same
    # numbers up to float32 rounding of the two arithmetics (these 100 moderate steps stay within 1e-4); each
    # manifest says how it was made, and verify re-runs it that way (exact on this platform)
    folder = tmp_path / "one"
    argv = ["--family", "full", "--seeds", str(SEEDS), *TINY, "--out", str(folder), "--tracking-uri", mlflow_uri]
    code, out, err = _run([*argv, "--one-by-one"], capsys)
    assert code == 0, out + err
    population = read_runs_csv(written[0] / "runs.csv").drop(columns=list(TIMING_COLUMNS))
    one = read_runs_csv(folder / "runs.csv").drop(columns=list(TIMING_COLUMNS))
    pd.testing.assert_frame_equal(population, one, check_exact=False, rtol=1e-4, atol=1e-4)
    modes = [json.loads((f / "manifest.json").read_text())["fit_mode"] for f in (written[0], folder)]
    assert modes == ["population", "one-by-one"]
    code, out, err = _run(["--verify", str(folder), "--tracking-uri", mlflow_uri], capsys)
    assert code == 0 and "PASS" in out, out + err


# -- atomic writes and errors ------------------------------------------------------------------------------
def test_an_interrupted_write_leaves_no_folder_and_keeps_the_old_report(written, tmp_path, monkeypatch):
    folder = written[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    runs = read_runs_csv(folder / "runs.csv")
    summary = report.summarize(runs)
    figures = {p.name: p.read_bytes() for p in (folder / "figures").iterdir()}

    def interrupted(self, title):
        raise KeyboardInterrupt

    monkeypatch.setattr(document.Document, "html", interrupted)
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        report._write_folder(out, manifest, runs, summary, figures)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    with pytest.raises(KeyboardInterrupt):
        report._write_folder(old, manifest, runs.assign(train_nll=0.0), summary, figures)
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--seeds", "0"], "seeds"),
        (["--family", "ful"], "full"),
        (["--jobs", "0"], "jobs"),
        (["--no-em"], "EM"),
        (["--bogus"], "unrecognized"),
        (["--seeds", "three"], "invalid int"),
        (["--config", "missing.yaml"], "missing.yaml"),
        (["--verify", "no/such/report"], "not a report folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, match, mlflow_uri, capsys):
    code, out, err = _run([*argv, "--tracking-uri", mlflow_uri], capsys)
    _one_line_error(code, err)
    assert match in err


def test_bad_report_folders_exit_2(written, tmp_path, mlflow_uri, capsys):
    code, _, err = _run(["--verify", str(written[0]), "--seeds", "3"], capsys)
    _one_line_error(code, err)
    assert "--seeds" in err
    broken = tmp_path / "broken"
    shutil.copytree(written[0], broken)
    (broken / "manifest.json").write_text("{not json")
    code, _, err = _run(["--verify", str(broken), "--tracking-uri", mlflow_uri], capsys)
    _one_line_error(code, err)
    assert "not valid JSON" in err
    (broken / "manifest.json").write_text(json.dumps({"format": "gmm-seed-report/1"}))
    code, _, err = _run(["--verify", str(broken), "--tracking-uri", mlflow_uri], capsys)
    _one_line_error(code, err)
    assert "lacks the field" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = _run(["--out", str(occupied), "--tracking-uri", mlflow_uri], capsys)
    _one_line_error(code, err)
    assert "not a report" in err and (occupied / "notes.txt").read_text() == "mine"
