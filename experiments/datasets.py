"""Named, stable datasets with a fixed train/validation split: a collapse benchmark per family, and controls.

    from experiments.datasets import DATASETS, load_dataset, collapse_datasets, control_datasets
    ds = load_dataset("full-point-mass")         # or load_dataset(DataSpec(...))
    ds.train, ds.val                             # (N_train, D), (N_val, D) float32
    ds.fingerprint                               # sha256 of train and validation points together
    ds.spec.cause, describe("full-point-mass")   # "point_mass", and what causes the collapse

Every dataset is `gmm.generate_data` with fixed arguments, split into training and validation points, then
(for a collapse dataset) changed by one documented cause of degenerate likelihood maxima, a component
shrinking onto a point or a line while the likelihood goes to infinity (Bishop, PRML p. 433). The causes
(`CAUSES`; a spec's `cause`):

- "control": well-posed data; the model has as many components as there are clusters.
- "overspecified": few points per cluster and many more model components than clusters, so some
  component covers fewer than D + 1 points (`model_components` > `num_components`).
- "point_mass": 30 exact copies of one point, added to the training split only (a duplicated record),
  away from the clusters; the model has one spare component, which k-means starts on the copies.
- "quantized": every coordinate rounded to a coarse grid of width 8 (a few values per axis: 3 here, 2 on one
  axis of isotropic's; the data a grid of exact point masses, like Likert-scale answers); the model has twice
  as many components as clusters. k-means puts components exactly on grid points, each an exact point
  mass: there the mean's gradient is exactly zero and the variance shrinks to the clamp, as on a duplicated
  record. Validation points are dequantized (uniform noise of the grid's width, as density models of
  discrete data do), so collapse onto grid values is not rewarded on validation.
- "subspace": the training points of one cluster (every cluster for `tied`, whose covariance is shared)
  lie on a line through its mean, parallel to an axis: the sample covariance is singular along that axis,
  so the variance there can only shrink. Validation points keep their full-rank spread. The clusters are
  well separated (radius 24), so nothing else pulls the flat cluster's mean off its exact coordinate: a
  diagonal covariance then collapses onto the line structurally. A full covariance does not, under Adam:
  its off-diagonal Cholesky entry must reach exactly 0 for the mean's gradient on the flat axis to vanish,
  and Adam's steps of about the learning rate keep it jittering around 0.
- "outliers": 3 isolated points far from every cluster and from each other, in the training split only;
  the model has 3 spare components, which k-means++ starts on them (each covers a single point).

Validation points never duplicate a training point: every added copy or outlier goes to the training split.
The split is a permutation drawn from a torch.Generator seeded with `spec.seed + 1`, the changes use
`spec.seed + 2`, so nothing depends on global random state. `experiments/fingerprints.json` holds the
fingerprint of every named dataset; `python -m experiments.datasets --check` regenerates and compares them,
`--write` rewrites the file (only after a deliberate change to the data), and `--collapse` fits every
collapse dataset and control under experiments.collapse.COLLAPSE_PROTOCOL and prints its measured clamp,
runaway and collapse rates (what a collapse is: experiments.collapse).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

import gmm
from gmm.validation import check_choice, check_float, check_int, suggest

PERTURBATIONS = ("point_mass", "quantized", "subspace", "outliers")
CAUSES = {
    "control": "well-posed: as many model components as clusters, no degenerate points",
    "overspecified": "over-specified K: few points per cluster, many more model components than clusters",
    "point_mass": "point mass: 30 exact copies of one point (training split only), one spare component",
    "quantized": "quantized features: coordinates rounded to a grid of width 8 (3 values per axis), twice the "
    "components; validation dequantized",
    "subspace": "singular cluster: training points of a cluster on a line (validation keeps full rank)",
    "outliers": "isolated outliers: 3 far single points (training split only), 3 spare components",
}
FINGERPRINTS_PATH = Path(__file__).with_name("fingerprints.json")

_POINT_MASS_COPIES = 30
_POINT_MASS_OFFSET = 3.0  # the copies sit at (3 radius, -3 radius, 0, ...): far outside the box of the means
_SUBSPACE_RADIUS = 24.0  # "subspace": well-separated clusters (radius 8 elsewhere)
_GRID_WIDTH = 8.0  # "quantized": coordinates rounded to multiples of this (data units): 3 values per axis
_NUM_OUTLIERS = 3
_OUTLIER_OFFSET = 5.0  # outliers at 5 radius from the origin, in directions 120 degrees apart


def check_generated(radius: float, perturbation: str | None, val_fraction: float) -> None:
    """The checks a DataSpec and an ExperimentConfig share: radius > 0, a known perturbation (or None) and
    val_fraction in [0, 1). Raises ValueError or TypeError naming the field."""
    check_float(radius, "radius", positive=True)
    if perturbation is not None:
        check_choice(perturbation, PERTURBATIONS, "perturbation")
    vf = check_float(val_fraction, "val_fraction", nonnegative=True)
    if vf >= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {vf}. Use e.g. 0.2 to hold out 20% of the data")


@dataclass(frozen=True)
class DataSpec:
    """Arguments of one dataset: `gmm.generate_data` inputs, a perturbation and the validation fraction.

    Attributes:
        num_samples: N, points drawn from the mixture (train + validation, before any added points).
        num_components: K, true clusters.
        num_dims: D.
        radius: means are uniform in [-radius, radius]^D.
        family: covariance family of the generating mixture (one of gmm.FAMILIES).
        seed: seed of the data; the split uses seed + 1 and the perturbation seed + 2.
        perturbation: None or one of PERTURBATIONS (see the module docstring).
        val_fraction: fraction of the drawn points held out for validation, in [0, 1).
        model_components: components of the model fitted to it (None: num_components); more than
            num_components makes an over-specified model.
    """

    num_samples: int
    num_components: int
    num_dims: int
    radius: float
    family: str
    seed: int
    perturbation: str | None = None
    val_fraction: float = 0.2
    model_components: int | None = None

    def __post_init__(self):
        check_int(self.num_samples, "num_samples", minimum=1)
        check_int(self.num_components, "num_components", minimum=1)
        check_int(self.num_dims, "num_dims", minimum=1)
        check_choice(self.family, gmm.FAMILIES, "family")
        check_int(self.seed, "seed", minimum=0)
        check_generated(self.radius, self.perturbation, self.val_fraction)
        if self.model_components is not None:
            check_int(self.model_components, "model_components", minimum=1)

    @property
    def fit_components(self) -> int:
        """Components of the model fitted to this dataset."""
        return self.model_components if self.model_components is not None else self.num_components

    @property
    def cause(self) -> str:
        """The key in CAUSES: the perturbation, "overspecified" or "control"."""
        if self.perturbation is not None:
            return self.perturbation
        return "overspecified" if self.fit_components > self.num_components else "control"

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One loaded dataset: a fixed train/validation split of `mock.data`, then the spec's perturbation.

    Attributes:
        train: (N_train, D) float32 training points (with any added copies or outliers).
        val: (N_val, D) float32 validation points (N_val = round(val_fraction * N); may be 0); dequantized
            for "quantized".
        labels_train: (N_train,) int64 true cluster of each training point (-1 for added points).
        labels_val: (N_val,) int64 true cluster of each validation point.
        mock: gmm.MockData: the drawn points before the perturbation and the generating mixture (`mock.true_model()`);
            None for a data file of your own (experiments.userdata: no truth).
        fingerprint: sha256 of the training points followed by the validation points (gmm.fingerprint).
        spec: the DataSpec it was made from.
        name: the DATASETS name, or None for an ad-hoc spec.
        train_index, val_index: rows of `mock.data` drawn into each split (before the perturbation).
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

    @cached_property
    def _true_nlls(self) -> dict[str, float]:
        if self.mock is None:
            return {}
        truth = self.mock.true_model(dtype=torch.float64)
        return {s: truth.nll(getattr(self, s).double()) for s in ("train", "val") if len(getattr(self, s))}

    def true_nll(self, split: str) -> float:
        """The NLL of the generating mixture on split "train" or "val", in float64 (nan for a data file or an
        empty split); computed once per dataset: every run of a population or study on it reads the same."""
        return self._true_nlls.get(split, math.nan)


def _named() -> dict[str, DataSpec]:
    """The benchmark: per family its collapse datasets (one cause each), then its two controls."""
    specs: dict[str, DataSpec] = {}
    for family in gmm.FAMILIES:
        kind = gmm.families.get_family(family, 2)
        shared, trainable = kind.shared, kind.trainable
        collapse: dict[str, DataSpec] = {}
        if trainable and not shared:  # a per-component covariance can shrink onto a few points
            collapse["overspecified"] = DataSpec(30, 2, 2, 8.0, family, 0, model_components=16)
            collapse["point-mass"] = DataSpec(600, 4, 2, 8.0, family, 0, "point_mass", model_components=5)
            collapse["outliers"] = DataSpec(600, 4, 2, 8.0, family, 0, "outliers", model_components=7)
        if trainable:
            collapse["quantized"] = DataSpec(600, 4, 2, 8.0, family, 0, "quantized", model_components=8)
        if trainable and kind.scaling == "axis":  # a line is degenerate only where axes have their own variance
            # clusters 3x farther apart than elsewhere: nothing else pulls on the flat cluster's mean, which then
            # keeps its exact coordinate on the flat axis (see CAUSES["subspace"])
            collapse["subspace"] = DataSpec(600, 4, 2, _SUBSPACE_RADIUS, family, 0, "subspace")
        for cause, spec in collapse.items():
            specs[f"{family}-{cause}"] = spec
        specs[f"{family}-separated"] = DataSpec(600, 4, 2, 8.0, family, 0)
        specs[f"{family}-overlapping"] = DataSpec(600, 4, 2, 3.0, family, 0)
    return specs


DATASETS: dict[str, DataSpec] = _named()


def datasets_for_family(family: str) -> list[str]:
    """Names of the named datasets generated by `family`: its collapse datasets, then its controls."""
    check_choice(family, gmm.FAMILIES, "family")
    return [name for name, spec in DATASETS.items() if spec.family == family]


def collapse_datasets(family: str) -> list[str]:
    """Names of `family`'s collapse datasets (each with one cause, `DATASETS[name].cause`)."""
    return [name for name in datasets_for_family(family) if DATASETS[name].cause != "control"]


def control_datasets(family: str) -> list[str]:
    """Names of `family`'s well-posed controls."""
    return [name for name in datasets_for_family(family) if DATASETS[name].cause == "control"]


def describe(name: str) -> str:
    """One line on what the named dataset is and what makes it collapse."""
    spec = get_spec(name)
    return f"{CAUSES[spec.cause]} (K={spec.num_components} clusters, {spec.fit_components} model components)"


def get_spec(name: str) -> DataSpec:
    """The DataSpec of a named dataset; an unknown name raises ValueError with the closest names."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string; got {type(name).__name__}")
    if name not in DATASETS:
        hint = suggest(name, DATASETS, n=3)
        raise ValueError(
            f"unknown dataset {name!r}; `python -m experiments.datasets` lists the names "
            f"(<family>-<cause> or <family>-separated / -overlapping){hint}"
        )
    return DATASETS[name]


# -- perturbations: (train, labels_train, val) -> the same, changed -----------------------------------------
def _point_mass(train, labels, val, spec: DataSpec, mock: gmm.MockData, g: torch.Generator):
    where = torch.zeros(spec.num_dims, dtype=train.dtype)
    where[0], where[min(1, spec.num_dims - 1)] = _POINT_MASS_OFFSET * spec.radius, -_POINT_MASS_OFFSET * spec.radius
    copies = where.expand(_POINT_MASS_COPIES, -1)
    return torch.cat([train, copies]), torch.cat([labels, labels.new_full((_POINT_MASS_COPIES,), -1)]), val


def _outliers(train, labels, val, spec: DataSpec, mock: gmm.MockData, g: torch.Generator):
    angles = torch.arange(_NUM_OUTLIERS, dtype=torch.float64) * (2 * math.pi / _NUM_OUTLIERS) + 0.25
    points = torch.zeros(_NUM_OUTLIERS, spec.num_dims, dtype=torch.float64)
    points[:, 0] = angles.cos()
    points[:, min(1, spec.num_dims - 1)] += angles.sin()
    points = points * (_OUTLIER_OFFSET * spec.radius)
    return torch.cat([train, points.to(train.dtype)]), torch.cat([labels, labels.new_full((_NUM_OUTLIERS,), -1)]), val


def _quantized(train, labels, val, spec: DataSpec, mock: gmm.MockData, g: torch.Generator):
    grid = _GRID_WIDTH
    noise = (torch.rand(val.shape, generator=g, dtype=torch.float64) - 0.5) * grid
    dequantized = (torch.round(val.double() / grid) * grid + noise).to(val.dtype)
    return torch.round(train / grid) * grid, labels, dequantized


def _subspace(train, labels, val, spec: DataSpec, mock: gmm.MockData, g: torch.Generator):
    """Training points of cluster 0 (every cluster for a shared covariance) projected onto the line through
    the cluster's mean along the major axis of its covariance: axis-aligned for diagonal covariances."""
    shared = gmm.families.get_family(spec.family, spec.num_dims).shared
    out = train.double().clone()
    for k in range(spec.num_components if shared else 1):
        rows = labels == k
        axis = int(mock.covariances[k].diagonal().argmin())
        out[rows, axis] = mock.means[k, axis]
    return out.to(train.dtype), labels, val


_PERTURB = {"point_mass": _point_mass, "outliers": _outliers, "quantized": _quantized, "subspace": _subspace}


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

    if spec.num_samples < spec.num_components:
        raise ValueError(
            f"num_samples={spec.num_samples} is too small for {spec.num_components} components; use more samples"
        )
    mock = gmm.generate_data(spec.num_samples, spec.num_components, spec.num_dims, spec.radius, spec.family, seed=spec.seed)
    n = mock.data.shape[0]
    num_val = round(spec.val_fraction * n)
    if n - num_val < spec.fit_components:
        raise ValueError(
            f"val_fraction={spec.val_fraction} leaves {n - num_val} training points for "
            f"{spec.fit_components} components; lower val_fraction or use more samples"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed + 1))
    val_index, train_index = order[:num_val].sort().values, order[num_val:].sort().values
    train, labels_train, val = mock.data[train_index], mock.labels[train_index], mock.data[val_index]
    if spec.perturbation is not None:
        g = torch.Generator().manual_seed(spec.seed + 2)
        train, labels_train, val = _PERTURB[spec.perturbation](train, labels_train, val, spec, mock, g)
    return Dataset(
        train=train,
        val=val,
        labels_train=labels_train,
        labels_val=mock.labels[val_index],
        mock=mock,
        fingerprint=gmm.fingerprint(torch.cat([train, val])),
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
        description="List the named datasets (cause, sizes, fingerprint), check their fingerprints, or measure "
        "how often each one collapses.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="regenerate and compare with fingerprints.json")
    group.add_argument("--write", action="store_true", help="rewrite fingerprints.json (deliberate data changes only)")
    group.add_argument(
        "--collapse",
        action="store_true",
        help="fit each dataset under COLLAPSE_PROTOCOL (resets off, clamp 1e-8, component_lr 0.1, 1000 steps, "
        "10 seeds) and print its measured clamp, runaway and collapse rates",
    )
    parser.add_argument("--family", default=None, help="only this family's datasets")
    args = parser.parse_args(argv)
    names = list(DATASETS) if args.family is None else _family_names(parser, args.family)
    if args.collapse:
        from .collapse import print_collapse  # imported here: experiments.collapse builds on this module

        return print_collapse(names)
    current = {name: load_dataset(name).fingerprint for name in names}
    if args.write:
        stored = stored_fingerprints() if FINGERPRINTS_PATH.exists() and args.family else {}
        stored = {k: v for k, v in stored.items() if k in DATASETS}
        FINGERPRINTS_PATH.write_text(json.dumps({**stored, **current}, indent=2, sort_keys=True) + "\n")
        print(f"wrote {len(current)} fingerprints to {FINGERPRINTS_PATH}")
        return 0
    stored = stored_fingerprints() if FINGERPRINTS_PATH.exists() else {}
    bad = 0
    for name in names:
        spec = DATASETS[name]
        ok = stored.get(name) == current[name]
        bad += not ok
        if not args.check or not ok:
            status = "ok" if ok else "CHANGED" if name in stored else "missing"
            print(
                f"{name:30s} {spec.num_samples:4d} x {spec.num_dims}  K={spec.num_components} "
                f"model K={spec.fit_components:<3d} {spec.cause:13s} {current[name][:12]}  {status}"
            )
    if args.check:
        print(f"{len(names) - bad}/{len(names)} fingerprints match {FINGERPRINTS_PATH.name}")
    return 1 if (args.check and bad) else 0


def _family_names(parser, family: str) -> list[str]:
    try:
        return datasets_for_family(family)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
