"""What a clamp sweep fits, and one cell of it: datasets, the clamp grid, the cells and their fits (no MLflow).

A sweep fits, per family, every cell of

    dataset (named datasets of experiments.datasets: by default the family's collapse datasets that
             collapse within a sweep's budget and a control, `sweep_datasets`)
    x clamp (`clamp_grid`: a log grid over the search space's clamp range, plus NO_CLAMP)
    x batch (full batch, or mini-batches of `SweepSettings.batch_size` rows)
    x reset (on, off)

and, inside a cell, every fit seed. `run_cell` fits one cell's seeds and returns one row per fit
(`ROW_COLUMNS`); it draws nothing without an explicit seed, so a cell gives the same rows in any process.
`run_group` fits the full-batch cells of one family, dataset and reset setting (every clamp x seed) as one
population (gmm.population: one batched Adam step for all of them; the same fits up to rounding).

Definitions (per fit; see gmm.fitting's module docstring for the clamp, reset and "recovered" events):
- clamps, resets: the numbers of clamp and reset events.
- collapsed (0/1): at the end of the fit (the parameters `fit` keeps, the best iterate) a component is
  degenerate, i.e. its smallest variance (L_kk^2 for
  Cholesky families) is on the floor (<= gmm.recovery.RECOVERY_FLOOR_FACTOR x clamp) or below DEGENERATE_RATIO x
  the training data's smallest per-axis variance (a collapse the floor did not stop, as without a clamp),
  or the train NLL ran away (non-finite: the fit stopped with NonFiniteNLLError).
- recovered: NaN when the fit never clamped; else 1 when the component of the first clamp event got a
  "recovered" event (it left the floor and the NLL came back within gmm.recovery.RECOVERY_MARGIN of its level
  before that clamp; a reset can do both at the clamp's own step), 0 otherwise. recovery_steps: the steps
  between the two events (0: at the clamp's step, through its reset; NaN if not recovered).
- train_nll, val_nll: final mean NLL on the training and validation splits (NaN after a non-finite fit).

"No clamp": `clamp` must be > 0, so NO_CLAMP is the smallest positive normal float32
(torch.finfo(torch.float32).tiny = 1.18e-38), the lowest floor a float32 variance can hold: the clamp then
only catches a variance that would otherwise underflow to 0 (Cholesky families floor L_kk at its square
root, 1.1e-19). Families with nothing to clamp (`constant`) have no clamp grid and are not swept.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gmm
from gmm.recovery import RECOVERY_FLOOR_FACTOR

from .collapse import COLLAPSE_PROTOCOL
from .config import read_mapping_file
from .datasets import (
    Dataset,
    collapse_datasets,
    control_datasets,
    datasets_for_family,
    describe,
    get_spec,
    load_dataset,
)
from .metrics import Metric

NO_CLAMP = float(torch.finfo(torch.float32).tiny)  # "no clamp": the smallest positive normal float32
DEGENERATE_RATIO = 1e-4  # collapsed: a variance below this x the data's smallest per-axis variance (std: 1%)
SPACE_FILE = Path(__file__).resolve().parent.parent / "studies" / "space.yaml"  # the studies' search space
# causes whose datasets collapse under Adam within a sweep (a spare component k-means starts exactly on a far
# point: a zero mean gradient, see tests/test_benchmark.py; since v4 the coarse quantized grids do too, but they
# are not in the sweep's default selection); subspace and over-specified data do
# not reach low floors (README, collapse benchmark)
STRUCTURAL_CAUSES = ("point_mass", "outliers")
KEY_COLUMNS = ("family", "dataset", "clamp", "seed", "batch", "reset")


@dataclass(frozen=True)
class SweepData:
    """One dataset of a family's sweep: a named dataset of experiments.datasets, its role ("collapse" or
    "control"), what makes it collapse (`describe`) and the components of the model fitted to it."""

    name: str
    role: str
    cause: str
    components: int

    @classmethod
    def named(cls, name: str) -> SweepData:
        spec = get_spec(name)
        role = "control" if spec.cause == "control" else "collapse"
        return cls(name, role, describe(name), spec.fit_components)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train (N, D), validation) float32: the registry's split, perturbation included."""
        ds = _load(self.name)
        return ds.train, ds.val

    def fingerprint(self) -> str:
        return _load(self.name).fingerprint

    @property
    def spec(self):
        return get_spec(self.name)


def sweep_datasets(family: str) -> list[SweepData]:
    """The datasets a sweep of `family` fits by default: its collapse datasets whose cause collapses under
    Adam within a sweep's budget (STRUCTURAL_CAUSES; every collapse dataset of a family that has none), then
    its control `<family>-separated`. `--datasets` may name any other dataset of the family
    (`experiments.datasets.datasets_for_family`)."""
    collapse = collapse_datasets(family)
    structural = [n for n in collapse if get_spec(n).cause in STRUCTURAL_CAUSES] or collapse
    return [SweepData.named(n) for n in [*structural, *control_datasets(family)[:1]]]


def select_datasets(families: list[str], names: list[str] | None) -> dict[str, list[SweepData]]:
    """{family: its sweep_datasets, or those of its datasets named}; a name no swept family has raises
    ValueError listing the names there are."""
    if not names:
        return {family: sweep_datasets(family) for family in families}
    available = {family: datasets_for_family(family) for family in families}
    known = [n for data in available.values() for n in data]
    unknown = [n for n in names if n not in known]
    if unknown:
        choices = ", ".join(known)
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)} for {', '.join(families)}; choose from {choices}")
    return {family: [SweepData.named(n) for n in data if n in names] for family, data in available.items()}


def clamp_range(family: str, space_file: str | Path | None = None) -> tuple[float, float] | None:
    """(low, high) of `clamp` in the search space file (studies/space.yaml: its default section, then the
    family's), or None when the family searches no clamp."""
    space = read_mapping_file(space_file or SPACE_FILE, "search space file", "hold a mapping of sections")
    entry = {**(space.get("default") or {}), **(space.get(family) or {})}.get("clamp")
    if entry is None:
        return None
    if not isinstance(entry, dict) or "low" not in entry or "high" not in entry:
        raise ValueError(f"clamp in {space_file or SPACE_FILE} must be {{low: A, high: B}} for a sweep; got {entry!r}")
    low, high = float(entry["low"]), float(entry["high"])
    if not 0 < low < high:
        raise ValueError(f"clamp range must satisfy 0 < low < high; got low={low}, high={high}")
    return low, high


def clamp_grid(family: str, num_clamps: int = 10, space_file: str | Path | None = None) -> list[float]:
    """NO_CLAMP, then `num_clamps` values evenly spaced in log between the search space's low and high
    (both included, rounded to 3 significant digits); [] for a family without a clamp range."""
    bounds = clamp_range(family, space_file)
    if bounds is None:
        return []
    if num_clamps < 2:
        raise ValueError(f"num_clamps must be at least 2 (the range's ends); got {num_clamps}")
    grid = np.logspace(math.log10(bounds[0]), math.log10(bounds[1]), num_clamps)
    return [NO_CLAMP, *(float(f"{c:.3g}") for c in grid)]


@dataclass(frozen=True)
class SweepSettings:
    """The fit options every cell shares (recorded in the manifest).

    The learning rates of the collapse benchmark's protocol (experiments.collapse.COLLAPSE_PROTOCOL):
    component_lr 0.1 rather than the runner's 1e-2, at which a log variance moves by at most ~0.01 per Adam
    step, too slow to reach the floor in a few hundred steps. 300 steps (the protocol has 1000): the
    structural collapse datasets of `full` reach the lowest clamp (1e-8) by step ~110, those of diagonal and
    isotropic reach clamps from ~1e-6 up (a log variance falls by 0.1 a step, a log L_kk by 0.1, i.e. the
    variance twice as fast).
    """

    iterations: int = 300
    component_lr: float = COLLAPSE_PROTOCOL.component_lr
    mixture_lr: float = COLLAPSE_PROTOCOL.mixture_lr
    batch_size: int = 64  # mini-batch rows (half the training points when there are fewer than 2 x this)
    log_freq: int = 10  # mini-batch fits: a full-data NLL (used by the recovery test) every log_freq steps
    lr_schedule: str = "cosine"

    def mini_batch(self, num_train: int) -> int:
        return self.batch_size if num_train >= 2 * self.batch_size else max(1, num_train // 2)

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class Cell:
    """One cell: a family's dataset at one clamp, batch mode and reset setting, over `seeds`. Picklable."""

    family: str
    data: SweepData
    clamp: float
    batch: str  # "full" or "mini"
    reset: bool
    seeds: tuple[int, ...]
    settings: SweepSettings

    @property
    def label(self) -> str:
        return f"{self.family} {self.data.name} clamp {self.clamp:.3g} {self.batch} reset {'on' if self.reset else 'off'}"


def plan_cells(
    families: list[str],
    seeds: tuple[int, ...],
    settings: SweepSettings,
    datasets: list[str] | None = None,
    num_clamps: int = 10,
    space_file: str | Path | None = None,
) -> list[Cell]:
    """Every cell, in the order of sweep.csv: family, dataset, clamp, batch, reset."""
    cells = []
    for family, selected in select_datasets(families, datasets).items():
        for data in selected:
            for clamp in clamp_grid(family, num_clamps, space_file):
                for batch in ("full", "mini"):
                    for reset in (True, False):
                        cells.append(Cell(family, data, clamp, batch, reset, seeds, settings))
    return cells


@functools.lru_cache(maxsize=16)
def _load(name: str) -> Dataset:
    return load_dataset(name)


def _options(cell: Cell) -> dict:
    s = cell.settings
    return {
        "num_iterations": s.iterations,
        "component_lr": s.component_lr,
        "mixture_lr": s.mixture_lr,
        "reset": cell.reset,
        "log_freq": s.log_freq,
        "lr_schedule": s.lr_schedule,
        "progress": False,
        "num_threads": 1,
    }


def _rows(cell: Cell, fits, val, data_floor: float, batch_size: int | None) -> list[dict]:
    """One ROW_COLUMNS dict per seed from its (model, record, ran away)."""
    rows = []
    for seed, (model, result, runaway) in zip(cell.seeds, fits, strict=True):
        rows.append(
            {
                "family": cell.family,
                "dataset": cell.data.name,
                "clamp": cell.clamp,
                "seed": seed,
                "batch": batch_size or 0,
                "reset": int(cell.reset),
                **fit_measures(model, result, cell.clamp, val, data_floor, runaway),
            }
        )
    return rows


def group_cells(cells: Sequence[Cell]) -> list[list[int]]:
    """Indices of the cells fit together, in first-cell order: the full-batch cells of one family, dataset and
    reset setting (every clamp and seed of them as one population, gmm.population); each mini-batch cell alone
    (mini-batches are fit one seed after the other)."""
    groups: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for i, cell in enumerate(cells):
        if cell.batch != "full":
            out.append([i])
            continue
        key = (cell.family, cell.data.name, cell.reset)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return out


def run_group(cells: Sequence[Cell]) -> list[list[dict]]:
    """The rows of each cell of a `group_cells` group (one torch thread is the caller's business)."""
    if len(cells) == 1 and cells[0].batch != "full":
        return [run_cell(cells[0])]
    first = cells[0]
    train, val = first.data.load()
    data_floor = float(train.double().var(0).amin()) * DEGENERATE_RATIO
    members = [(cell, seed) for cell in cells for seed in cell.seeds]
    population = gmm.make_model(first.family, first.data.components, train.shape[1], batch_shape=(len(members),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gmm.ConvergenceWarning)  # hundreds of fits: the numbers say it
        records = gmm.fit(
            population, train, **_options(first), clamp=[c.clamp for c, _ in members], seed=[s for _, s in members]
        )
    fits = [(population.member(i), r, records.errors[i] is not None) for i, r in enumerate(records)]
    out, at = [], 0
    for cell in cells:
        out.append(_rows(cell, fits[at : at + len(cell.seeds)], val, data_floor, None))
        at += len(cell.seeds)
    return out


def run_cell(cell: Cell) -> list[dict]:
    """Fit the cell's seeds (one torch thread is the caller's business); one ROW_COLUMNS dict per seed."""
    if cell.batch == "full":
        return run_group([cell])[0]
    train, val = cell.data.load()
    batch_size = cell.settings.mini_batch(train.shape[0])
    data_floor = float(train.double().var(0).amin()) * DEGENERATE_RATIO
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gmm.ConvergenceWarning)
        for seed in cell.seeds:
            model = gmm.make_model(cell.family, cell.data.components, train.shape[1])
            runaway = False
            try:
                model.fit(train, **_options(cell), clamp=cell.clamp, batch_size=batch_size, seed=seed)
            except gmm.NonFiniteNLLError:
                runaway = True
            fits.append((model, model.fit_result_, runaway))
    return _rows(cell, fits, val, data_floor, batch_size)


@dataclass(frozen=True)
class SweepFit:
    """What a sweep fit's metrics are computed from: the fitted model, its record, the cell's clamp, the
    validation split, the data's degenerate-variance floor and whether the NLL ran away (non-finite)."""

    model: gmm.MixtureModel
    result: gmm.FitResult
    clamp: float
    val: torch.Tensor
    data_floor: float
    runaway: bool

    @functools.cached_property
    def first_clamp(self):
        return next((e for e in self.result.events if e.kind == "clamp"), None)

    @functools.cached_property
    def recovery(self):
        """The "recovered" event of the first clamp's component at or after it (None without one)."""
        first = self.first_clamp
        if first is None:
            return None
        same = (e for e in self.result.events if e.kind == "recovered" and e.component == first.component)
        return next((e for e in same if e.step >= first.step), None)

    def smallest_variance(self) -> float:
        """The smallest variance (L_kk^2 for Cholesky families) of any component; inf with nothing to clamp."""
        family = self.model.family
        if not family.trainable:
            return math.inf
        with torch.no_grad():
            return float(family.floor_view(self.model.raw_cov.detach()).amin().mul(1.0 / family.floor_scale).exp())

    def collapsed(self) -> int:
        return int(self.runaway or self.smallest_variance() <= max(RECOVERY_FLOOR_FACTOR * self.clamp, self.data_floor))


def _recovered(f: SweepFit) -> float:
    return math.nan if f.first_clamp is None else float(f.recovery is not None)


def _recovery_steps(f: SweepFit) -> float:
    return math.nan if f.recovery is None else float(f.recovery.step - f.first_clamp.step)


# The sweep's per-fit metrics (sweep.csv columns, in order), one definition each (experiments.metrics.Metric;
# the module docstring defines them): a new one is one entry here. Counts are compared exactly by --verify.
SWEEP_METRICS: tuple[Metric, ...] = (
    Metric("train_nll", "final train NLL", gd=lambda f: math.nan if f.runaway else float(f.result.final_nll)),
    Metric("val_nll", "final validation NLL", gd=lambda f: math.nan if f.runaway else float(-f.model.score(f.val))),
    Metric("clamps", "clamp events", gd=lambda f: f.result.clamp_count, kind="count"),
    Metric("resets", "reset events", gd=lambda f: f.result.reset_count, kind="count"),
    Metric("collapsed", "1: a degenerate component at the end, or a runaway NLL", gd=SweepFit.collapsed, kind="count"),
    Metric("recovered", "1: the first clamp's component recovered (NaN: never clamped)", gd=_recovered),
    Metric("recovery_steps", "steps from the first clamp to its recovery", gd=_recovery_steps),
)
METRIC_COLUMNS = tuple(m.name for m in SWEEP_METRICS)
COUNT_COLUMNS = tuple(m.name for m in SWEEP_METRICS if m.kind == "count")  # integers, compared exactly by --verify
ROW_COLUMNS = KEY_COLUMNS + METRIC_COLUMNS


def fit_measures(model, result, clamp: float, val, data_floor: float, runaway: bool = False) -> dict:
    """The SWEEP_METRICS of one finished (or non-finite) fit; see the module docstring."""
    fit = SweepFit(model, result, clamp, val, data_floor, runaway)
    return {m.name: m.gd(fit) for m in SWEEP_METRICS}
