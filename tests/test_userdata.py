"""Your own data (experiments.userdata): file formats, the split, standardization, one-line errors, a tracked
run on a CSV, and DataFrames given to fit / fit_em."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import gmm
from experiments import ExperimentConfig, load_dataset, run_experiment
from experiments.run import main
from experiments.userdata import FileSpec, load_file


@pytest.fixture(scope="module")
def points():
    g = np.random.default_rng(0)
    return np.concatenate([g.normal(0, 1, (60, 2)), g.normal(6, 1, (60, 2))])


@pytest.fixture(scope="module")
def files(points, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    frame = pd.DataFrame(points, columns=["x", "y"]).assign(label="a")
    frame.to_csv(tmp / "header.csv", index=False)
    np.savetxt(tmp / "plain.csv", points, delimiter=",")
    np.save(tmp / "points.npy", points)
    frame[["x", "y"]].to_parquet(tmp / "points.parquet")
    return tmp


@pytest.mark.parametrize(
    ("name", "columns"),
    [("header.csv", "x,y"), ("header.csv", "0,1"), ("plain.csv", None), ("points.npy", None), ("points.parquet", None)],
)
def test_every_format_gives_the_same_data_split_and_fingerprint(files, points, name, columns):
    ds = load_file(FileSpec(str(files / name), columns, seed=3))
    expected = torch.from_numpy(points.astype(np.float32))
    order = torch.randperm(120, generator=torch.Generator().manual_seed(4))  # the named datasets' rule: seed + 1
    torch.testing.assert_close(ds.val, expected[order[:24].sort().values], rtol=0, atol=0)
    torch.testing.assert_close(ds.train, expected[order[24:].sort().values], rtol=0, atol=0)
    assert ds.fingerprint == gmm.fingerprint(expected) and ds.mock is None


def test_standardize_uses_the_training_split(files):
    ds = load_file(FileSpec(str(files / "points.npy"), standardize=True))
    train = ds.train.double()
    torch.testing.assert_close(train.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert ds.fingerprint == load_file(FileSpec(str(files / "points.npy"))).fingerprint  # of the file's values


def _write(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "text", "options", "match"),
    [
        ("a.csv", "x,y\n1,2\n3,oops\n", {}, r"column 'y' is not numeric \(row 1.*holds 'oops'\); drop it with --columns"),
        ("b.csv", "x,y\n1,2\n3,\n5,6\n", {}, "1 row.*NaN or inf.*row 1 .*column 'y'; drop or impute"),
        ("c.csv", "x,y\n1,2\n", {"columns": "z"}, "no column 'z'; its columns are x, y"),
        ("d.txt", "1,2\n", {}, "use a .csv, .npy or .parquet file"),
    ],
)
def test_bad_files_name_the_problem_and_the_fix(tmp_path, name, text, options, match):
    with pytest.raises(ValueError, match=match):
        load_file(FileSpec(_write(tmp_path, name, text), **options))


def test_config_checks_the_file_and_its_size(files):
    with pytest.raises(ValueError, match="fewer than the 200 components"):
        ExperimentConfig(data_file=str(files / "points.npy"), components=200)
    with pytest.raises(ValueError, match="samples describe generated data"):
        ExperimentConfig(data_file=str(files / "points.npy"), samples=10)
    with pytest.raises(ValueError, match="pass data_file"):
        ExperimentConfig(standardize=True)
    cfg = ExperimentConfig(data_file=str(files / "header.csv"), columns="x,y", components=2)
    assert cfg.model_dims == 2 and cfg.model_components == 2
    assert load_dataset(cfg.data_spec()).train.shape == (96, 2)
    flat = cfg.flat()
    assert flat["samples"] == "120" and flat["dims"] == "2" and "radius" not in flat and "components" not in flat


def test_a_tracked_run_on_a_csv(files, mlflow_uri):
    cfg = ExperimentConfig(
        data_file=str(files / "header.csv"),
        columns="x,y",
        components=2,
        iterations=40,
        em=True,
        log_figures=False,
        log_model=False,
    )
    result = run_experiment(cfg, mlflow_uri)
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    tags = run.data.tags
    assert tags["dataset.name"] == "header.csv" and tags["dataset.shape"] == "120 x 2"
    assert tags["dataset.fingerprint"] == result.fingerprint and len(tags["dataset.file_sha256"]) == 64
    assert "96 train / 24 validation" in tags["dataset.split"]
    assert np.isnan(result.ari) and np.isnan(result.true_nll_train) and np.isfinite(result.em_nll_train)
    assert "summary/ari" not in run.data.metrics  # no truth behind a file: not logged


def test_cli_bad_file_is_one_line_and_exit_2(tmp_path, mlflow_uri, capsys):
    path = _write(tmp_path, "bad.csv", "x,y\n1,a\n")
    with pytest.raises(SystemExit) as info:
        main(["--data", path, "--tracking-uri", mlflow_uri])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "column 'y' is not numeric" in err and err.count("\n") == 1, err


def test_fit_and_fit_em_take_a_dataframe(points):
    frame = pd.DataFrame(points, columns=["x", "y"])
    a, b = gmm.make_model("full", 2, 2, dtype=torch.float64), gmm.make_model("full", 2, 2, dtype=torch.float64)
    assert a.fit(frame, num_iterations=20) == b.fit(torch.from_numpy(points), num_iterations=20)
    assert a.fit_em(frame) == b.fit_em(torch.from_numpy(points))
    with pytest.raises(TypeError, match=r"non-numeric column\(s\) 'name'; select the numeric ones"):
        a.fit(frame.assign(name="p"))


@pytest.mark.slow
def test_a_seed_report_on_a_file_and_its_verification(files, tmp_path, capsys):
    from experiments.report import main as report_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "report"
    common = ["--tracking-uri", uri]
    argv = [
        "--data",
        str(files / "points.npy"),
        "--components",
        "2",
        "--seeds",
        "2",
        "--iterations",
        "30",
        "--out",
        str(out),
    ]
    assert report_main([*argv, "--no-log-figures", *common]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and runs["data_seed"].tolist() == [0, 0, 1, 1]  # a fresh split per seed
    assert "on the data file" in (out / "report.md").read_text()
    assert report_main(["--verify", str(out), *common]) == 0
    assert "PASS" in capsys.readouterr().out


def test_report_precision_rule_glossary_and_packages():
    from experiments.report import GLOSSARY, RUN_COLUMNS, installed_packages
    from experiments.report_doc import _decimals, _fmt_stat

    assert set(RUN_COLUMNS) <= set(GLOSSARY)  # every column is explained
    d = _decimals(1.3)  # two significant digits of the spread decide the decimals of every number of the cell
    assert (_fmt_stat(0.853288, d), _fmt_stat(1.3, d)) == ("0.9", "1.3")
    assert _fmt_stat(4.02761, _decimals(0.24)) == "4.03" and _fmt_stat(300, _decimals(0.0)) == "300"
    packages = installed_packages()
    assert any(p.startswith("torch==") for p in packages) and packages == sorted(
        packages, key=lambda p: p.split("==")[0].lower()
    )
