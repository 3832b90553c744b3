"""Named datasets: stable fingerprints, a fixed split, the perturbations and the input checks."""

from __future__ import annotations

import pytest
import torch

import gmm
from experiments import datasets
from experiments.datasets import DATASETS, DataSpec, datasets_for_family, load_dataset


def test_fingerprints_match_the_checked_in_file():
    # regenerating every named dataset gives the bytes recorded in experiments/fingerprints.json
    assert datasets.compute_fingerprints() == datasets.stored_fingerprints()


@pytest.mark.parametrize("family", gmm.FAMILIES)
def test_every_family_has_controls_and_documented_collapse_datasets(family):
    names = datasets_for_family(family)
    assert names == datasets.collapse_datasets(family) + datasets.control_datasets(family)
    assert datasets.control_datasets(family) == [f"{family}-separated", f"{family}-overlapping"]
    for name in datasets.collapse_datasets(family):
        spec = DATASETS[name]
        assert spec.cause in datasets.CAUSES and spec.cause != "control"
        assert name == f"{family}-{spec.cause.replace('_', '-')}"
        assert datasets.CAUSES[spec.cause] in datasets.describe(name)
    assert DATASETS[f"{family}-separated"].radius > DATASETS[f"{family}-overlapping"].radius
    if family != "constant":  # every trainable family has something to collapse
        assert datasets.collapse_datasets(family)


@pytest.mark.parametrize("name", list(DATASETS))
def test_validation_never_holds_a_training_point(name):
    ds = load_dataset(name)
    if ds.val.shape[0]:
        same = (ds.val[:, None, :] == ds.train[None, :, :]).all(-1)  # (N_val, N_train)
        assert not bool(same.any())


def test_split_is_fixed_disjoint_and_complete():
    a, b = load_dataset("full-separated"), load_dataset("full-separated")
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.fingerprint == b.fingerprint
    n = a.mock.data.shape[0]
    assert a.val.shape == (round(0.2 * n), 2) and a.train.shape == (n - a.val.shape[0], 2)
    rows = torch.cat([a.train_index, a.val_index]).sort().values
    assert torch.equal(rows, torch.arange(n))
    assert torch.equal(a.train, a.mock.data[a.train_index]) and torch.equal(a.labels_val, a.mock.labels[a.val_index])
    assert a.fingerprint == gmm.fingerprint(torch.cat([a.train, a.val])) and a.name == "full-separated"


def test_val_fraction_changes_the_split_not_the_drawn_points():
    spec = DATASETS["diagonal-overlapping"]
    a = load_dataset(spec)
    b = load_dataset(DataSpec(**{**spec.as_dict(), "val_fraction": 0.5}))
    assert torch.equal(a.mock.data, b.mock.data) and b.val.shape[0] == 300
    assert a.fingerprint != b.fingerprint  # the fingerprint covers the split
    none = load_dataset(DataSpec(**{**spec.as_dict(), "val_fraction": 0.0}))
    assert none.val.shape == (0, 2) and none.train.shape == (600, 2)


def test_point_mass_and_outliers_are_added_to_the_training_split_only():
    clean = load_dataset("full-separated")
    for name, added in (("full-point-mass", 30), ("full-outliers", 3)):
        ds = load_dataset(name)
        assert torch.equal(ds.val, clean.val) and torch.equal(ds.train[:-added], clean.train)
        assert bool((ds.labels_train[-added:] == -1).all())
        extra = ds.train[-added:]
        # far from every drawn point: at least 2 radius beyond the box of the means
        assert float(torch.cdist(extra, ds.mock.data).min()) > 2 * ds.spec.radius
    copies = load_dataset("full-point-mass").train[-30:]
    assert bool((copies == copies[0]).all())


def test_quantized_training_points_lie_on_the_grid_and_validation_points_are_dequantized():
    ds = load_dataset("diagonal-quantized")
    width = datasets._GRID_WIDTH
    assert torch.equal(ds.train, torch.round(ds.train / width) * width)
    assert all(len(torch.unique(ds.train[:, j])) <= 4 for j in range(2))  # a few values per axis
    offsets = (ds.val - torch.round(ds.mock.data[ds.val_index] / width) * width) / width
    assert float(offsets.abs().max()) <= 0.5 and float(offsets.abs().min()) > 0
    assert 0.2 < float(offsets.abs().mean()) < 0.3  # uniform on [-width/2, width/2]: mean |u| = width / 4


@pytest.mark.parametrize(("name", "clusters"), [("diagonal-subspace", [0]), ("tied-subspace", [0, 1, 2, 3])])
def test_subspace_clusters_are_flat_along_one_axis_in_training_only(name, clusters):
    ds = load_dataset(name)
    for k in clusters:
        axis = int(ds.mock.covariances[k].diagonal().argmin())
        train = ds.train[ds.labels_train == k, axis]
        assert bool((train == train[0]).all()) and float(train[0]) == pytest.approx(float(ds.mock.means[k, axis]))
        assert float(ds.val[ds.labels_val == k, axis].std()) > 0.1


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="full-separated"):
        load_dataset("full-seperated")
    with pytest.raises(TypeError, match="DataSpec or a dataset name"):
        load_dataset(3)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"perturbation": "point-mass"}, ValueError, "point_mass"),
        ({"family": "ful"}, ValueError, "full"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"radius": -1.0}, ValueError, "radius"),
    ],
)
def test_bad_specs_are_rejected(change, error, match):
    base = DATASETS["full-separated"].as_dict()
    with pytest.raises(error, match=match):
        DataSpec(**{**base, **change})


def test_a_split_too_small_for_the_components_is_rejected():
    with pytest.raises(ValueError, match="training points"):
        load_dataset(DataSpec(10, 4, 2, 8.0, "full", 0, val_fraction=0.8))


def test_cli_check_passes():
    assert datasets.main(["--check"]) == 0
