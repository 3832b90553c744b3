"""Named, stable datasets with a fixed train/validation split, so runs and studies compare like with like.

    from experiments.datasets import DATASETS, load_dataset
    ds = load_dataset("full-separated")          # or load_dataset(DataSpec(...))
    ds.train, ds.val                             # (N_train, D), (N_val, D) float32
    ds.fingerprint                               # sha256 of the full data (after any perturbation)

Every dataset is `gmm.generate_data` with fixed arguments, optionally perturbed to provoke a collapse:

- "duplicates": ~5% of all points, taken from cluster 0, are replaced by copies of one point of that
  cluster. A component sitting on the copies can shrink its variance towards 0 (an unbounded likelihood).
- "tiny_cluster": one extra cluster of 3 points, far outside the box of the other means (every coordinate
  at 2.5 * radius). Its points are drawn with the shared covariance for shared families and with 1e-4 times
  the covariance of component 0 otherwise; the truth (`mock`) gets it as an extra component.

The split is a permutation drawn from a torch.Generator seeded with `spec.seed + 1` (the perturbation uses
`spec.seed + 2`), so it never depends on global random state. `experiments/fingerprints.json` holds the
fingerprint of every named dataset; `python -m experiments.datasets --check` regenerates and compares them,
`--write` rewrites the file (only after a deliberate change to the data).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

import gmm
from gmm._validation import check_choice, check_float, check_int

PERTURBATIONS = ("duplicates", "tiny_cluster")
FINGERPRINTS_PATH = Path(__file__).with_name("fingerprints.json")

_DUPLICATE_FRACTION = 0.05  # of all points, replaced by copies of one point of cluster 0
_TINY_CLUSTER_SIZE = 3
_TINY_CLUSTER_OFFSET = 2.5  # the tiny cluster's center, in units of radius, on every axis
_TINY_CLUSTER_SCALE = 1e-4  # its covariance relative to component 0's (non-shared families)


@dataclass(frozen=True)
class DataSpec:
    """Arguments of one dataset: `gmm.generate_data` inputs, a perturbation and the validation fraction.

    Attributes:
        num_samples: N, points in the whole dataset (train + validation).
        num_components: K, true clusters (a "tiny_cluster" perturbation adds one more).
        num_dims: D.
        radius: means are uniform in [-radius, radius]^D.
        family: covariance family of the generating mixture (one of gmm.FAMILIES).
        seed: seed of the data; the split uses seed + 1 and the perturbation seed + 2.
        perturbation: None, "duplicates" or "tiny_cluster" (see the module docstring).
        val_fraction: fraction of the points held out for validation, in [0, 1).
    """

    num_samples: int
    num_components: int
    num_dims: int
    radius: float
    family: str
    seed: int
    perturbation: str | None = None
    val_fraction: float = 0.2

    def __post_init__(self):
        check_int(self.num_samples, "num_samples", minimum=1)
        check_int(self.num_components, "num_components", minimum=1)
        check_int(self.num_dims, "num_dims", minimum=1)
        check_float(self.radius, "radius", positive=True)
        check_choice(self.family, gmm.FAMILIES, "family")
        check_int(self.seed, "seed", minimum=0)
        if self.perturbation is not None:
            check_choice(self.perturbation, PERTURBATIONS, "perturbation")
        vf = check_float(self.val_fraction, "val_fraction", nonnegative=True)
        if vf >= 1.0:
            raise ValueError(
                f"val_fraction must be in [0, 1); got {vf}. Use e.g. 0.2 to hold out 20% of the data"
            )

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One loaded dataset: a fixed train/validation split of `mock.data`.

    Attributes:
        train: (N_train, D) float32 training points.
        val: (N_val, D) float32 validation points (N_val = round(val_fraction * N); may be 0).
        labels_train: (N_train,) int64 true cluster of each training point.
        labels_val: (N_val,) int64 true cluster of each validation point.
        mock: gmm.MockData of the full (perturbed) data and the generating mixture (`mock.true_model()`);
            None for a data file of your own (experiments.userdata: no truth).
        fingerprint: sha256 of the full data after perturbation (gmm.fingerprint).
        spec: the DataSpec it was made from.
        name: the DATASETS name, or None for an ad-hoc spec.
        train_index, val_index: rows of `mock.data` in each split.
    """

    train: Tensor
    val: Tensor
    labels_train: Tensor
    labels_val: Tensor
    mock: gmm.MockData | None
    fingerprint: str
    spec: DataSpec
    name: str | None = None
    train_index: Tensor = field(default=None, repr=False)
    val_index: Tensor = field(default=None, repr=False)

    @property
    def num_dims(self) -> int:
        return int(self.train.shape[1])


def _named() -> dict[str, DataSpec]:
    specs: dict[str, DataSpec] = {}
    for family in gmm.FAMILIES:
        specs[f"{family}-separated"] = DataSpec(600, 4, 2, 8.0, family, 0)
        specs[f"{family}-overlapping"] = DataSpec(600, 4, 2, 3.0, family, 0)
        # a per-component covariance can collapse onto duplicated points; a shared one cannot, so the
        # shared families get a far tiny cluster that has to steal a component instead
        shared = gmm.families.get_family(family, 2).shared
        specs[f"{family}-collapse"] = DataSpec(
            600, 4, 2, 8.0, family, 0, "tiny_cluster" if shared else "duplicates"
        )
    return specs


DATASETS: dict[str, DataSpec] = _named()


def datasets_for_family(family: str) -> list[str]:
    """Names of the named datasets generated by `family` (separated, overlapping, collapse)."""
    check_choice(family, gmm.FAMILIES, "family")
    return [name for name, spec in DATASETS.items() if spec.family == family]


def get_spec(name: str) -> DataSpec:
    """The DataSpec of a named dataset; an unknown name raises ValueError with the closest names."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string; got {type(name).__name__}")
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown dataset {name!r}; names are <family>-separated, <family>-overlapping and "
            f"<family>-collapse for family in {', '.join(gmm.FAMILIES)}.{hint}"
        )
    return DATASETS[name]


def _duplicates(mock: gmm.MockData, g: torch.Generator) -> gmm.MockData:
    members = (mock.labels == 0).nonzero()[:, 0]
    count = min(max(2, round(_DUPLICATE_FRACTION * mock.data.shape[0])), members.numel() - 1)
    if count < 1:
        return mock
    chosen = members[torch.randperm(members.numel(), generator=g)[: count + 1]]
    data = mock.data.clone()
    data[chosen[1:]] = data[chosen[0]].clone()  # `count` copies of one point of cluster 0
    return replace(mock, data=data)


def _tiny_cluster(mock: gmm.MockData, radius: float, g: torch.Generator) -> gmm.MockData:
    k, d = mock.means.shape
    center = torch.full((1, d), _TINY_CLUSTER_OFFSET * radius, dtype=torch.float64)
    shared = gmm.families.get_family(mock.family, d).shared
    cov = mock.covariances[:1] if shared else mock.covariances[:1] * _TINY_CLUSTER_SCALE  # (1, D, D)
    noise = torch.randn(_TINY_CLUSTER_SIZE, d, generator=g, dtype=torch.float64)
    points = center + noise @ torch.linalg.cholesky(cov[0]).T
    data = torch.cat([mock.data, points.to(mock.data.dtype)])
    labels = torch.cat([mock.labels, torch.full((_TINY_CLUSTER_SIZE,), k, dtype=mock.labels.dtype)])
    counts = torch.bincount(labels, minlength=k + 1).double()
    return gmm.MockData(
        data=data,
        labels=labels,
        means=torch.cat([mock.means, center]),
        covariances=torch.cat([mock.covariances, cov]),
        weights=counts / counts.sum(),
        family=mock.family,
    )


def load_dataset(spec_or_name: DataSpec | str) -> Dataset:
    """Generate a dataset and split it; the same spec always gives the same tensors and fingerprint.

    Args:
        spec_or_name: a DataSpec, the name of one in DATASETS, or an experiments.userdata.FileSpec.

    Returns:
        A Dataset (see its docstring).

    Raises:
        ValueError: unknown name, or a spec whose training split would hold fewer points than components.
        TypeError: a spec_or_name of another type.
    """
    name = None
    from .userdata import FileSpec, load_file  # imported here: userdata builds on this module

    if isinstance(spec_or_name, FileSpec):  # a file of your own
        return load_file(spec_or_name)
    if isinstance(spec_or_name, str):
        name, spec = spec_or_name, get_spec(spec_or_name)
    elif isinstance(spec_or_name, DataSpec):
        spec = spec_or_name
    else:
        raise TypeError(f"load_dataset takes a DataSpec or a dataset name; got {type(spec_or_name).__name__}")

    size = spec.num_samples - (_TINY_CLUSTER_SIZE if spec.perturbation == "tiny_cluster" else 0)
    if size < spec.num_components:
        raise ValueError(
            f"num_samples={spec.num_samples} is too small for {spec.num_components} components"
            f"{' plus a tiny cluster' if spec.perturbation == 'tiny_cluster' else ''}; use more samples"
        )
    mock = gmm.generate_data(
        size, spec.num_components, spec.num_dims, spec.radius, spec.family, seed=spec.seed
    )
    g = torch.Generator().manual_seed(spec.seed + 2)
    if spec.perturbation == "duplicates":
        mock = _duplicates(mock, g)
    elif spec.perturbation == "tiny_cluster":
        mock = _tiny_cluster(mock, spec.radius, g)

    n = mock.data.shape[0]
    num_val = round(spec.val_fraction * n)
    if n - num_val < spec.num_components:
        raise ValueError(
            f"val_fraction={spec.val_fraction} leaves {n - num_val} training points for "
            f"{spec.num_components} components; lower val_fraction or use more samples"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed + 1))
    val_index, train_index = order[:num_val].sort().values, order[num_val:].sort().values
    return Dataset(
        train=mock.data[train_index],
        val=mock.data[val_index],
        labels_train=mock.labels[train_index],
        labels_val=mock.labels[val_index],
        mock=mock,
        fingerprint=gmm.fingerprint(mock.data),
        spec=spec,
        name=name,
        train_index=train_index,
        val_index=val_index,
    )


def compute_fingerprints() -> dict[str, str]:
    """{name: fingerprint} for every named dataset, regenerated now."""
    return {name: load_dataset(name).fingerprint for name in DATASETS}


def stored_fingerprints() -> dict[str, str]:
    """The checked-in {name: fingerprint} of experiments/fingerprints.json."""
    return json.loads(FINGERPRINTS_PATH.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.datasets",
        description="List the named datasets and check their fingerprints.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="regenerate and compare with fingerprints.json")
    group.add_argument(
        "--write", action="store_true", help="rewrite fingerprints.json (deliberate data changes only)"
    )
    args = parser.parse_args(argv)
    current = compute_fingerprints()
    if args.write:
        FINGERPRINTS_PATH.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        print(f"wrote {len(current)} fingerprints to {FINGERPRINTS_PATH}")
        return 0
    stored = stored_fingerprints() if FINGERPRINTS_PATH.exists() else {}
    bad = 0
    for name, spec in DATASETS.items():
        ok = stored.get(name) == current[name]
        bad += not ok
        if not args.check or not ok:
            status = "ok" if ok else "CHANGED" if name in stored else "missing"
            print(
                f"{name:28s} {spec.num_samples:5d} x {spec.num_dims}  K={spec.num_components}  "
                f"radius={spec.radius:g}  {spec.perturbation or '-':12s}  {current[name][:12]}  {status}"
            )
    if args.check:
        print(f"{len(DATASETS) - bad}/{len(DATASETS)} fingerprints match {FINGERPRINTS_PATH.name}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
