"""generate_data: seeded, every sample kept, full-rank covariances of the requested family at any D."""

from __future__ import annotations

import pytest
import torch

import gmm


def test_same_seed_same_data_and_fingerprint():
    a = gmm.generate_data(101, 4, 3, 5.0, "full", seed=7)
    b = gmm.generate_data(101, 4, 3, 5.0, "full", seed=7)
    c = gmm.generate_data(101, 4, 3, 5.0, "full", seed=8)
    assert torch.equal(a.data, b.data) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    g = torch.Generator().manual_seed(7)
    assert torch.equal(gmm.generate_data(101, 4, 3, 5.0, "full", seed=None, generator=g).data, a.data)


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    gmm.generate_data(50, 2, 2, seed=1)
    assert torch.equal(torch.rand(3), before)


def test_keeps_every_sample_and_labels():
    mock = gmm.generate_data(1003, 5, 2, 8.0, "full", seed=0)
    assert mock.data.shape == (1003, 2) and mock.data.dtype == torch.float32
    counts = torch.bincount(mock.labels, minlength=5)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1
    torch.testing.assert_close(mock.weights, counts.double() / 1003)


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_full_rank_covariances_of_the_family_beyond_ten_dims(family):
    mock = gmm.generate_data(400, 3, 16, 8.0, family, seed=2)
    cov = mock.covariances
    assert torch.linalg.matrix_rank(cov).min() == 16
    off = ~torch.eye(16, dtype=torch.bool)
    if family in ("diagonal", "isotropic", "shared_isotropic", "constant"):
        assert cov[:, off].abs().max() == 0
    if family in ("tied", "shared_isotropic", "constant"):
        assert torch.equal(cov[0], cov[1])
    if family in ("isotropic", "shared_isotropic", "constant"):
        diag = cov.diagonal(dim1=-2, dim2=-1)
        assert torch.equal(diag, diag[:, :1].expand_as(diag))


def test_samples_follow_the_truth():
    mock = gmm.generate_data(6000, 2, 2, 8.0, "full", seed=3)
    for k in range(2):
        pts = mock.data[mock.labels == k].double()
        torch.testing.assert_close(pts.mean(0), mock.means[k], atol=0.12, rtol=0)
        torch.testing.assert_close(torch.cov(pts.T), mock.covariances[k], atol=0.2, rtol=0.1)


@pytest.mark.parametrize(
    "args, match",
    [
        ((3, 5, 2), "num_samples=3 is less than num_components=5"),
        ((10, 2, 2, -1.0), "radius must be > 0"),
        ((10, 2, 2, 1.0, "fulll"), "did you mean 'full'"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        gmm.generate_data(*args)
