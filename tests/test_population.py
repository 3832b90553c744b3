"""Population fits (gmm.population): B mixtures in one batched loop, each member the fit it would be alone.

The oracle is the unbatched fit itself: member i of a population fit with per-member options must give the
record `gmm.fit` gives `model.member(i)` with member i's options (float64 histories to 1e-10: the batched sums
round in another order, and over a few hundred moderate steps that stays at ~1e-15; the same events, detail
strings included). Stops are checked on states the tests build: a member whose learning rate makes its NLL
overflow, a member that reaches `tol`, a member the callback stops.
"""

from __future__ import annotations

import math

import pytest
import torch

import gmm
from gmm.population import PopulationResult

FAMILIES = [f for f in gmm.FAMILIES]


def _blobs(seed: int = 0, n: int = 240) -> torch.Tensor:
    return gmm.generate_data(n, 3, 2, radius=6.0, family="full", seed=seed).data.double()


def _record(r: gmm.FitResult) -> list[tuple]:
    return [(e.step, e.component, e.kind, e.detail) for e in r.events]


def _same_fit(member: gmm.FitResult, alone: gmm.FitResult, model_a: gmm.MixtureModel, model_b: gmm.MixtureModel):
    torch.testing.assert_close(member.nll_history, alone.nll_history, rtol=0, atol=1e-10)
    assert _record(member) == _record(alone)
    assert (member.best_step, member.num_iterations, member.converged) == (
        alone.best_step,
        alone.num_iterations,
        alone.converged,
    )
    assert member.final_nll == pytest.approx(alone.final_nll, abs=1e-10)
    for a, b in zip(
        (model_a.logits, model_a.locs, model_a.raw_cov), (model_b.logits, model_b.locs, model_b.raw_cov), strict=True
    ):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_member_is_the_fit_it_would_be_alone(family):
    x = _blobs()
    # member 2's clamp (3.0, above every cluster's variance) clamps at every step: clamp events, and resets where
    # the component's mass is small; member 1 runs without resets and with another schedule
    options = {
        "component_lr": [0.01, 0.05, 0.03],
        "mixture_lr": [0.02, 0.0, 0.05],
        "clamp": [1e-6, 1e-3, 3.0],
        "seed": [0, 1, 2],
        "reset": [True, False, True],
        "lr_schedule": ["cosine", "constant", "cosine"],
    }
    population = gmm.make_model(family, 4, 2, batch_shape=(3,), dtype=torch.float64)
    result = gmm.fit(population, x, num_iterations=200, **options)
    assert isinstance(result, PopulationResult) and population.fit_result_ is result and len(result) == 3
    for i in range(3):
        alone = gmm.make_model(family, 4, 2, dtype=torch.float64)
        expected = gmm.fit(alone, x, num_iterations=200, **{k: v[i] for k, v in options.items()})
        _same_fit(result[i], expected, population.member(i), alone)
        assert all(e.member == i for e in result[i].events)
        assert population.member(i).fit_result_ is result[i]
    if family != "constant":
        assert result[2].clamp_count > 0  # the record compared above has events in it
    torch.testing.assert_close(result.final_nll, torch.tensor([r.final_nll for r in result], dtype=torch.float64))


def test_members_with_one_seed_share_their_k_means_runs_and_each_is_still_its_fit_alone(monkeypatch):
    # a study's trials: one data set, one seed, clamps and rates apart. The k-means runs are made once per seed
    # (gmm.init's `shared`); each member's choice among them (it depends on the clamp), its generator state
    # after them (member 2's resets draw from it) and so its whole fit are still what gmm.fit gives it alone
    import gmm.init
    import gmm.population

    made, kept = [], []
    runs, start = gmm.init._kmeans_runs, gmm.population.make_start
    monkeypatch.setattr(gmm.init, "_kmeans_runs", lambda *a: made.append(1) or runs(*a))
    monkeypatch.setattr(gmm.population, "make_start", lambda *a: kept.append(a[-1] is not None) or start(*a))
    x = torch.cat([_blobs(2), torch.tensor([[30.0, -30.0]], dtype=torch.float64)])  # an isolated point: a reset
    options = {"component_lr": [0.01, 0.05, 0.03, 0.02], "clamp": [1e-6, 1e-3, 3.0, 1e-3], "seed": [7, 7, 7, 8]}
    population = gmm.make_model("full", 4, 2, batch_shape=(4,), dtype=torch.float64)
    result = gmm.fit(population, x, num_iterations=60, **options)
    assert len(made) == 2  # seeds 7 and 8
    assert kept == [True, True, True, False]  # seed 8, alone on its seed, keeps nothing to share
    assert result[2].reset_count > 0  # drawn from the generator the shared runs left
    for i in range(4):
        alone = gmm.make_model("full", 4, 2, dtype=torch.float64)
        expected = gmm.fit(alone, x, num_iterations=60, **{k: v[i] for k, v in options.items()})
        _same_fit(result[i], expected, population.member(i), alone)
    assert len(made) == 2 + 4


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_a_member_on_a_point_mass_collapses_and_is_reset_like_alone(family):
    # a built state: component 0 of every member sits on an isolated point with a variance just above the clamp
    x = torch.cat([_blobs(1, 120), torch.tensor([[30.0, -30.0]], dtype=torch.float64)])
    start = gmm.make_model(family, 3, 2, dtype=torch.float64)
    gmm.fit(start, x, num_iterations=1, component_lr=0.0, mixture_lr=0.0)  # a k-means start
    clamp = 1e-3
    with torch.no_grad():
        start.locs[0] = x[-1]
        start.raw_cov[0] = start.family.from_covariances(1.05 * clamp * torch.eye(2, dtype=torch.float64)[None])[0]
    population = gmm.make_model(family, 3, 2, batch_shape=(2,), dtype=torch.float64)
    for i in range(2):
        population.set_member(i, start)
    options = {"seed": [3, 4], "reset": [True, False], "component_lr": 0.05, "clamp": clamp, "init": "keep"}
    result = gmm.fit(population, x, num_iterations=20, **options)
    assert result[0].reset_count >= 1 and result[1].reset_count == 0 and result[1].clamp_count >= 1
    assert result[0].recovered_count >= 1  # the reset component recovers: every kind of event, each with its member
    assert all(e.member == i for i in range(2) for e in result[i].events)
    for i in range(2):
        alone = gmm.make_model(family, 3, 2, dtype=torch.float64)
        alone.load_state_dict(start.state_dict())
        expected = gmm.fit(
            alone, x, num_iterations=20, **{k: (v[i] if isinstance(v, list) else v) for k, v in options.items()}
        )
        _same_fit(result[i], expected, population.member(i), alone)


def test_a_component_on_a_line_is_not_recovered_while_one_axis_stays_on_the_floor():
    # a built state: component 0 sits on a cluster of points on the line y = 0, its y variance at the floor and
    # its x variance far above it. A clamped component has recovered only once every floored entry is off the
    # floor, so this one stays watched (no "recovered" event) while its NLL keeps improving, as alone
    g = torch.Generator().manual_seed(0)
    line = torch.stack([torch.randn(150, generator=g, dtype=torch.float64), torch.zeros(150, dtype=torch.float64)], 1)
    x = torch.cat([line, torch.randn(150, 2, generator=g, dtype=torch.float64) + 6.0])
    clamp = 1e-3
    start = gmm.make_model("full", 2, 2, dtype=torch.float64)
    covariances = torch.stack([torch.diag(torch.tensor([1.0, 1.05 * clamp])), torch.eye(2)]).double()
    start.set_parameters(means=torch.tensor([[0.0, 0.0], [6.0, 6.0]]).double(), covariances=covariances)
    population = gmm.make_model("full", 2, 2, batch_shape=(2,), dtype=torch.float64)
    for i in range(2):
        population.set_member(i, start)
    options = {"seed": [0, 1], "component_lr": [0.02, 0.05], "clamp": clamp, "init": "keep", "reset": False}
    result = gmm.fit(population, x, num_iterations=60, standardize=False, **options)
    for i in range(2):
        assert result[i].clamp_count >= 1 and result[i].recovered_count == 0  # clamped, watched, never recovered
        alone = gmm.make_model("full", 2, 2, dtype=torch.float64)
        alone.load_state_dict(start.state_dict())
        expected = gmm.fit(
            alone, x, num_iterations=60, standardize=False,
            **{k: (v[i] if isinstance(v, list) else v) for k, v in options.items()},
        )  # fmt: skip
        # the same record; the parameters agree to 1e-6 only (the floored axis's 1/variance gradients amplify the
        # batched sums' other rounding order)
        torch.testing.assert_close(result[i].nll_history, expected.nll_history, rtol=0, atol=1e-10)
        assert _record(result[i]) == _record(expected)
        torch.testing.assert_close(population.member(i).logits, alone.logits, rtol=0, atol=1e-6)


def test_members_with_their_own_data():
    data = torch.stack([_blobs(s) for s in (0, 1)])  # (B, N, D)
    population = gmm.make_model("full", 3, 2, batch_shape=(2,), dtype=torch.float64)
    result = gmm.fit(population, data, num_iterations=100, seed=5)
    for i in range(2):
        alone = gmm.make_model("full", 3, 2, dtype=torch.float64)
        _same_fit(result[i], gmm.fit(alone, data[i], num_iterations=100, seed=5), population.member(i), alone)
    torch.testing.assert_close(population.nll(data), result.final_nll, rtol=0, atol=1e-10)


def test_a_member_with_a_non_finite_nll_stops_alone():
    x = _blobs()
    population = gmm.make_model("diagonal", 3, 2, batch_shape=(3,), dtype=torch.float64)
    # member 1's log variances move by ~1e4 per step: exp overflows and its NLL becomes non-finite
    lrs = [0.01, 1e4, 0.02]
    result = gmm.fit(population, x, num_iterations=50, component_lr=lrs, spike_threshold=None, seed=0)
    failed = result[1]
    assert (
        not failed.completed and "non-finite" in failed.stop_reason and isinstance(result.errors[1], gmm.NonFiniteNLLError)
    )
    assert torch.isfinite(failed.nll_history).all() and len(failed.nll_history) < 50
    member = population.member(1)
    assert all(torch.isfinite(p).all() for p in (member.logits, member.locs, member.raw_cov))
    assert math.isfinite(member.nll(x))  # the last finite parameters, kept
    for i in (0, 2):
        alone = gmm.make_model("diagonal", 3, 2, dtype=torch.float64)
        expected = gmm.fit(alone, x, num_iterations=50, component_lr=lrs[i], spike_threshold=None, seed=0)
        _same_fit(result[i], expected, population.member(i), alone)
        assert result[i].completed and result.errors[i] is None


def test_a_member_that_reaches_tol_stops_and_no_longer_changes():
    x = _blobs()
    population = gmm.make_model("full", 3, 2, batch_shape=(2,), dtype=torch.float64)
    result = gmm.fit(population, x, num_iterations=300, tol=[1e-3, None], seed=0)
    assert result[0].converged and result[0].num_iterations < 300 and "tol" in result[0].stop_reason
    assert result[1].num_iterations == 300 and not result[1].converged
    alone = gmm.make_model("full", 3, 2, dtype=torch.float64)
    _same_fit(result[0], gmm.fit(alone, x, num_iterations=300, tol=1e-3, seed=0), population.member(0), alone)


def test_the_callback_sees_every_member_and_can_stop_one():
    x = _blobs()
    population = gmm.make_model("diagonal", 3, 2, batch_shape=(3,), dtype=torch.float64)
    seen: list[tuple[int, list[float]]] = []
    frozen: dict[str, torch.Tensor] = {}

    def callback(step, nlls, new_events):
        seen.append((step, list(nlls)))
        if step == 20:
            frozen["locs"] = population.locs.detach()[1].clone()  # data units, as the callback sees them
            return [1]
        return None

    result = gmm.fit(population, x, num_iterations=100, log_freq=10, callback=callback, keep_best=False, seed=0)
    assert [s for s, _ in seen] == list(range(10, 101, 10))
    assert all(math.isnan(nlls[1]) for s, nlls in seen if s > 20) and all(
        math.isfinite(v) for _, n in seen for v in (n[0], n[2])
    )
    assert result[1].num_iterations == 20 and "callback" in result[1].stop_reason and result[1].completed
    torch.testing.assert_close(population.member(1).locs.detach(), frozen["locs"], rtol=0, atol=1e-12)
    assert result[0].num_iterations == 100
    # as for one fit, the NLL shown at step t is the history's entry t - 1 (the iterate step t scored)
    assert seen[1][1] == pytest.approx([float(r.nll_history[19]) for r in result], abs=1e-12)


def test_fits_in_chunks_over_n_equal_one_chunk(monkeypatch):
    import gmm.model

    x = _blobs(n=2600)
    whole = gmm.make_model("tied", 3, 2, batch_shape=(2,), dtype=torch.float64)
    expected = gmm.fit(whole, x, num_iterations=40, seed=[0, 1])
    monkeypatch.setattr(gmm.model, "_CHUNK_ELEMENTS", 1)  # 1024 rows a chunk: three chunks
    chunked = gmm.make_model("tied", 3, 2, batch_shape=(2,), dtype=torch.float64)
    result = gmm.fit(chunked, x, num_iterations=40, seed=[0, 1])
    for i in range(2):
        torch.testing.assert_close(result[i].nll_history, expected[i].nll_history, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_densities_are_each_members(family):
    population = gmm.make_model(family, 3, 2, batch_shape=(4,), dtype=torch.float64)
    gmm.fit(population, _blobs(), num_iterations=5, seed=[0, 1, 2, 3], component_lr=0.1)
    x = _blobs(3, 50)
    members = [population.member(i) for i in range(4)]
    torch.testing.assert_close(population.log_prob(x), torch.stack([m.log_prob(x) for m in members]))
    torch.testing.assert_close(population.predict_proba(x), torch.stack([m.predict_proba(x) for m in members]))
    assert torch.equal(population.predict(x), torch.stack([m.predict(x) for m in members]))
    torch.testing.assert_close(population.score(x), torch.tensor([m.score(x) for m in members], dtype=torch.float64))
    torch.testing.assert_close(population.bic(x), torch.tensor([m.bic(x) for m in members], dtype=torch.float64))
    torch.testing.assert_close(population.covariances, torch.stack([m.covariances for m in members]))
    dist = population.to_distribution()
    assert dist.batch_shape == (4,)
    torch.testing.assert_close(dist.log_prob(x[:, None]).T, population.log_prob(x))
    samples, labels = population.sample(7, seed=3)
    assert samples.shape == (4, 7, 2) and labels.shape == (4, 7)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        samples[1], torch.stack([members[0].sample(7, generator=g)[0], members[1].sample(7, generator=g)[0]])[1]
    )


def test_bad_population_input_is_one_clear_error():
    x = _blobs()
    population = gmm.make_model("full", 3, 2, batch_shape=(2,))
    with pytest.raises(ValueError, match="component_lr has 3 values but the model has 2 members"):
        gmm.fit(population, x, component_lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="num_iterations is shared by every member"):
        gmm.fit(population, x, num_iterations=[10, 20])
    with pytest.raises(ValueError, match="batch_size=.*not supported for a batched model"):
        gmm.fit(population, x, batch_size=10)
    with pytest.raises(ValueError, match="analytic gradients are not batched"):
        gmm.fit(population, x, gradients="analytic")
    with pytest.raises(ValueError, match="3 data sets .* 2 members"):
        gmm.fit(population, torch.stack([x, x, x]))
    with pytest.raises(ValueError, match="clamp must be > 0"):
        gmm.fit(population, x, clamp=[1e-3, -1.0])
    with pytest.raises(IndexError, match="out of range"):
        population.member(2)
    with pytest.raises(ValueError, match="set_member"):
        population.set_parameters(means=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fit each member"):
        population.fit_em(x)
    with pytest.raises(ValueError, match="batch_shape must be"):
        gmm.make_model("full", 3, 2, batch_shape=(2, 3))
    with pytest.raises(ValueError, match="needs a batched model"):
        gmm.make_model("full", 3, 2).member(0)
    with pytest.raises(ValueError, match="set_member needs an unbatched 'full' model"):
        population.set_member(0, gmm.make_model("diagonal", 3, 2))


def test_an_interrupted_population_keeps_every_members_record():
    x = _blobs()
    population = gmm.make_model("full", 3, 2, batch_shape=(2,), dtype=torch.float64)

    def interrupt(step, nlls, new_events):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gmm.fit(population, x, num_iterations=100, log_freq=10, callback=interrupt)
    partial = population.fit_result_
    assert not partial.completed and [len(r.nll_history) for r in partial] == [30, 30]
    assert all(torch.isfinite(population.member(i).locs).all() for i in range(2))
