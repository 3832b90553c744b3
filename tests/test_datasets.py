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
def test_every_family_has_three_named_datasets(family):
    names = datasets_for_family(family)
    assert names == [f"{family}-separated", f"{family}-overlapping", f"{family}-collapse"]
    assert DATASETS[f"{family}-collapse"].perturbation in datasets.PERTURBATIONS
    assert DATASETS[f"{family}-separated"].radius > DATASETS[f"{family}-overlapping"].radius


def test_split_is_fixed_disjoint_and_complete():
    a, b = load_dataset("full-separated"), load_dataset("full-separated")
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.fingerprint == b.fingerprint
    n = a.mock.data.shape[0]
    assert a.val.shape == (round(0.2 * n), 2) and a.train.shape == (n - a.val.shape[0], 2)
    rows = torch.cat([a.train_index, a.val_index]).sort().values
    assert torch.equal(rows, torch.arange(n))
    assert torch.equal(a.train, a.mock.data[a.train_index]) and torch.equal(
        a.labels_val, a.mock.labels[a.val_index]
    )
    assert a.fingerprint == gmm.fingerprint(a.mock.data) and a.name == "full-separated"


def test_val_fraction_changes_the_split_not_the_data():
    spec = DATASETS["diagonal-overlapping"]
    a = load_dataset(spec)
    b = load_dataset(DataSpec(**{**spec.as_dict(), "val_fraction": 0.5}))
    assert a.fingerprint == b.fingerprint and b.val.shape[0] == 300
    none = load_dataset(DataSpec(**{**spec.as_dict(), "val_fraction": 0.0}))
    assert none.val.shape == (0, 2) and none.train.shape == (600, 2)


def test_duplicates_perturbation_copies_one_point_of_cluster_zero():
    ds = load_dataset("full-collapse")
    x, labels = ds.mock.data, ds.mock.labels
    values, counts = torch.unique(x, dim=0, return_counts=True)
    assert counts.max() == round(0.05 * 600) + 1  # the point itself and its copies
    copied = (x == values[counts.argmax()]).all(1)
    assert bool((labels[copied] == 0).all())
    clean = gmm.generate_data(600, 4, 2, 8.0, "full", seed=0)
    assert int((x != clean.data).any(1).sum()) == round(0.05 * 600)  # nothing else moved


@pytest.mark.parametrize("family", ["tied", "full"])
def test_tiny_cluster_adds_a_far_component_to_the_truth(family):
    spec = DataSpec(600, 4, 2, 8.0, family, 3, perturbation="tiny_cluster")
    ds = load_dataset(spec)
    assert ds.mock.data.shape == (600, 2) and ds.mock.means.shape == (5, 2)
    tiny = ds.mock.labels == 4
    assert int(tiny.sum()) == 3
    assert float(ds.mock.data[tiny].min()) > 8.0 + 2.0  # outside the box of the other means
    assert torch.isclose(ds.mock.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    truth = ds.mock.true_model()
    assert truth.num_components == 5 and torch.isfinite(truth.log_prob(ds.mock.data.double())).all()


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="full-separated"):
        load_dataset("full-seperated")
    with pytest.raises(TypeError, match="DataSpec or a dataset name"):
        load_dataset(3)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"perturbation": "duplicate"}, ValueError, "duplicates"),
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
