"""Optuna studies: which clamp value and learning rates fit each covariance family reliably.

    python -m studies.run --family full     # or `make study FAMILY=full`; FAMILY=all runs every family
    python -m studies.dashboard             # optuna-dashboard on the study storage (127.0.0.1)

A study of family F is named "F-<STUDY_VERSION>"; it fits the datasets `F-*` of experiments.datasets with
trial parameters drawn from studies/space.yaml, minimizes the mean validation NLL, and is tracked in MLflow
(one parent run per invocation, one nested run per trial, one per fit). See README.md.

Dependencies point one way: gmm <- experiments <- studies.
"""

STUDY_VERSION = "v4"  # bump when the objective changes (datasets, iterations, space) so studies start afresh
