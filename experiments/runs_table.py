"""The runs table of a seed report: its columns (keys, then the report's metrics of experiments.metrics),
runs.csv and summary.csv as pandas frames, their exact text and sha256, and reading them back.

The column tuples are functions of the metric registry, read at each call; RUN_COLUMNS and its siblings are
the same tuples taken at import, for code that imports them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import metrics

if TYPE_CHECKING:
    from .seeds import SeedOutcome

METHODS = {"gd": "gradient descent", "em": "EM"}
KEY_COLUMNS = ("family", "seed", "data_seed", "method")
_KEY_GLOSSARY = {
    "family": "covariance family of the fitted model (and of the generated data)",
    "seed": "seed of the fit: initialization and resets (config seed + i for seed i)",
    "data_seed": "seed of the generated data and of the train/validation split (fixed for a named dataset)",
    "method": "gd: gradient descent (Adam on the mean NLL); em: expectation-maximization from the same start",
}
_STAT_GLOSSARY = {
    "mean ± std [min, max]": "over the seeds: mean, sample standard deviation (n - 1), smallest and largest",
}


def metric_columns() -> tuple[str, ...]:
    """The metric columns of runs.csv, in registry order."""
    return tuple(m.column for m in metrics.report_metrics())


def run_columns() -> tuple[str, ...]:
    """Every column of runs.csv: KEY_COLUMNS, then metric_columns()."""
    return KEY_COLUMNS + metric_columns()


def count_columns() -> tuple[str, ...]:
    """Integer columns, compared exactly by --verify."""
    return tuple(m.column for m in metrics.report_metrics() if m.kind == "count")


def timing_columns() -> tuple[str, ...]:
    """Timing columns, left out of the sha256 and of --verify."""
    return tuple(m.column for m in metrics.report_metrics() if m.kind == "timing")


def glossary() -> dict[str, str]:
    """Every column of runs.csv and of the summary, as the report's glossary prints it."""
    described = {m.column: m.description for m in metrics.report_metrics()}
    return {**_KEY_GLOSSARY, **described, **_STAT_GLOSSARY}


METRIC_COLUMNS = metric_columns()
RUN_COLUMNS = run_columns()
COUNT_COLUMNS = count_columns()
TIMING_COLUMNS = timing_columns()
GLOSSARY = glossary()


def seed_rows(key: dict[str, Any], values: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A seed's two runs.csv rows (gd, em) from its metric values (experiments.metrics.measure) and its
    key columns (family, seed, data_seed)."""
    gd = {**key, "method": "gd"}
    em = {**key, "method": "em"}
    for m in metrics.report_metrics():
        gd[m.column] = values[m.name]
        em[m.column] = values[m.em_key] if m.em is not None else math.nan
    return gd, em


def runs_frame(outcomes: Sequence[SeedOutcome]) -> pd.DataFrame:
    """runs.csv as a DataFrame: run_columns(), one row per (family, seed, method), in run order."""
    df = pd.DataFrame([row for o in outcomes for row in o.rows], columns=list(run_columns()))
    for name in ("seed", "data_seed", *count_columns()):
        df[name] = df[name].astype("int64")
    for name in metric_columns():
        if name not in count_columns():
            df[name] = df[name].astype("float64")
    return df


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: count, mean, std (ddof 1), min, max of every metric per family and method (NaNs skipped;
    metrics with no value for a method, such as EM's gd_em_gap, are left out)."""
    records = []
    for (family, method), group in runs.groupby(["family", "method"], sort=False):
        for metric in metric_columns():
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
    return hashlib.sha256(runs_csv_text(runs.drop(columns=list(timing_columns()))).encode()).hexdigest()


# pandas < 3 parses floats with a fast, slightly inexact parser unless asked; pandas 3 round-trips by default
# (and deprecates the option)
ROUND_TRIP = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_runs_csv(path: Path) -> pd.DataFrame:
    """Read runs.csv back exactly (round-trip float parsing).

    Raises:
        ValueError: unreadable, or missing columns.
    """
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], **ROUND_TRIP)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    missing = [c for c in run_columns() if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; it is not a report's runs.csv")
    return df


def normalized(df: pd.DataFrame) -> pd.DataFrame:
    """runs.csv columns with runs_frame's dtypes (so a read-back frame hashes like the written one)."""
    try:
        out = df[list(run_columns())].copy()
        out["family"] = out["family"].astype(str)
        out["method"] = out["method"].astype(str)
        for name in ("seed", "data_seed", *count_columns()):
            out[name] = out[name].astype("int64")
        for name in metric_columns():
            if name not in count_columns():
                out[name] = out[name].astype("float64")
    except (ValueError, TypeError) as err:
        raise ValueError(f"runs.csv has a value of the wrong type: {' '.join(str(err).split())}") from None
    return out.reset_index(drop=True)


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{c: (v.item() if isinstance(v, np.generic) else v) for c, v in row.items()} for row in df.to_dict("records")]
