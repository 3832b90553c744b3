"""Mini-batch fits (`batch_size`): the full data's NLL at the log points, and the same optimum as full batch."""

from __future__ import annotations

import math

import pytest
import torch

import gmm


@pytest.fixture(scope="module")
def demo_data() -> torch.Tensor:
    """The demo's problem: 1000 points from 5 full-covariance components in 2-D, radius 8, seed 42."""
    return gmm.generate_data(1000, 5, 2, radius=8, family="full", seed=42).data


def test_minibatch_reaches_the_full_batch_nll(demo_data):
    options = dict(num_iterations=600, component_lr=0.05, seed=42)
    full = gmm.fit(gmm.GmmFull(5, 2), demo_data, **options)
    batched = gmm.fit(gmm.GmmFull(5, 2), demo_data, batch_size=200, **options)
    assert batched.final_nll < batched.nll_history[batched.exact_steps[0]]  # it learned
    assert abs(batched.final_nll - full.final_nll) < 0.02


def test_minibatch_log_points_hold_the_full_data_nll(demo_data):
    model = gmm.GmmFull(5, 2)
    seen: dict[int, float] = {}

    def callback(step: int, nll: float, events: list) -> None:
        assert math.isclose(nll, model.nll(demo_data), rel_tol=0, abs_tol=1e-9)  # after `step` updates
        seen[step] = nll

    result = gmm.fit(model, demo_data, num_iterations=100, log_freq=25, batch_size=64, seed=0, callback=callback)
    assert result.exact_steps.tolist() == [25, 50, 75, 100] == sorted(seen)
    for step, nll in seen.items():  # the history records the exact value at each log point
        assert result.nll_history[step].item() == pytest.approx(nll, abs=1e-12)
    assert result.final_nll == pytest.approx(model.nll(demo_data), abs=1e-12)
    estimates = result.nll_history[1:25]  # between log points: single batches' NLLs, noisy
    assert estimates.std() > 0


def test_minibatch_tol_compares_log_points(demo_data):
    """Learning rates 0: the full-data NLL is the same at every log point while the batch estimates differ by
    far more than tol, so the fit stops at the 2nd log point if and only if `tol` reads the exact values."""
    result = gmm.fit(gmm.GmmFull(5, 2), demo_data, num_iterations=2000, log_freq=50, batch_size=100, tol=1e-9,
                     mixture_lr=0.0, component_lr=0.0)  # fmt: skip
    assert float(result.nll_history[1:50].std()) > 1e-3  # batch estimates: noisy
    assert result.converged and result.num_iterations == 100
    assert result.completed and result.exact_steps.tolist() == [50, 100]
    # with learning, consecutive log points differ by more than 1e-9 nats: no early stop
    moving = gmm.fit(gmm.GmmFull(5, 2), demo_data, num_iterations=150, log_freq=50, batch_size=100, tol=1e-9)
    assert not moving.converged and moving.num_iterations == 150


def test_batch_size_at_least_n_is_the_full_batch(demo_data):
    a = gmm.fit(gmm.GmmFull(5, 2), demo_data, num_iterations=30, seed=1)
    b = gmm.fit(gmm.GmmFull(5, 2), demo_data, num_iterations=30, seed=1, batch_size=5000)
    assert torch.equal(a.nll_history, b.nll_history)
    assert b.exact_steps.tolist() == list(range(31))
