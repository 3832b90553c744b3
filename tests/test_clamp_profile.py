"""studies.clamp_profile and the study summary's clamp importance, on states the tests build."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from studies.clamp_profile import format_profile, profile
from studies.summary import clamp_importance

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_binds_on_a_point_mass_at_a_high_learning_rate_and_not_at_a_floor_above_it():
    """diagonal-point-mass at component_lr 0.1, resets off, 300 steps: the spare component on the copies
    (its mean fixed, tests/test_benchmark.py) lowers its log variance by about 0.1 a step from ~1, so it
    passes a floor of 1e-4 within ~100 steps (clamp events) and never comes near one of 1e-30 (none)."""
    best = {"family": "diagonal", "iterations": 300, "seed": 42, "component_lr": 0.1, "mixture_lr": 0.01}
    best["reset"] = False
    points = profile(best, ("diagonal-point-mass",), clamps=(1e-30, 1e-4))
    assert [p.clamp for p in points] == [1e-30, 1e-4]
    assert points[0].clamps == 0 and points[1].clamps > 0 and points[1].resets == 0
    # collapse onto the copies is rewarded on training only: validation never holds them, so the value moves
    assert all(p.value == p.value and p.value < 1e3 for p in points)
    text = format_profile(points)
    assert "best clamp" in text and "worst" in text and text.count("\n") == 3


def _study(trials: list[tuple[float, float, float]]) -> optuna.Study:
    """A study holding complete trials (clamp, component_lr, value)."""
    study = optuna.create_study()
    dist = {
        "clamp": optuna.distributions.FloatDistribution(1e-8, 1e-1, log=True),
        "component_lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True),
    }
    for clamp, lr, value in trials:
        params = {"clamp": clamp, "component_lr": lr}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value))
    return study


def test_clamp_importance_follows_the_parameter_that_moves_the_value():
    rng = random.Random(0)
    draws = [(10 ** rng.uniform(-8, -1), 10 ** rng.uniform(-3, math.log10(0.3))) for _ in range(30)]
    by_clamp = clamp_importance(_study([(c, lr, 4.0 + 0.1 * math.log10(c)) for c, lr in draws]))
    by_lr = clamp_importance(_study([(c, lr, 4.0 + 0.1 * math.log10(lr)) for c, lr in draws]))
    assert by_clamp > 0.8 and by_lr < 0.2, (by_clamp, by_lr)
    assert clamp_importance(_study(draws and [(1e-3, 0.01, 1.0), (1e-4, 0.02, 2.0)])) is None  # too few to say


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--best", "/nonexistent/best.json"], "no best-parameter file /nonexistent/best.json"),
        (["--clamps", "1e-4,zero"], "--clamps must be positive numbers"),
        (["--set", "component_lr=["], "the value is not a number"),
        (["--set", "family=nonsense"], "nonsense"),
        (["--set", "dataset=5"], "is not a named dataset"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"family": "full", "iterations": 10}))
    argv = args if "--best" in args else ["--best", str(best), *args]
    proc = subprocess.run([sys.executable, "-m", "studies.clamp_profile", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_bad_set_value_is_one_line_naming_it(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"family": "diagonal", "iterations": 10}))
    argv = ["--best", str(best), "--clamps", "1e-4", "--set", "component_lr=-1"]
    proc = subprocess.run([sys.executable, "-m", "studies.clamp_profile", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "component_lr" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_best_file_that_is_not_an_object_is_one_line(tmp_path):
    best = tmp_path / "best.json"
    best.write_text("[1, 2]")
    proc = subprocess.run(
        [sys.executable, "-m", "studies.clamp_profile", "--best", str(best)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not the parameter object" in proc.stderr and "Traceback" not in proc.stderr
