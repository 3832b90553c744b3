"""Experiment runner: one tracked fit per run (MLflow), named datasets, config files and a CLI.

    from experiments import ExperimentConfig, run_experiment, load_model
    result = run_experiment(ExperimentConfig(family="full", iterations=2000))
    model = load_model(result.run_id)

Dependencies point one way: gmm <- experiments <- studies. MLflow is imported only inside this package.
Names are imported lazily (PEP 562), so `python -m experiments.run` does not import its own module twice
and `import experiments` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DATASETS": "datasets",
    "DataSpec": "datasets",
    "Dataset": "datasets",
    "datasets_for_family": "datasets",
    "load_dataset": "datasets",
    "ExperimentConfig": "config",
    "tracked_run": "tracking",
    "resolve_tracking_uri": "tracking",
    "StopRun": "run",
    "ExperimentResult": "run",
    "run_experiment": "run",
    "load_model": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
