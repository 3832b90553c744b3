"""A study of your own data file (studies.run --data): its settings, the best-parameter file and the hint."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest

from experiments import ExperimentConfig, load_dataset
from studies.progress import time_left
from studies.run import main


@pytest.mark.slow
def test_a_study_on_a_csv_writes_a_best_file_that_fits_the_same_data(tmp_path, capsys):
    g = np.random.default_rng(0)
    points = np.concatenate([g.normal(0, 1, (40, 2)), g.normal(6, 1, (40, 2))])
    pd.DataFrame(points, columns=["x", "y"]).assign(note="n").to_csv(tmp_path / "mine.csv", index=False)
    storage = str(tmp_path / "studies.log")
    argv = ["--family", "diagonal", "--data", str(tmp_path / "mine.csv"), "--columns", "x,y", "--components", "2"]
    argv += ["--trials", "2", "--iterations", "20", "--eval-every", "10", "--storage", storage]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--best-dir", str(tmp_path / "best"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fit them on the same data: make run CONFIG=" in out
    best = json.loads((tmp_path / "best" / "diagonal-mine-v4.json").read_text())  # the study is named after the file
    assert best["data_file"] == str(tmp_path / "mine.csv") and best["columns"] == "x,y" and best["components"] == 2
    config = ExperimentConfig.from_dict(best)
    study = optuna.load_study(
        study_name="diagonal-mine-v4",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)),
    )
    recorded = study.user_attrs["settings"]
    assert recorded["datasets"] == ["mine.csv"] and recorded["data"]["data_file"] == best["data_file"]
    assert recorded["fingerprints"]["mine.csv"] == load_dataset(config.data_spec()).fingerprint


def test_bad_data_options_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n3,z\n")
    assert main(["--data", str(tmp_path / "bad.csv"), "--storage", str(tmp_path / "s.log")]) == 2
    err = capsys.readouterr().err
    assert "column 'y' is not numeric" in err and err.count("\n") == 1
    assert main(["--standardize", "--storage", str(tmp_path / "s.log")]) == 2
    assert "pass --data too" in capsys.readouterr().err


def testtime_left():
    assert time_left(10.0, 2, 6) == ", about 20 s left"
    assert time_left(100.0, 1, 5) == ", about 7 min left"
    assert time_left(10.0, 5, 5) == ""
