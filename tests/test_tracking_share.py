"""bench.tracking_share: the share of a study's trials loop spent on tracking, read from a py-spy raw profile."""

from __future__ import annotations

import pytest

from bench.tracking_share import main, share

LINES = [
    # outside the trials loop: not counted
    "main (studies/run.py:1);get_client (experiments/tracking.py:9) 50",
    # the fit: the loop, no tracking
    "optimize (studies/worker.py:82);run_batch (studies/objective.py:275);step (gmm/steps.py:10) 80",
    # tracking: a run's record, the pipe write below it; MLflow called from the loop
    "optimize (studies/worker.py:82);log_fit_record (experiments/run_log.py:250);_post (experiments/writer.py:160) 6",
    "optimize (studies/worker.py:82);tracked_run (experiments/tracking.py:400);create_run (mlflow/client.py:1) 4",
    # Evaluator is run_log.py, but measuring, not logging
    "optimize (studies/worker.py:82);Evaluator.record (experiments/run_log.py:150) 5",
    # Optuna's storage: apart
    "optimize (studies/worker.py:82);set_user_attr (optuna/storages/journal/_storage.py:1) 5",
    "not a stack line",
]


def test_the_share_counts_tracking_frames_below_the_trials_loop_and_optuna_apart():
    total, tracking, optuna, outermost = share(LINES)
    assert (total, tracking, optuna) == (100, 10, 5)
    assert outermost == {"log_fit_record": 6, "tracked_run": 4}


def test_the_command_prints_the_share_and_refuses_a_file_without_the_loop(tmp_path, capsys):
    profile = tmp_path / "p.txt"
    profile.write_text("\n".join(LINES) + "\n")
    assert main([str(profile)]) == 0
    assert "tracking 10.0% (target <= 5%), Optuna's storage 5.0%" in capsys.readouterr().out
    profile.write_text(LINES[0] + "\n")
    with pytest.raises(SystemExit, match="no samples in the trials loop"):
        main([str(profile)])
