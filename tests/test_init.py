"""k-means starts: the batched Lloyd runs of `gmm.init.lloyd` against scikit-learn's Lloyd and against each run
alone."""

from __future__ import annotations

import pytest
import torch
from sklearn.cluster import KMeans

import gmm
from gmm.init import kmeans_plus_plus, lloyd


def _blobs(seed: int, n: int = 600, k: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, 2, generator=g, dtype=torch.float64) * 6
    return centers[torch.arange(n) % k] + torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_lloyd_run_is_scikit_learns_lloyd_from_the_same_seeds(seed):
    x = _blobs(seed)
    g = torch.Generator().manual_seed(seed)
    seeds = torch.stack([kmeans_plus_plus(x, 4, g) for _ in range(6)])  # (6, K, D)
    centers, labels = lloyd(x, seeds, iterations=100)
    for r in range(len(seeds)):
        ref = KMeans(4, init=seeds[r].numpy(), n_init=1, algorithm="lloyd", max_iter=100, tol=0.0).fit(x.numpy())
        torch.testing.assert_close(centers[r], torch.from_numpy(ref.cluster_centers_), rtol=0, atol=1e-9)
        assert torch.equal(labels[r], torch.from_numpy(ref.labels_).long())


def test_runs_together_are_each_run_alone_and_stop_at_their_own_convergence():
    x = _blobs(3, n=400, k=5)
    g = torch.Generator().manual_seed(7)
    seeds = torch.stack([kmeans_plus_plus(x, 5, g) for _ in range(8)])
    together = lloyd(x, seeds, iterations=3)  # few iterations: some runs converge, others are cut off
    for r in range(len(seeds)):
        alone = lloyd(x, seeds[r : r + 1], iterations=3)
        assert torch.equal(together[0][r], alone[0][0]) and torch.equal(together[1][r], alone[1][0])
    # a run cut off after 3 updates is not where a longer run ends: the iteration limit is each run's own
    longer = lloyd(x, seeds, iterations=50)
    assert any(not torch.equal(together[0][r], longer[0][r]) for r in range(len(seeds)))


def test_a_population_member_starts_where_the_fit_alone_starts():
    x = _blobs(4, n=500, k=3).float()
    population = gmm.make_model("full", 3, 2, batch_shape=(3,))
    population.fit(x, num_iterations=1, seed=[5, 6, 7], progress=False)
    for i, seed in enumerate([5, 6, 7]):
        one = gmm.make_model("full", 3, 2)
        one.fit(x, num_iterations=1, seed=seed, progress=False)
        # the same start (one k-means per member, its own seed); the NLL of a population member and of one fit are
        # two float32 computations of it (gmm.population's module docstring), equal to float32 rounding
        start, alone = population.fit_result_[i].nll_history[0], one.fit_result_.nll_history[0]
        torch.testing.assert_close(start, alone, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def test_the_judge_keeps_the_first_of_starts_whose_nlls_differ_by_rounding():
    # runs that found one partition under other labels score the same NLL up to the last bits, and which bits
    # depends on the math kernels: the first of them is kept on every machine, not whichever rounds lowest
    from gmm.init import _first_lowest

    a = 3.293349394649217
    assert _first_lowest([a + 2e-15, 3.5, a, a]) == 0
    assert _first_lowest([3.5, a * (1 + 1e-9), a]) == 2  # a real difference still decides
    assert _first_lowest([float("nan"), float("inf"), 4.0, 3.0]) == 3
    assert _first_lowest([float("nan"), float("nan")]) == 0


def test_the_kmeans_start_is_its_best_partition_whatever_the_label_order():
    # a data set of three far clusters: every seeding finds the same partition, and the start holds its means
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]], dtype=torch.float64)
    x = torch.cat([c + torch.randn(50, 2, generator=g, dtype=torch.float64) for c in centers])
    model = gmm.make_model("full", 3, 2, dtype=torch.float64)
    gmm.init.initialize(model, x, "kmeans++", torch.Generator().manual_seed(1), clamp=1e-6)
    found = sorted(model.means.tolist())
    expected = sorted(torch.stack([x[i * 50 : (i + 1) * 50].mean(0) for i in range(3)]).tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor(expected), rtol=0, atol=1e-12)
