"""Seed reports: one configuration fit over many seeds by gradient descent and by EM, written to a folder that
anyone can regenerate number for number, and a check that it does.

    python -m experiments.report --family full --seeds 10                 # -> reports/full-10seeds-<time>/
    python -m experiments.report --family all --seeds 5 --jobs 2 --out reports/all-5
    python -m experiments.report --config my.yaml --iterations 2000 --seeds 10 --tracking-uri sqlite:////tmp/m.db
    python -m experiments.report --verify reports/full-10seeds-<time>
    make report FAMILY=full SEEDS=10 [JOBS=2] [CONFIG=FILE]      then      make verify-report [REPORT=path]

The config is REPORT_DEFAULTS (the demo's data: 1000 samples, 5 components, 2-D, radius 8; 5000 Adam
steps, about 4-5 s per seed on one core with the MLflow logging) < the --config file < explicit flags (every
ExperimentConfig field has a flag, as in `python -m experiments.run`). `em` is always on: the report
compares the two methods.

What a seed varies: seed i (0 <= i < --seeds) runs the config with `seed = config.seed + i` (the fit's init
and resets) and `data_seed = config.data_seed + i` (a fresh dataset); with a named `dataset` the data is
fixed and only `seed` varies. `--family all` runs every family in gmm.FAMILIES on the same seeds. The seeds of a
family are fit as one population (experiments.population.run_population: one batched gradient-descent fit,
then per seed EM from the same initialization and everything `run_experiment` logs), one MLflow run per seed
nested under one parent run per report, tagged `report.name`; the parent run holds the
report folder as its `report/` artifact.

The folder (built in a hidden temporary sibling and renamed into place, so an interrupted run never leaves
a half-written report; every file inside is also written to a temporary name and renamed):

| file                           | what                                                                      |
|--------------------------------|---------------------------------------------------------------------------|
| runs.csv                       | one row per (family, seed, method); RUN_COLUMNS; written with pandas     |
| summary.csv                    | count, mean, std, min, max of every metric per family and method          |
| figures/nll_curves_<family>.png | every seed's gradient-descent NLL curve overlaid, resets dashed          |
| figures/final_nll_<family>.png | final train/validation NLL per method (box + one point per seed)          |
| figures/fit_<family>.png       | data and fitted model of the median seed (median final train NLL of GD)   |
| report.md, report.html         | tables and figures; the HTML embeds the images (base64), one file          |
| manifest.json                  | config, seeds, dataset fingerprints, git commit + dirty flag, versions,    |
|                                | platform, MLflow ids, sha256 of runs.csv without its timing columns        |

`--verify FOLDER` re-runs the manifest's config and seeds (logged to MLflow as usual) and compares every
number of runs.csv but the timing columns (TIMING_COLUMNS): exactly when the platform, CPU capability and
Python/torch/numpy versions match the manifest's, else within |got - expected| <= ATOL + RTOL * |expected|
(counts and iterations still exactly). It prints PASS or FAIL and, on failure, the first difference
(family, seed, method, column, expected, got).

Every family runs with one torch thread (worker processes of a spawn-context pool, one family each, when
--jobs > 1; this process otherwise), and a seed's numbers do not depend on what else its population holds, so
serial and parallel runs give identical runs.csv apart from the timing columns.

Exit status: 0 done / PASS, 1 a fit failed / FAIL, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import html
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import gmm
from gmm.cli import OneLineParser

from .commands import module
from .config import ExperimentConfig, add_arguments
from .datasets import load_dataset
from .redact import install_log_redaction, redact

log = logging.getLogger(__name__)

# 5000 steps instead of the demo's 20000: the NLL curves are flat long before (log-scale steps in
# figures/nll_curves_*.png), and `make report FAMILY=full SEEDS=10` takes under a minute on one core.
REPORT_DEFAULTS = ExperimentConfig(iterations=5000, em=True)
EXPERIMENT = "reports"  # MLflow experiment of report (and verification) runs
METHODS = {"gd": "gradient descent", "em": "EM"}
KEY_COLUMNS = ("family", "seed", "data_seed", "method")
METRIC_COLUMNS = (
    "train_nll",  # final mean NLL on the training split, nats per sample
    "val_nll",  # on the validation split (NaN without one)
    "true_nll_train",  # NLL of the generating parameters on the same splits
    "true_nll_val",
    "gd_em_gap",  # train NLL of GD minus EM's on the same seed (GD rows only)
    "recovery_error",  # mean distance of Hungarian-matched fitted and true means
    "ari",  # adjusted Rand index of the predicted components against the true labels, all points
    "clamp_count",  # variance-floor events
    "reset_count",  # collapsed-component resets
    "iterations",  # Adam steps / EM iterations run
    "converged",  # 1 when the method's tolerance stopped it (GD: config.tol; EM: em_tol)
    "wall_time",  # seconds in the fit loop
)
RUN_COLUMNS = KEY_COLUMNS + METRIC_COLUMNS
GLOSSARY = {  # every column of runs.csv and of the summary, as the report's glossary prints it
    "family": "covariance family of the fitted model (and of the generated data)",
    "seed": "seed of the fit: initialization and resets (config seed + i for seed i)",
    "data_seed": "seed of the generated data and of the train/validation split (fixed for a named dataset)",
    "method": "gd: gradient descent (Adam on the mean NLL); em: expectation-maximization from the same start",
    "train_nll": "final mean negative log-likelihood on the training split, nats per sample (lower is better)",
    "val_nll": "the same on the held-out validation split (- without one)",
    "true_nll_train": "NLL of the parameters that generated the data, on the training split (- for a data file)",
    "true_nll_val": "the same on the validation split",
    "gd_em_gap": "GD's train_nll minus EM's, same seed (gd rows only): > 0 means EM found the better optimum, "
    "< 0 gradient descent did",
    "recovery_error": "mean Euclidean distance between fitted and true means after one-to-one Hungarian matching, "
    "in data units (0 = every true mean recovered; - for a data file)",
    "ari": "adjusted Rand index of the most responsible component against the true labels, all points "
    "(1 = same partition, about 0 = chance; - for a data file)",
    "clamp_count": "variance-floor events: steps at which a covariance diagonal was raised to clamp",
    "reset_count": "collapsed components moved to a badly explained point (gmm.fit)",
    "iterations": "Adam steps (gd) or EM iterations (em) run",
    "converged": "1 when the method's tolerance stopped it early (gd: tol, off by default, so 0; em: em_tol), "
    "else 0; its mean is the converged fraction, so 0 ± 0 means no seed stopped early",
    "wall_time": "seconds in the fit loop (not compared by --verify)",
    "mean ± std [min, max]": "over the seeds: mean, sample standard deviation (n - 1), smallest and largest",
}
TIMING_COLUMNS = ("wall_time",)  # left out of the sha256 and of --verify
COUNT_COLUMNS = ("clamp_count", "reset_count", "iterations", "converged")  # compared exactly, always
RTOL, ATOL = 1e-3, 1e-4  # --verify across platforms or versions: |got - expected| <= ATOL + RTOL * |expected|
MANIFEST_FORMAT = "gmm-seed-report/1"
REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports"  # the default folder, next to the stores
MARKER = ".gmm-report.json"  # in every report folder: {"format": MANIFEST_FORMAT, "files": [every file written]}
_MANIFEST_KEYS = ("format", "name", "families", "config", "seeds", "runs", "versions", "platform", "runs_csv")


class SeedFailed(RuntimeError):
    """A seed's fit failed (non-finite NLL, failed factorization, ...); the message names the seed."""


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedTask:
    """One seed of one family: what a (possibly spawned) worker needs. Picklable."""

    config: ExperimentConfig
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    report_name: str


def seed_configs(base: ExperimentConfig, families: Sequence[str], num_seeds: int) -> list[ExperimentConfig]:
    """The config of every (family, seed), families outer: seed i adds i to `seed` and (for generated data)
    to `data_seed`; EM is switched on."""
    configs = []
    for family in families:
        for i in range(num_seeds):
            changes: dict[str, Any] = {"family": family, "seed": base.seed + i, "em": True}
            if base.dataset is None:
                changes["data_seed"] = base.data_seed + i
            configs.append(base.replace(**changes))
    return configs


# -- one seed ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedOutcome:
    """What one seed measured: its runs.csv rows (GD, EM) and what the figures need. Picklable."""

    family: str
    seed: int
    data_seed: int
    rows: tuple[dict[str, Any], ...]
    gd_history: np.ndarray = field(repr=False)  # (T + 1,) float64
    em_history: np.ndarray = field(repr=False)
    reset_steps: tuple[int, ...]
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the GD model (CPU), for the median seed's figure
    variance: float
    fingerprint: str
    run_id: str


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per seed: the same numbers as a serial run, no oversubscription


def run_seed(task: SeedTask) -> SeedOutcome:
    """Run one seed with `run_experiment` (a nested MLflow run) and measure EM's fit quality too.

    Raises:
        SeedFailed: the fit failed (the MLflow run is marked FAILED).
    """
    from .run import run_experiment  # imports MLflow; kept out of `import experiments.report`

    cfg = task.config
    try:
        result = run_experiment(
            cfg, task.tracking_uri, task.experiment, parent_run_id=task.parent_run_id, run_name=_run_name(cfg),
            tags=_seed_tags(task),
        )  # fmt: skip
    except _FIT_ERRORS as err:
        raise _failed(cfg, err) from None
    return _outcome(cfg, result)


_FIT_ERRORS = (FloatingPointError, torch.linalg.LinAlgError, gmm.NonFiniteNLLError)


def _run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.family} seed {cfg.seed}"


def _seed_tags(task: SeedTask) -> dict[str, str]:
    cfg = task.config
    return {"report.name": task.report_name, "report.seed": str(cfg.seed), "report.family": cfg.family}


def _failed(cfg: ExperimentConfig, err: BaseException) -> SeedFailed:
    return SeedFailed(f"{cfg.family} seed {cfg.seed} (data_seed {cfg.data_seed}): {' '.join(str(err).split())}")


def run_family(tasks: Sequence[SeedTask]) -> list[SeedOutcome]:
    """Every seed of one family as one population (experiments.population: one batched fit, one MLflow run per
    seed, the numbers `run_seed` would give up to float rounding, and the same whatever else runs with them);
    seed by seed with `run_seed` when the config cannot batch (analytic or compiled steps).

    Raises:
        SeedFailed: a seed's fit failed (its run is marked FAILED; the other seeds' runs are finished).
    """
    from .population import population_options, run_population

    configs = [t.config for t in tasks]
    try:
        population_options(configs)
    except ValueError:
        return [run_seed(t) for t in tasks]
    first = tasks[0]
    try:
        results = run_population(
            configs, first.tracking_uri, first.experiment, parent_run_ids=first.parent_run_id,
            run_names=[_run_name(c) for c in configs], tags=[_seed_tags(t) for t in tasks],
        )  # fmt: skip
    except _FIT_ERRORS as err:  # a failure of the population itself (e.g. a factorization in a start)
        raise _failed(configs[0], err) from None
    for cfg, result in zip(configs, results, strict=True):
        if isinstance(result, BaseException):
            raise _failed(cfg, result) from None
    return [_outcome(cfg, result) for cfg, result in zip(configs, results, strict=True)]


def _outcome(cfg: ExperimentConfig, result) -> SeedOutcome:
    """A seed's runs.csv rows and figure inputs from its ExperimentResult."""
    em_recovery, em_ari = result.em_recovery_error, result.em_ari
    key = {"family": cfg.family, "seed": cfg.seed, "data_seed": cfg.data_seed}
    gd_row = {
        **key,
        "method": "gd",
        "train_nll": result.train_nll,
        "val_nll": result.val_nll,
        "true_nll_train": result.true_nll_train,
        "true_nll_val": result.true_nll_val,
        "gd_em_gap": result.gd_em_gap,
        "recovery_error": result.recovery_error,
        "ari": result.ari,
        "clamp_count": result.clamp_count,
        "reset_count": result.reset_count,
        "iterations": result.fit.num_iterations,
        "converged": int(result.fit.converged),
        "wall_time": result.fit.wall_time,
    }
    em = result.em
    em_row = {
        **key,
        "method": "em",
        "train_nll": result.em_nll_train,
        "val_nll": result.em_nll_val,
        "true_nll_train": result.true_nll_train,
        "true_nll_val": result.true_nll_val,
        "gd_em_gap": math.nan,
        "recovery_error": em_recovery,
        "ari": em_ari,
        "clamp_count": em.clamp_count,
        "reset_count": em.reset_count,
        "iterations": em.num_iterations,
        "converged": int(em.converged),
        "wall_time": em.wall_time,
    }
    rows = tuple({k: (float(v) if isinstance(v, float) else v) for k, v in row.items()} for row in (gd_row, em_row))
    return SeedOutcome(
        family=cfg.family,
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        rows=rows,
        gd_history=result.fit.nll_history.double().cpu().numpy(),
        em_history=em.nll_history.double().cpu().numpy(),
        reset_steps=tuple(e.step for e in result.fit.events if e.kind == "reset"),
        state_dict={k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
        variance=float(result.model.variance),
        fingerprint=result.fingerprint,
        run_id=result.run_id,
    )


# -- many seeds -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_one_by_one(tasks: Sequence[SeedTask]) -> list[SeedOutcome]:
    """The seeds one after the other, each its own fit (`--one-by-one`: the reports of before populations)."""
    return [run_seed(t) for t in tasks]


def run_seeds(tasks: Sequence[SeedTask], jobs: int = 1, desc: str = "seeds", population: bool = True) -> list[SeedOutcome]:
    """Run every task, serially (jobs == 1) or in `jobs` spawned worker processes; results in task order.

    A tqdm bar counts finished seeds when stderr is a terminal. On the first failure the pending seeds
    are cancelled and the error is re-raised.
    """
    from tqdm.auto import tqdm

    outcomes: list[SeedOutcome | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="seed", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    groups: dict[str, list[int]] = {}  # a family's seeds: one population (or one seed at a time)
    for i, task in enumerate(tasks):
        groups.setdefault(task.config.family if population else str(i), []).append(i)
    run_group = run_family if population else run_one_by_one

    def done(indices: list[int], results: list[SeedOutcome]) -> None:
        for i, outcome in zip(indices, results, strict=True):
            outcomes[i] = outcome
        bar.update(len(indices))

    try:
        if jobs <= 1 or len(groups) <= 1:
            with _one_thread():
                for indices in groups.values():
                    done(indices, run_group([tasks[i] for i in indices]))
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow/sqlite state
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(groups)), mp_context=ctx, initializer=_init_worker)
            try:
                futures = {pool.submit(run_group, [tasks[i] for i in g]): g for g in groups.values()}
                for future in as_completed(futures):
                    done(futures[future], future.result())
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [o for o in outcomes if o is not None]


def runs_frame(outcomes: Sequence[SeedOutcome]) -> pd.DataFrame:
    """runs.csv as a DataFrame: RUN_COLUMNS, one row per (family, seed, method), in run order."""
    df = pd.DataFrame([row for o in outcomes for row in o.rows], columns=list(RUN_COLUMNS))
    for name in ("seed", "data_seed", *COUNT_COLUMNS):
        df[name] = df[name].astype("int64")
    for name in METRIC_COLUMNS:
        if name not in COUNT_COLUMNS:
            df[name] = df[name].astype("float64")
    return df


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: count, mean, std (ddof 1), min, max of every metric per family and method (NaNs skipped;
    metrics with no value for a method, such as EM's gd_em_gap, are left out)."""
    records = []
    for (family, method), group in runs.groupby(["family", "method"], sort=False):
        for metric in METRIC_COLUMNS:
            values = group[metric].astype("float64").dropna()
            if values.empty:
                continue
            records.append(
                {
                    "family": family,
                    "method": method,
                    "metric": metric,
                    "count": int(values.size),
                    "mean": values.mean(),
                    "std": values.std(ddof=1) if values.size > 1 else math.nan,
                    "min": values.min(),
                    "max": values.max(),
                }
            )
    return pd.DataFrame(records, columns=["family", "method", "metric", "count", "mean", "std", "min", "max"])


def runs_csv_text(runs: pd.DataFrame) -> str:
    """The exact text of runs.csv (floats in full precision: they read back bit for bit)."""
    return runs.to_csv(index=False, lineterminator="\n")


def runs_sha256(runs: pd.DataFrame) -> str:
    """sha256 of runs.csv without its timing columns: equal numbers, equal hash."""
    return hashlib.sha256(runs_csv_text(runs.drop(columns=list(TIMING_COLUMNS))).encode()).hexdigest()


# pandas < 3 parses floats with a fast, slightly inexact parser unless asked; pandas 3 round-trips by default
# (and deprecates the option)
_ROUND_TRIP = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_runs_csv(path: Path) -> pd.DataFrame:
    """Read runs.csv back exactly (round-trip float parsing).

    Raises:
        ValueError: unreadable, or missing columns.
    """
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], **_ROUND_TRIP)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    missing = [c for c in RUN_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; it is not a report's runs.csv")
    return df


# -- environment ------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Versions, platform and git state, as the manifest records them."""
    from importlib.metadata import PackageNotFoundError, version

    from .tracking import static_tags as _static_tags

    versions = {"python": platform.python_version()}
    for package in ("torch", "numpy", "pandas", "scipy", "matplotlib", "mlflow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    versions["torch"] = torch.__version__
    versions["numpy"] = np.__version__
    static = _static_tags()
    dirty = static.get("git.dirty", "unknown")
    return {
        "git": {"commit": static.get("git.commit", "unknown"), "dirty": {"true": True, "false": False}.get(dirty)},
        "versions": versions,
        "packages": installed_packages(),
        "platform": {
            "platform": platform.platform(),
            "system": platform.system(),
            "machine": platform.machine(),
            "cpu_capability": _cpu_capability(),
            "torch_threads_per_seed": 1,
        },
    }


def installed_packages() -> list[str]:
    """Every installed distribution as "name==version", sorted: the content of `pip freeze` (read through
    importlib.metadata, without starting pip)."""
    from importlib.metadata import distributions

    names = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            names.setdefault(name.lower(), f"{name}=={dist.version}")
    return [names[k] for k in sorted(names)]


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())  # the SIMD kernels torch picked: AVX2, AVX512, ...
    except (AttributeError, RuntimeError):
        return "unknown"


_EXACT_VERSIONS = ("python", "torch", "numpy")
_EXACT_PLATFORM = ("system", "machine", "cpu_capability")


def same_environment(manifest: dict[str, Any], env: dict[str, Any]) -> tuple[bool, str]:
    """Whether numbers must match exactly: same system, machine, CPU capability, Python, torch and numpy."""
    diffs = []
    for key in _EXACT_VERSIONS:
        old, new = manifest.get("versions", {}).get(key), env["versions"].get(key)
        if old != new:
            diffs.append(f"{key} {old} -> {new}")
    for key in _EXACT_PLATFORM:
        old, new = manifest.get("platform", {}).get(key), env["platform"].get(key)
        if old != new:
            diffs.append(f"{key} {old} -> {new}")
    return not diffs, ", ".join(diffs)


# -- files ------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _marker_files(folder: Path) -> set[str] | None:
    """The files the report marker of `folder` lists (relative paths), or None when it carries no marker."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"] if marker.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return {str(f) for f in files} if isinstance(files, list) else None


def _foreign_files(folder: Path, listed: set[str]) -> list[str]:
    """Files under `folder` that its marker does not list (written by someone else)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    return sorted(found - listed - {MARKER})


def check_out_dir(out: Path, force: bool = False) -> None:
    """--out must be new, an empty folder, or (with `force`) an earlier report holding only files it wrote.

    A report folder carries the marker file MARKER, which lists every file the report wrote; a folder without
    it is never written into or replaced, so no file of the user's is ever deleted.

    Raises:
        ValueError: `out` is a file, a non-empty folder that is not a report, an earlier report without
            `force`, or a report folder someone added files to.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder path such as reports/NAME")
    if not out.is_dir() or not any(out.iterdir()):
        return
    listed = _marker_files(out)
    if listed is None:
        raise ValueError(
            f"--out {out} is a non-empty folder that is not a report (no {MARKER} marker); its files are left "
            "alone: choose another path"
        )
    if not force:
        raise ValueError(f"--out {out} holds an earlier report; pass --force to replace it, or choose another path")
    foreign = _foreign_files(out, listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out} holds files the report did not write ({shown}); move them away or choose another path"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out` (an earlier report there, checked by check_out_dir, is replaced)."""
    if out.exists():
        check_out_dir(out, force=True)  # again: files may have been added while the seeds ran
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# -- figures ----------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def median_outcome(outcomes: Sequence[SeedOutcome]) -> SeedOutcome:
    """The seed whose gradient-descent final train NLL is the median (the lower middle one for an even count)."""
    ranked = sorted(outcomes, key=lambda o: (o.rows[0]["train_nll"], o.seed))
    return ranked[(len(ranked) - 1) // 2]


def family_figures(
    family: str, outcomes: Sequence[SeedOutcome], runs: pd.DataFrame, config: ExperimentConfig
) -> dict[str, bytes]:
    """The three PNG figures of one family (file name -> bytes); `config` is the median seed's."""
    from gmm.plot import make_figure, plot_data_and_model, plot_nll_curve

    figures = {}
    fig, (ax,) = make_figure(figsize=(8.0, 5.2))
    curves = {f"seed {o.seed}": o.gd_history for o in outcomes}
    events = {f"seed {o.seed}": [{"step": s, "kind": "reset"} for s in o.reset_steps] for o in outcomes}
    plot_nll_curve(curves, events, ax=ax, log_x=True)
    ax.set_title(f"{family}: gradient-descent NLL of {len(outcomes)} seeds (dashed: resets)")
    figures[f"nll_curves_{family}.png"] = _png(fig)

    fig, axes = make_figure(2, figsize=(10.0, 4.4))
    rows = runs[runs["family"] == family]
    for ax, column, label in zip(axes, ("train_nll", "val_nll"), ("train", "validation"), strict=True):
        paired = rows.pivot_table(index="seed", columns="method", values=column).dropna()  # seeds with both
        if paired.empty:
            ax.set_title(f"no {label} NLL")
            continue
        groups = [paired[m].to_numpy() for m in METHODS]
        ax.boxplot(groups, tick_labels=list(METHODS.values()), widths=0.5, showfliers=False, medianprops={"color": "black"})
        offsets = np.linspace(-0.15, 0.15, len(paired)) if len(paired) > 1 else np.zeros(1)
        for k, (seed, values) in enumerate(paired[list(METHODS)].iterrows()):  # one line per seed: GD to EM
            ax.plot(
                np.arange(1, len(METHODS) + 1) + offsets[k],
                values.to_numpy(),
                "o-",
                alpha=0.6,
                markersize=4,
                linewidth=0.8,
                label=f"seed {seed}" if len(paired) <= 10 else None,
            )
        if len(paired) <= 10:
            ax.legend(fontsize="x-small", ncols=2)
        ax.set_ylabel(f"final {label} NLL (nats per sample)")
        ax.set_title(f"{family}: final {label} NLL, a line per seed")
        ax.grid(True, axis="y", alpha=0.3)
    figures[f"final_nll_{family}.png"] = _png(fig)

    median = median_outcome(outcomes)
    data = load_dataset(config.data_spec())
    model = gmm.make_model(config.family, config.model_components, config.model_dims, variance=median.variance)
    model.load_state_dict(median.state_dict)
    title = (
        f"{family}, median seed {median.seed} (data_seed {median.data_seed}): train NLL {median.rows[0]['train_nll']:.4f}"
    )
    figures[f"fit_{family}.png"] = _png(plot_data_and_model(data.train.to(model.dtype), model, title=title))
    return figures


# -- report.md and report.html ----------------------------------------------------------------------------
class _Document:
    """Headings, paragraphs, tables, code and images, rendered to Markdown and to one self-contained HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", list(headers), [list(r) for r in rows]))

    def image(self, path: str, alt: str, png: bytes) -> None:
        self.blocks.append(("img", path, alt, png))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "p":
                out.append(block[1])
            elif kind == "code":
                out.append(f"```\n{block[1]}\n```")
            elif kind == "table":
                out.append(markdown_table(block[1], block[2]))
            elif kind == "img":
                out.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(block[3]).decode("ascii")
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                    f"<figcaption>{html.escape(block[1])}</figcaption></figure>"
                )
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.85em;display:block;max-width:100%;overflow-x:auto}"
    "th,td{border:1px solid #ccc;padding:3px 6px}"
    "td{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:0.85em}"
    "pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}code{background:#f6f6f6}"
)


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (| escaped in cells)."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)])


def _decimals(spread: float) -> int | None:
    """Decimals that keep two significant digits of `spread` (None: no spread to go by)."""
    if not math.isfinite(spread) or spread <= 0:
        return None
    return max(0, 1 - math.floor(math.log10(spread)))


def _fmt_stat(value: Any, decimals: int | None) -> str:
    """One summary number by the precision rule: the spread's decimals; 6 significant digits without spread."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals is None:
        return _fmt(value)
    if decimals > 6:  # tiny spreads: the same two significant digits, in scientific notation
        return f"{float(value):.2g}" if float(value) != 0 else "0"
    return f"{float(value):.{decimals}f}"


def _fmt(value: Any, digits: int = 6) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def summary_table(summary: pd.DataFrame, family: str) -> tuple[list[str], list[list[str]]]:
    """One family's summary: a row per metric, a column per method, cells 'mean ± std [min, max]'."""
    rows = summary[summary["family"] == family]
    headers = ["metric", *(f"{METHODS[m]}: mean ± std [min, max]" for m in METHODS)]
    table = []
    for metric in METRIC_COLUMNS:
        cells = [metric]
        for method in METHODS:
            match = rows[(rows["method"] == method) & (rows["metric"] == metric)]
            if match.empty:
                cells.append("-")
                continue
            r = match.iloc[0]
            d = _decimals(float(r["std"]))
            cells.append(
                f"{_fmt_stat(r['mean'], d)} ± {_fmt_stat(r['std'], d)} [{_fmt_stat(r['min'], d)}, {_fmt_stat(r['max'], d)}]"
            )
        table.append(cells)
    return headers, table


def build_document(
    manifest: dict[str, Any], runs: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, bytes]
) -> _Document:
    """report.md / report.html: what was run, the summary per family, the figures, every run, the setup."""
    name, families = manifest["name"], manifest["families"]
    config = manifest["config"]
    doc = _Document()
    doc.heading(1, f"Seed report: {name}")
    git = manifest["git"]
    dirty = {True: " (dirty working tree)", False: "", None: " (dirty: unknown)"}[git["dirty"]]
    doc.para(
        f"{len(manifest['seeds'])} seeds × {len(families)} famil{'y' if len(families) == 1 else 'ies'} "
        f"({', '.join(families)}), each fit by gradient descent ({config['iterations']} Adam steps) and by EM "
        f"from the same initialization. Written {manifest['created_utc']} in {manifest['elapsed_seconds']:.1f} s "
        f"by `{manifest['command']}` at git commit `{git['commit']}`{dirty}."
    )
    doc.para(f"What a seed varies: {manifest['seed_rule']}")
    doc.para(
        f"Reproduce and check every number: `{module('experiments.report', '--verify', manifest['folder'])}` "
        f"(or `make verify-report REPORT={manifest['folder']}`)."
    )
    for family in families:
        doc.heading(2, f"Family {family}")
        headers, rows = summary_table(summary, family)
        doc.table(headers, rows)
        for file, alt in (
            (f"nll_curves_{family}.png", f"{family}: NLL curves of every seed"),
            (f"final_nll_{family}.png", f"{family}: final NLL per method"),
            (f"fit_{family}.png", f"{family}: fit of the median seed"),
        ):
            doc.image(f"figures/{file}", alt, figures[file])
    doc.heading(2, "Every run (runs.csv)")
    doc.para(
        "Two tables, so that each fits a page; rows pair by family, seed and method. Numbers: 6 significant "
        "digits here (runs.csv keeps full precision); in the summaries, mean, std, min and max are rounded to "
        "the decimal of the std's second significant digit (its scientific form below 1e-6), or 6 significant "
        "digits when the std is 0."
    )
    records = _records(runs)
    for columns in (RUN_COLUMNS[:10], KEY_COLUMNS + RUN_COLUMNS[10:]):
        doc.table(list(columns), [[_fmt(row[c], 3 if c in TIMING_COLUMNS else 6) for c in columns] for row in records])
    doc.heading(2, "Glossary")
    doc.table(["column", "meaning"], [[name, meaning] for name, meaning in GLOSSARY.items()])
    doc.heading(2, "Configuration")
    doc.code(json.dumps(config, indent=2))
    doc.heading(2, "Environment")
    env_rows = [[f"version.{k}", v] for k, v in manifest["versions"].items()]
    env_rows += [[f"platform.{k}", str(v)] for k, v in manifest["platform"].items()]
    env_rows += [["runs.csv sha256 (timing columns excluded)", manifest["runs_csv"]["sha256"]]]
    env_rows += [[f"mlflow.{k}", str(v)] for k, v in manifest["mlflow"].items()]
    doc.table(["what", "value"], env_rows)
    packages = manifest.get("packages") or []
    if packages:
        doc.para(f"Installed packages ({len(packages)}, as `pip freeze` lists them; also in manifest.json):")
        doc.code("\n".join(packages))
    return doc


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{c: (v.item() if isinstance(v, np.generic) else v) for c, v in row.items()} for row in df.to_dict("records")]


# -- the report -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """A written report: its folder, runs and summary frames, the manifest and the parent MLflow run."""

    folder: Path
    runs: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)
    parent_run_id: str
    elapsed: float


def seed_rule(config: ExperimentConfig) -> str:
    if config.dataset is not None:
        return (
            f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets); "
            f"the data is the named dataset {config.dataset!r} for every seed."
        )
    if config.data_file is not None:
        return (
            f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets) on the data file "
            f"{config.data_file!r}, split into train and validation afresh with data_seed = {config.data_seed} + i."
        )
    return (
        f"seed i (0 <= i < n) fits with seed = {config.seed} + i (initialization and resets) on fresh data "
        f"generated with data_seed = {config.data_seed} + i."
    )


def _check_plan(families: Sequence[str], num_seeds: int, jobs: int) -> list[str]:
    from gmm.validation import check_choice, check_int

    families = list(families)
    if not families:
        raise ValueError(f"give at least one family: one of {', '.join(gmm.FAMILIES)} (or 'all')")
    for family in families:
        check_choice(family, gmm.FAMILIES, "family")
    check_int(num_seeds, "seeds", minimum=1)
    check_int(jobs, "jobs", minimum=1)
    return families


def make_report(
    config: ExperimentConfig,
    families: Sequence[str] | None = None,
    num_seeds: int = 10,
    out: str | Path | None = None,
    *,
    jobs: int = 1,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    command: str | None = None,
    force: bool = False,
    population: bool = True,
) -> Report:
    """Run `config` over `num_seeds` seeds for each of `families` (default: config.family) and write the
    report folder `out` (default <project>/reports/<family>-<n>seeds-<UTC time>; an earlier report there is
    replaced only with `force`, and never a folder holding files the report did not write).

    Raises:
        ValueError / TypeError: bad arguments or config (before anything runs).
        SeedFailed: a fit failed; no folder is written (the parent MLflow run ends FAILED).
    """
    from .tracking import log_metrics, log_params, resolve_tracking_uri, tracked_run

    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"config must be an ExperimentConfig; got {type(config).__name__}")
    base = config.replace(em=True)
    families = _check_plan(families if families is not None else [base.family], num_seeds, jobs)
    created = datetime.now(UTC)
    if out is None:
        label = "all" if len(families) > 1 else families[0]
        out = REPORTS_DIR / f"{label}-{num_seeds}seeds-{created:%Y%m%d-%H%M%S}"
    out = Path(out)
    check_out_dir(out, force)
    name = out.name
    uri = resolve_tracking_uri(tracking_uri)
    configs = seed_configs(base, families, num_seeds)
    command = redact(command or shlex.join(list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])))
    tags = {
        "report.name": name,
        "report.kind": "report",
        "report.families": ",".join(families),
        "report.seeds": str(num_seeds),
    }
    t0 = time.perf_counter()
    with tracked_run(uri, experiment, run_name=f"report {name}", tags=tags) as (client, parent_id):
        log_params(
            client,
            parent_id,
            {**base.flat(), "report.families": ",".join(families), "report.seeds": num_seeds, "report.jobs": jobs},
        )
        tasks = [SeedTask(c, uri, experiment, parent_id, name) for c in configs]
        outcomes = run_seeds(tasks, jobs, desc=f"report {name}", population=population)
        runs = runs_frame(outcomes)
        summary = summarize(runs)
        figures = all_figures(families, outcomes, runs, configs)
        elapsed = time.perf_counter() - t0
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "folder": out.as_posix(),
            "created_utc": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
            "families": families,
            "config": base.to_dict(),
            "seed_rule": seed_rule(base),
            "fit_mode": "population" if population else "one-by-one",  # verify re-runs it the same way
            "seeds": [{"seed": c.seed, "data_seed": c.data_seed} for c in configs if c.family == families[0]],
            "runs": [
                {
                    "family": o.family,
                    "seed": o.seed,
                    "data_seed": o.data_seed,
                    "dataset_fingerprint": o.fingerprint,
                    "run_id": o.run_id,
                }
                for o in outcomes
            ],
            **environment(),
            "runs_csv": {
                "sha256": runs_sha256(runs),
                "columns": list(RUN_COLUMNS),
                "excluded_from_sha256": list(TIMING_COLUMNS),
            },
            "tolerance": {
                "exact_when_equal": [
                    *(f"versions.{k}" for k in _EXACT_VERSIONS),
                    *(f"platform.{k}" for k in _EXACT_PLATFORM),
                ],
                "otherwise": f"|got - expected| <= {ATOL} + {RTOL} * |expected|; {', '.join(COUNT_COLUMNS)} exactly",
                "rtol": RTOL,
                "atol": ATOL,
            },
            "mlflow": {"tracking_uri": redact(uri), "experiment": experiment, "parent_run_id": parent_id},
            "jobs": jobs,
            "elapsed_seconds": round(elapsed, 3),
        }
        _write_folder(out, manifest, runs, summary, figures)
        means = {f"{r.family}.{r.method}.{r.metric}.mean": r.mean for r in summary.itertuples() if math.isfinite(r.mean)}
        log_metrics(client, parent_id, means)
        client.log_artifacts(parent_id, str(out), "report")
    return Report(out, runs, summary, manifest, parent_id, elapsed)


def all_figures(
    families: Sequence[str], outcomes: Sequence[SeedOutcome], runs: pd.DataFrame, configs: Sequence[ExperimentConfig]
) -> dict[str, bytes]:
    """The figures of every family (file name -> PNG bytes)."""
    figures: dict[str, bytes] = {}
    for family in families:
        mine = [o for o in outcomes if o.family == family]
        median = median_outcome(mine)
        median_config = next(c for c in configs if c.family == family and c.seed == median.seed)
        figures.update(family_figures(family, mine, runs, median_config))
    return figures


def report_files(manifest: dict, runs: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, bytes]) -> dict[str, bytes]:
    """Every file of a report folder (relative path -> content), the marker included; a pure function of its
    inputs, so --verify can regenerate the folder and compare it file by file."""
    doc = build_document(manifest, runs, summary, figures)
    files = {
        "runs.csv": runs_csv_text(runs).encode(),
        "summary.csv": summary.to_csv(index=False, lineterminator="\n").encode(),
        **{f"figures/{file}": png for file, png in figures.items()},
        "manifest.json": (json.dumps(manifest, indent=2) + "\n").encode(),
        "report.md": doc.markdown().encode(),
        "report.html": doc.html(f"Seed report: {manifest['name']}").encode(),
    }
    marker = {"format": MANIFEST_FORMAT, "written_by": "experiments.report", "files": sorted(files)}
    files[MARKER] = (json.dumps(marker, indent=2) + "\n").encode()
    return files


def _write_folder(out: Path, manifest: dict, runs: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, bytes]) -> None:
    """Write every file into a hidden temporary sibling folder, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, content in report_files(manifest, runs, summary, figures).items():
            _atomic_write(tmp / name, content)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- verification -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The outcome of `verify_report`: passed, whether the comparison was exact, one line, the first difference."""

    passed: bool
    exact: bool
    message: str
    difference: dict[str, Any] | None = None
    run_id: str | None = None


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a report folder, checked for the fields --verify needs.

    Raises:
        ValueError: not a folder, no or unreadable manifest.json, or missing fields.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a report folder; give the path that `make report` printed (reports/NAME)")
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}; is {folder} a report folder?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(manifest).__name__}")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {', '.join(missing)}; it was not written by experiments.report")
    if manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{path} has format {manifest['format']!r}; this version reads {MANIFEST_FORMAT!r}")
    return manifest


def configs_from_manifest(manifest: dict[str, Any]) -> list[ExperimentConfig]:
    """The exact config of every (family, seed) the manifest records, in run order.

    Raises:
        ValueError / TypeError: a config or seed list that does not check.
    """
    base = ExperimentConfig.from_dict(manifest["config"])
    families = manifest["families"]
    seeds = manifest["seeds"]
    if not isinstance(families, list) or not isinstance(seeds, list) or not seeds:
        raise ValueError("manifest families and seeds must be non-empty lists")
    _check_plan(families, len(seeds), 1)
    configs = []
    for family in families:
        for s in seeds:
            if not isinstance(s, dict) or "seed" not in s or "data_seed" not in s:
                raise ValueError(f"manifest seeds must be objects with seed and data_seed; got {s!r}")
            changes = {"family": family, "seed": s["seed"], "em": True}
            if base.dataset is None:
                changes["data_seed"] = s["data_seed"]
            configs.append(base.replace(**changes))
    return configs


def _normalized(df: pd.DataFrame) -> pd.DataFrame:
    """runs.csv columns with runs_frame's dtypes (so a read-back frame hashes like the written one)."""
    try:
        out = df[list(RUN_COLUMNS)].copy()
        out["family"] = out["family"].astype(str)
        out["method"] = out["method"].astype(str)
        for name in ("seed", "data_seed", *COUNT_COLUMNS):
            out[name] = out[name].astype("int64")
        for name in METRIC_COLUMNS:
            if name not in COUNT_COLUMNS:
                out[name] = out[name].astype("float64")
    except (ValueError, TypeError) as err:
        raise ValueError(f"runs.csv has a value of the wrong type: {' '.join(str(err).split())}") from None
    return out.reset_index(drop=True)


def _equal(expected: Any, got: Any, column: str, exact: bool) -> bool:
    if isinstance(expected, str) or isinstance(got, str):
        return expected == got
    a, b = float(expected), float(got)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if exact or column in COUNT_COLUMNS or column in ("seed", "data_seed") or math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= ATOL + RTOL * abs(a)


def first_difference(expected: pd.DataFrame, got: pd.DataFrame, exact: bool = True) -> tuple[dict[str, Any] | None, int]:
    """The first cell (in runs.csv order) where `got` differs from `expected`, timing columns aside, and the
    number of differing cells. Rows are matched on (family, seed, method)."""
    columns = [c for c in RUN_COLUMNS if c not in TIMING_COLUMNS and c not in ("family", "seed", "method")]
    key = ["family", "seed", "method"]
    got_rows = {tuple(r[k] for k in key): r for r in _records(got)}
    expected_rows = _records(expected)
    first, count = None, 0
    for row in expected_rows:
        k = tuple(row[c] for c in key)
        where = {"family": row["family"], "seed": row["seed"], "method": row["method"]}
        other = got_rows.pop(k, None)
        if other is None:
            count += 1
            first = first or {**where, "column": "(row)", "expected": "a row", "got": "no such run in the re-run"}
            continue
        for c in columns:
            if not _equal(row[c], other[c], c, exact):
                count += 1
                first = first or {**where, "column": c, "expected": row[c], "got": other[c]}
    for k, _ in got_rows.items():
        count += 1
        first = first or {
            "family": k[0],
            "seed": k[1],
            "method": k[2],
            "column": "(row)",
            "expected": "no row",
            "got": "a row",
        }
    return first, count


def describe_difference(d: dict[str, Any]) -> str:
    def show(v):
        return repr(float(v)) if isinstance(v, float | np.floating) else str(v)

    return (
        f"family {d['family']}, seed {d['seed']}, method {d['method']}, column {d['column']}: "
        f"expected {show(d['expected'])}, got {show(d['got'])}"
    )


_TIMING_FIELDS = ("manifest created_utc", "manifest elapsed_seconds", *(f"runs.csv {c}" for c in TIMING_COLUMNS))


def _first_text_difference(name: str, expected: bytes, got: bytes) -> str:
    if name.endswith(".png"):
        return f"{name} differs from the regenerated figure"
    old, new = expected.decode(errors="replace").splitlines(), got.decode(errors="replace").splitlines()
    for number, (a, b) in enumerate(zip(old, new, strict=False), start=1):
        if a != b:
            return f"{name} differs from the regenerated file at line {number}: expected {a[:80]!r}, got {b[:80]!r}"
    return f"{name} differs from the regenerated file: {len(new)} lines, expected {len(old)}"


def compare_files(
    folder: Path,
    manifest: dict[str, Any],
    runs: pd.DataFrame,
    outcomes: Sequence[SeedOutcome],
    configs: Sequence[ExperimentConfig],
    exact: bool,
) -> tuple[str | None, int]:
    """Regenerate every file of the report in `folder` and compare it with the file there.

    The text files are regenerated from the folder's manifest and runs.csv (whose numbers the caller has
    checked against the re-run), so timestamps and timings are the folder's own; the figures come from the
    re-run `outcomes` when `exact` (same platform and versions: byte for byte), else from the folder (other
    platforms draw other pixels). Returns (the first difference as one phrase naming the file, or None;
    the number of files compared).
    """
    figures = {p.name: p.read_bytes() for p in sorted((folder / "figures").glob("*.png"))}
    if exact:
        figures = all_figures(manifest["families"], outcomes, runs, configs)
    expected = report_files(manifest, runs, summarize(runs), figures)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    for name, content in expected.items():
        if name not in present:
            return f"{name} is missing", len(expected)
        if (folder / name).read_bytes() != content:
            return _first_text_difference(name, content, (folder / name).read_bytes()), len(expected)
    extra = sorted(present - set(expected))
    if extra:
        return f"{', '.join(extra[:3])} {'is' if len(extra) == 1 else 'are'} not part of the report", len(expected)
    return None, len(expected)


def verify_report(
    folder: str | Path, *, jobs: int = 1, tracking_uri: str | None = None, experiment: str = EXPERIMENT
) -> Verdict:
    """Re-run the report in `folder` from its manifest and compare every non-timing number of its runs.csv.

    Raises:
        ValueError / TypeError: the folder is not a readable report (before anything runs).
        SeedFailed: a fit failed in the re-run.
    """
    from .tracking import resolve_tracking_uri, tracked_run

    folder = Path(folder)
    manifest = load_manifest(folder)
    expected = _normalized(read_runs_csv(folder / "runs.csv"))
    configs = configs_from_manifest(manifest)
    _check_plan(manifest["families"], len(manifest["seeds"]), jobs)
    exact, why = same_environment(manifest, environment())
    name = str(manifest["name"])
    uri = resolve_tracking_uri(tracking_uri)
    tags = {"report.name": name, "report.kind": "verify", "report.folder": folder.as_posix()}
    with tracked_run(uri, experiment, run_name=f"verify {name}", tags=tags) as (client, run_id):
        tasks = [SeedTask(c, uri, experiment, run_id, name) for c in configs]
        # reports made before populations have no fit_mode: they fitted one seed at a time
        population = manifest.get("fit_mode", "one-by-one") == "population"
        outcomes = run_seeds(tasks, jobs, desc=f"verify {name}", population=population)
        got = runs_frame(outcomes)
        difference, count = first_difference(expected, got, exact)
        if difference is None:
            recorded = {
                (r["family"], r["seed"]): r.get("dataset_fingerprint") for r in manifest["runs"] if isinstance(r, dict)
            }
            for o in outcomes:
                if recorded.get((o.family, o.seed)) != o.fingerprint:
                    difference, count = (
                        {
                            "family": o.family,
                            "seed": o.seed,
                            "method": "data",
                            "column": "dataset_fingerprint",
                            "expected": recorded.get((o.family, o.seed)),
                            "got": o.fingerprint,
                        },
                        1,
                    )
                    break
        mode = "exactly (same platform and versions)" if exact else f"within rtol {RTOL}, atol {ATOL} ({why})"
        file_sha = runs_sha256(expected)
        if difference is not None:
            plural = "s" * (count != 1)
            message = f"FAIL: {folder}: {describe_difference(difference)} ({count} differing value{plural}; compared {mode})"
            if file_sha != manifest["runs_csv"].get("sha256"):
                message += "; note: runs.csv no longer matches the manifest's sha256 (edited after it was written?)"
            passed = False
        elif file_sha != manifest["runs_csv"].get("sha256"):
            message = f"FAIL: {folder}: the re-run matches runs.csv but runs.csv does not match the manifest's sha256"
            passed = False
        elif (file_problem := compare_files(folder, manifest, expected, outcomes, configs, exact)[0]) is not None:
            message = f"FAIL: {folder}: {file_problem} (the numbers of runs.csv were reproduced {mode})"
            passed = False
        else:
            cells = len(expected) * (len(RUN_COLUMNS) - len(TIMING_COLUMNS))
            figures = "the figures byte for byte" if exact else "the figures not (other platform or versions)"
            message = (
                f"PASS: {folder}: {len(expected)} runs, {cells} values reproduced {mode}; every file regenerated and "
                f"compared, {figures}; timestamps and timings taken from the folder ({', '.join(_TIMING_FIELDS)})"
            )
            passed = True
        client.set_tag(run_id, "report.verify", "PASS" if passed else "FAIL")
    return Verdict(passed, exact, message, difference, run_id)


# -- command line -----------------------------------------------------------------------------------------
_REPORT_FLAGS = ("seeds", "out", "force")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m experiments.report",
        description="Run one configuration over many seeds (gradient descent and EM) and write a reproducible "
        "report folder, or --verify one.",
        epilog="Config precedence: the report defaults (5000 steps, em on) < --config FILE < flags.",
    )
    add_arguments(parser)
    for action in parser._actions:
        if action.dest == "family":
            action.help = (
                f"covariance family of the model, or 'all' for every one of {', '.join(gmm.FAMILIES)} [default: full]"
            )
    parser.add_argument("--seeds", type=int, default=argparse.SUPPRESS, metavar="N", help="number of seeds [default: 10]")
    parser.add_argument(
        "--out",
        default=argparse.SUPPRESS,
        metavar="FOLDER",
        help="report folder [default: reports/<family>-<N>seeds-<time> in the project]",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        default=argparse.SUPPRESS,
        help="replace the earlier report in --out (never a folder holding other files)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="worker processes, one family each at a time [default: 1]"
    )
    parser.add_argument(
        "--one-by-one",
        action="store_true",
        help="fit the seeds one after the other instead of a family's seeds as one population (slower; the "
        "numbers of reports made before populations, up to float rounding)",
    )
    from .tracking import add_tracking_arguments

    add_tracking_arguments(parser, EXPERIMENT)
    parser.add_argument("--verify", metavar="FOLDER", default=None, help="re-run the report in FOLDER and compare")
    return parser


def _file_keys(path: str) -> list[str]:
    """The keys a config file sets (ExperimentConfig.from_file has already checked it)."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return list(data or {})


def report_config(ns: argparse.Namespace) -> tuple[ExperimentConfig, list[str]]:
    """The base config and the families of parsed flags: REPORT_DEFAULTS < --config file < flags."""
    given = {f.name: getattr(ns, f.name) for f in fields(ExperimentConfig) if hasattr(ns, f.name)}
    if given.get("em") is False:
        raise ValueError("a report always fits EM next to gradient descent; drop --no-em")
    family = given.pop("family", None)
    base = REPORT_DEFAULTS
    config_file = getattr(ns, "config", None)
    if config_file:
        from_file = ExperimentConfig.from_file(config_file)
        base = base.replace(**{k: getattr(from_file, k) for k in _file_keys(config_file)})
    if family is not None and family != "all":
        given["family"] = family
    config = base.replace(**given, em=True)
    families = list(gmm.FAMILIES) if family == "all" else [config.family]
    return config, families


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    from mlflow.exceptions import MlflowException

    if args.verify is not None:
        typed = [f.name for f in fields(ExperimentConfig) if hasattr(args, f.name)]
        typed += [name for name in (*_REPORT_FLAGS, "config") if hasattr(args, name)]
        if typed:
            parser.error(
                f"--verify re-runs the manifest's config and seeds; drop --{', --'.join(t.replace('_', '-') for t in typed)}"
            )
        try:
            _check_plan(["full"], 1, args.jobs)
            verdict = verify_report(args.verify, jobs=args.jobs, tracking_uri=args.tracking_uri, experiment=args.experiment)
        except (ValueError, TypeError, MlflowException) as err:
            parser.error(str(err))
        except SeedFailed as err:
            print(f"FAIL: {args.verify}: fit failed in the re-run: {err}")
            return 1
        except KeyboardInterrupt:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
        print(verdict.message)
        return 0 if verdict.passed else 1

    try:
        config, families = report_config(args)
        num_seeds = getattr(args, "seeds", 10)
        _check_plan(families, num_seeds, args.jobs)
        out = getattr(args, "out", None)
        if out is not None:
            check_out_dir(Path(out), getattr(args, "force", False))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    print(
        f"Report: {', '.join(families)} x {num_seeds} seeds ({config.iterations} Adam steps + EM each, "
        f"{config.data_file or config.dataset or 'generated data'}), {args.jobs} job{'s' * (args.jobs > 1)}; "
        f"tracking to {redact(uri)}",
        flush=True,
    )
    try:
        report = make_report(
            config,
            families,
            num_seeds,
            out,
            jobs=args.jobs,
            tracking_uri=uri,
            experiment=args.experiment,
            force=getattr(args, "force", False),
            population=not args.one_by_one,
        )
    except (ValueError, TypeError, MlflowException) as err:
        parser.error(str(err))
    except SeedFailed as err:
        print(f"{parser.prog}: fit failed: {err} (no report written)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (no report written)", file=sys.stderr)
        return 130
    for family in families:
        headers, rows = summary_table(report.summary, family)
        print(f"\n{family}:\n{markdown_table(headers, rows)}")
    folder = report.folder.as_posix()
    print(
        f"\nWrote {folder}/ in {report.elapsed:.1f} s: report.md, report.html, runs.csv, summary.csv, manifest.json, "
        f"figures/ (MLflow parent run {report.parent_run_id})"
    )
    print(f"Check it: {module('experiments.report', '--verify', folder)}   (or: make verify-report REPORT={folder})")
    return 0


if __name__ == "__main__":
    # run through the package module, so spawned workers and this process share one `experiments.report`
    from experiments.report import main as _main

    sys.exit(_main())
