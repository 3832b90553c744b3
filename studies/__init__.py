"""Optuna studies: which clamp value and learning rates fit each covariance family reliably.

    python -m studies.run --family full     # or `make study FAMILY=full`; FAMILY=all runs every family
    python -m studies.dashboard             # optuna-dashboard on the study storage (127.0.0.1)

A study of family F is named "F-<STUDY_VERSION>"; it fits the datasets `F-*` of experiments.datasets with
trial parameters drawn from studies/space.yaml, minimizes the mean validation NLL, and is tracked in MLflow
(one parent run per invocation, one nested run per trial, one per fit). See README.md.

Modules, one job each:
    run.py        the command line: flags, argument checks, the settings of each family, the exit status
    study.py      one study: create it or join it, run its trials under one MLflow parent run, summarize
    worker.py     the trial loop of one process (batched, with heartbeats) and the pool of spawned workers
    objective.py  a trial: suggest, fit each dataset (tracked in MLflow), report to the pruner
    space.py      the search space (space.yaml), checked against ExperimentConfig's fields
    datasets.py   the study's named datasets or data file, and their fingerprints
    sampling.py   the TPE sampler, the pruners, per-worker sampler seeds
    storage.py    storage URLs, heartbeats and dead-worker detection, retries of stale trials
    stale.py      MLflow runs left open by a dead worker, and the storage's stale-trial callback
    summary.py    the summary record, the closing table, the best-parameter file
    artifacts.py  best_params.json, trials.csv and figures on the parent run
    progress.py   the progress bar / per-trial log lines
    logs.py       logging set-up of the command and its worker processes
    clamp_profile.py, dashboard.py: their own commands

Dependencies point one way: gmm <- experiments <- studies.
"""

STUDY_VERSION = "v4"  # bump when the objective changes (datasets, iterations, space) so studies start afresh
