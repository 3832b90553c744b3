"""python -m gmm.demo: the original flags and defaults, real booleans for --visualize, one-line errors with
exit status 2, and an end-to-end run in a subprocess that prints the losses and writes the figure."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

import gmm
from gmm.demo import DEFAULT_FIGURE, build_parser, main, parse_bool

MIN_PNG_BYTES = 10_000


def _headless_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return env


def _demo(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gmm.demo", *args],
        cwd=cwd,
        env=_headless_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_defaults_are_the_originals():
    args = build_parser().parse_args([])
    assert (args.samples, args.components, args.dims, args.iterations) == (1000, 5, 2, 20_000)
    assert (args.family, args.log_freq, args.radius) == ("full", 5_000, 8.0)
    assert (args.mixture_lr, args.component_lr, args.visualize, args.seed) == (3e-5, 1e-2, True, 42)
    assert args.em is False and args.out is None and args.init == gmm.FitOptions.init


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], True),
        (["--visualize"], True),
        (["--visualize", "true"], True),
        (["--visualize", "False"], False),  # type=bool would have made this True
        (["--visualize", "false"], False),
        (["--visualize=0"], False),
        (["--visualize", "1"], True),
        (["--visualize", "no"], False),
        (["--visualize", "YES"], True),
        (["--visualize", "--seed", "3"], True),
    ],
)
def test_visualize_parses_real_booleans(argv, expected):
    assert build_parser().parse_args(argv).visualize is expected


def test_parse_bool_rejects_other_words():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="boolean"):
        parse_bool("maybe")


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_every_family_is_accepted(family):
    assert build_parser().parse_args(["--family", family]).family == family


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments"),
        (["--family", "fulll"], "did you mean 'full'"),
        (["--family", "diag"], "did you mean 'diagonal'"),
        (["--init", "kmeans"], "did you mean 'kmeans++'"),
        (["--visualize", "maybe"], "boolean"),
        (["--samples", "ten"], "invalid int value"),
        (["--samples", "0"], "num_samples must be >= 1"),
        (["--samples", "4"], "num_components=5"),
        (["--radius", "-1"], "radius must be > 0"),
        (["--mixture_lr", "-1", "--visualize", "false"], "mixture_lr must be >= 0"),
        (["--clamp", "0", "--visualize", "false"], "clamp must be > 0"),
        (["--log_freq", "0", "--visualize", "false"], "log_freq must be >= 1"),
        (["--iterations", "0", "--visualize", "false"], "num_iterations must be >= 1"),
        (["--out", "fit.xyz"], "unknown format 'xyz'"),
        (["--out", "fit.png", "--visualize", "false"], "--out needs the figure"),
    ],
)
def test_bad_flags_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


def test_in_process_run_without_figure(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--samples", "200", "--components", "3", "--iterations", "40", "--log_freq", "20"]
    assert main([*argv, "--family", "diagonal", "--visualize", "false"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Iteration: 20, Loss: \d+\.\d{4}$", out, re.M)
    assert re.search(r"^Iteration: 40, Loss: \d+\.\d{4}$", out, re.M)
    assert re.search(r"^Final Loss: \d+\.\d\d$", out, re.M)
    assert re.search(r"^True NLL: \d+\.\d{6}", out, re.M)
    assert list(tmp_path.iterdir()) == []  # --visualize false: no figure written


def test_warns_when_the_fit_ends_far_above_the_truth(capsys, tmp_path, monkeypatch):
    """A start that cannot move (both learning rates 0) from the original's uniform draw: far above the truth."""
    monkeypatch.chdir(tmp_path)
    argv = ["--samples", "200", "--components", "3", "--iterations", "2", "--log_freq", "2", "--init", "radius"]
    assert main([*argv, "--component_lr", "0", "--mixture_lr", "0", "--visualize", "false"]) == 0
    captured = capsys.readouterr()
    gd = float(re.search(r"^GD NLL: (\S+)", captured.out, re.M).group(1))
    true = float(re.search(r"^True NLL: (\S+)", captured.out, re.M).group(1))
    assert gd - true > 0.05
    assert re.search(r"warning: the fit ends \d+\.\d{4} nats above the true parameters' NLL", captured.err)
    assert main([*argv[:-2], "--init", "kmeans++", "--n_init", "3", "--visualize", "false"]) == 0  # flag accepted


def test_em_prints_both_nlls_from_the_same_start(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--samples", "300", "--components", "3", "--iterations", "300", "--log_freq", "300"]
    assert main([*argv, "--em", "--out", "fit.png", "--component_lr", "5e-2", "--mixture_lr", "5e-2"]) == 0
    out = capsys.readouterr().out
    gd = float(re.search(r"^GD NLL: (\S+)", out, re.M).group(1))
    em = float(re.search(r"^EM NLL: (\S+) \(\d+ iterations", out, re.M).group(1))
    diff = float(re.search(r"^GD - EM: (\S+) nats/sample$", out, re.M).group(1))
    assert diff == pytest.approx(gd - em, abs=2e-6)
    assert math.isfinite(gd) and math.isfinite(em)
    assert (tmp_path / "fit.png").stat().st_size > MIN_PNG_BYTES


@pytest.mark.slow
def test_subprocess_smoke_writes_default_figure(tmp_path):
    """The real command, headless and with no --out: progress, losses, and demo.png in the working folder."""
    proc = _demo("--iterations", "200", "--log_freq", "100", "--em", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Data: 1000 samples from a 5-component full mixture in 2 dims")
    assert re.fullmatch(r"Iteration: 100, Loss: \d+\.\d{4}", lines[1])
    assert re.fullmatch(r"Iteration: 200, Loss: \d+\.\d{4}", lines[2])
    assert re.fullmatch(r"Final Loss: \d+\.\d\d", lines[3])
    assert any(re.fullmatch(r"True NLL: \d+\.\d{6} \(the generating parameters\)", line) for line in lines)
    assert any(re.fullmatch(r"EM NLL: \d+\.\d{6} \(\d+ iterations, .*\)", line) for line in lines)
    assert lines[-1] == f"Figure saved to {DEFAULT_FIGURE}"
    assert (tmp_path / DEFAULT_FIGURE).stat().st_size > MIN_PNG_BYTES
    assert proc.stderr == ""


def test_subprocess_bad_family_is_one_line(tmp_path):
    proc = _demo("--family", "isotropc", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "did you mean 'isotropic'" in proc.stderr
