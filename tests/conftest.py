"""Shared fixtures: real MLflow and Optuna stores in a temporary folder, one torch thread per worker."""

from __future__ import annotations

import os

import pytest
import torch

# pytest-xdist runs several workers (`make test`: 4 on 2 cores): one intra-op thread each avoids oversubscription
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# a study's MLflow writes go through a helper process (experiments.writer), one interpreter start (about 2 s
# of CPU) per study command: the many small in-process studies of the suite write themselves, and the tests
# that need the helper turn it on (the `writer_on` fixture: tests/test_writer.py, tests/test_study_e2e.py)
os.environ.setdefault("GMM_WRITE_BEHIND", "0")


@pytest.fixture
def writer_on(monkeypatch) -> None:
    """The product's default: a study's MLflow writes made by a helper process (also in child processes)."""
    monkeypatch.setenv("GMM_WRITE_BEHIND", "1")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow tracking store. The working directory moves to tmp_path, so artifacts of
    experiments created without an explicit artifact location land there and not in the repository."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def optuna_storage(tmp_path) -> str:
    """A fresh Optuna RDB storage URL on SQLite."""
    return f"sqlite:///{tmp_path / 'optuna.db'}"
