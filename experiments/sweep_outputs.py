"""The files of a clamp sweep: sweep.csv as a frame, summary.csv, the figures, report.md/html and the
comparison `--verify` makes (the folder, manifest and MLflow logging are experiments.sweep's).

summary.csv has one row per cell (family, dataset, clamp, batch, reset) with, over its seeds: `fits`,
median and quartiles (q25, q75) of train_nll, val_nll, clamps, resets and recovery_steps, `collapse_rate`
(share of fits collapsed), `clamped` (fits with at least one clamp event) and `recovery_rate` (share of
the clamped fits that recovered; NaN when none clamped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .document import Document
from .environment import environment_rows
from .report_figures import png_bytes
from .runs_table import ROUND_TRIP
from .sweep_plan import COUNT_COLUMNS, KEY_COLUMNS, METRIC_COLUMNS, NO_CLAMP, ROW_COLUMNS

CELL_COLUMNS = ("family", "dataset", "clamp", "batch", "reset")
QUARTILE_METRICS = ("train_nll", "val_nll", "clamps", "resets", "recovery_steps")
RECOVERY_TARGET = 0.8  # the report names the smallest clamp at which mini-batch fits recover this often
RTOL, ATOL = 1e-3, 1e-4  # --verify across platforms or versions (as the seed report's)
# the figures of a family: file stem, alt text
FIGURE_CAPTIONS = (
    ("val_nll", "validation NLL vs clamp"),
    ("collapse", "collapse rate vs clamp"),
    ("recovery", "recovery rate and median recovery steps vs clamp"),
)
SETTINGS = (("full", 1), ("full", 0), ("mini", 1), ("mini", 0))  # (batch, reset): the lines of each figure


def _setting(rows: pd.DataFrame, batch: str, reset: int) -> pd.DataFrame:
    """The rows of one batch mode ("full": batch column 0, "mini": the mini-batch's rows) and reset setting."""
    return rows[((rows["batch"] == 0) == (batch == "full")) & (rows["reset"] == reset)]


def sweep_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """sweep.csv as a DataFrame with fixed dtypes, in plan order."""
    df = pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
    return normalized(df)


def normalized(df: pd.DataFrame) -> pd.DataFrame:
    """ROW_COLUMNS with sweep_frame's dtypes (so a read-back frame compares like the written one).

    Raises:
        ValueError: a missing column or a value of the wrong type.
    """
    missing = [c for c in ROW_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"sweep.csv lacks the column(s) {', '.join(missing)}; it is not a clamp sweep's")
    try:
        out = df[list(ROW_COLUMNS)].copy()
        for name in ("family", "dataset"):
            out[name] = out[name].astype(str)
        for name in ("seed", "batch", "reset", *COUNT_COLUMNS):
            out[name] = out[name].astype("int64")
        for name in ("clamp", *(m for m in METRIC_COLUMNS if m not in COUNT_COLUMNS)):
            out[name] = out[name].astype("float64")
    except (ValueError, TypeError) as err:
        raise ValueError(f"sweep.csv has a value of the wrong type: {' '.join(str(err).split())}") from None
    return out.reset_index(drop=True)


def read_csv(path) -> pd.DataFrame:
    """A CSV written by this module, read back exactly (round-trip float parsing).

    Raises:
        ValueError: unreadable.
    """
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], **ROUND_TRIP)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {' '.join(str(err).split())}") from None


def csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n")


def summarize(sweep: pd.DataFrame) -> pd.DataFrame:
    """summary.csv (module docstring), one row per cell in sweep order."""
    records = []
    for key, group in sweep.groupby(list(CELL_COLUMNS), sort=False):
        record: dict[str, Any] = dict(zip(CELL_COLUMNS, key, strict=True))
        record["fits"] = len(group)
        for metric in QUARTILE_METRICS:
            values = group[metric].astype("float64").dropna()
            q = values.quantile([0.25, 0.5, 0.75]).tolist() if len(values) else [math.nan] * 3
            record.update({f"{metric}_q25": q[0], f"{metric}_median": q[1], f"{metric}_q75": q[2]})
        record["collapse_rate"] = float(group["collapsed"].mean())
        clamped = group["recovered"].dropna()
        record["clamped"] = len(clamped)
        record["recovery_rate"] = float(clamped.mean()) if len(clamped) else math.nan
        records.append(record)
    return pd.DataFrame(records)


# -- figures ----------------------------------------------------------------------------------------------
def _x(clamps: Sequence[float], grid: Sequence[float]) -> np.ndarray:
    """Plot positions: the clamp, with NO_CLAMP drawn one grid step left of the lowest real clamp."""
    real = sorted(c for c in grid if c != NO_CLAMP)
    step = real[1] / real[0] if len(real) > 1 else 10.0
    return np.array([real[0] / step if c == NO_CLAMP else c for c in clamps])


def _axes_setup(ax, grid: Sequence[float], title: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ticks = _x(grid, grid)
    labels = ["none" if c == NO_CLAMP else f"{c:.0e}" for c in grid]
    keep = slice(None, None, max(1, math.ceil(len(grid) / 5)))  # at most 5 labels: they stay legible
    ax.set_xticks(ticks[keep], labels[keep])
    ax.set_xlim(ticks.min() / 2, ticks.max() * 2)  # explicit: a panel without any line has no data limits
    ax.set_xlabel("clamp (variance floor)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)


def family_figures(family: str, summary: pd.DataFrame) -> dict[str, bytes]:
    """val_nll_<family>.png, collapse_<family>.png, recovery_<family>.png: one panel per dataset (recovery:
    two rows, rate and median steps), one line per batch x reset setting."""
    from gmm.plot import make_figure

    rows = summary[summary["family"] == family]
    datasets = list(dict.fromkeys(rows["dataset"]))
    grid = sorted(set(rows["clamp"]))
    width = 4.2 * len(datasets)
    figures = {}
    panels = {
        "val_nll": ("validation NLL (median, quartile band)", "val_nll_median", ("val_nll_q25", "val_nll_q75")),
        "collapse": ("share of fits collapsed", "collapse_rate", None),
        "recovery": ("share of clamped fits that recovered", "recovery_rate", None),
        "recovery_steps": ("median steps to recover", "recovery_steps_median", ("recovery_steps_q25", "recovery_steps_q75")),
    }
    for name, keys in (("val_nll", ("val_nll",)), ("collapse", ("collapse",)), ("recovery", ("recovery", "recovery_steps"))):
        fig, axes = make_figure(len(datasets) * len(keys), figsize=(width * len(keys), 3.8))
        for j, key in enumerate(keys):
            ylabel, column, band = panels[key]
            for i, dataset in enumerate(datasets):
                ax = axes[j * len(datasets) + i]
                mine = rows[rows["dataset"] == dataset]
                for k, (batch, reset) in enumerate(SETTINGS):  # one color per setting in every panel
                    line = _setting(mine, batch, reset).sort_values("clamp")
                    if line[column].isna().all():  # e.g. recovery steps where no fit recovered
                        continue
                    x = _x(line["clamp"].tolist(), grid)
                    label = f"{batch} batch, reset {'on' if reset else 'off'}"
                    ax.plot(x, line[column], "o-", markersize=3, label=label, color=f"C{k}")
                    if band is not None:
                        ax.fill_between(x, line[band[0]], line[band[1]], alpha=0.15, color=f"C{k}")
                _axes_setup(ax, grid, f"{family}: {dataset}", ylabel)
                if column.endswith("rate"):
                    ax.set_ylim(-0.05, 1.05)
        labelled = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), None)
        if labelled is not None:
            labelled.legend(fontsize=7)
        figures[f"{name}_{family}.png"] = png_bytes(fig)
    return figures


# -- report -----------------------------------------------------------------------------------------------
def smallest_recovering_clamp(summary: pd.DataFrame, family: str, dataset: str, reset: int) -> tuple[float | None, float]:
    """The smallest clamp at which mini-batch fits of (family, dataset, reset) recover in >= RECOVERY_TARGET of
    the seeds that clamped (None when no clamp does), and the full-batch recovery rate at that clamp."""
    rows = summary[(summary["family"] == family) & (summary["dataset"] == dataset)]
    mini = _setting(rows, "mini", reset)
    mini = mini[mini["recovery_rate"] >= RECOVERY_TARGET].sort_values("clamp")
    if mini.empty:
        return None, math.nan
    clamp = float(mini["clamp"].iloc[0])
    full = _setting(rows, "full", reset)
    full = full[full["clamp"] == clamp]["recovery_rate"]
    return clamp, float(full.iloc[0]) if len(full) else math.nan


def _clamp_text(clamp: float) -> str:
    return "no clamp" if clamp == NO_CLAMP else f"{clamp:.3g}"


def _rate(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def family_paragraph(summary: pd.DataFrame, family: str, roles: dict[str, str]) -> str:
    """The generated finding of one family: per collapse dataset and reset setting, the smallest clamp at
    which mini-batch fits recover in >= 80% of the seeds that clamped, and whether full-batch fits do too."""
    parts = []
    for dataset in dict.fromkeys(summary.loc[summary["family"] == family, "dataset"]):
        if roles.get(dataset) != "collapse":
            continue
        for reset in (1, 0):
            clamp, full_rate = smallest_recovering_clamp(summary, family, dataset, reset)
            setting = f"`{dataset}` with resets {'on' if reset else 'off'}"
            if clamp is None:
                target = f"{RECOVERY_TARGET:.0%}"
                parts.append(
                    f"{setting}: at none of the swept clamps do mini-batch fits recover in >= {target} of clamped seeds."
                )
                continue
            if math.isnan(full_rate):
                verdict = "never reach the floor at that clamp, so none recovers"
            else:
                verdict = f"{'so do' if full_rate >= RECOVERY_TARGET else 'do not'} at that clamp ({_rate(full_rate)})"
            parts.append(
                f"{setting}: mini-batch fits recover in >= {RECOVERY_TARGET:.0%} of clamped seeds from clamp "
                f"{_clamp_text(clamp)}; full-batch fits {verdict}."
            )
    return f"**{family}.** " + " ".join(parts) if parts else f"**{family}.** No collapse dataset was swept."


def cell_table(summary: pd.DataFrame, family: str, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Rows: clamp; per batch x reset setting one column 'median val NLL / collapse rate / recovery rate'."""
    rows = summary[(summary["family"] == family) & (summary["dataset"] == dataset)]
    headers = ["clamp", *(f"{b} batch, reset {'on' if r else 'off'}: val NLL · collapsed · recovered" for b, r in SETTINGS)]
    table = []
    for clamp in sorted(set(rows["clamp"])):
        cells = [_clamp_text(clamp)]
        for batch, reset in SETTINGS:
            match = _setting(rows[rows["clamp"] == clamp], batch, reset)
            if match.empty:
                cells.append("-")
                continue
            r = match.iloc[0]
            cells.append(f"{r['val_nll_median']:.4g} · {_rate(r['collapse_rate'])} · {_rate(r['recovery_rate'])}")
        table.append(cells)
    return headers, table


def build_document(manifest: dict[str, Any], summary: pd.DataFrame, figures: dict[str, bytes]) -> Document:
    """report.md / report.html: what was run, per family the finding, tables and figures, the setup."""
    doc = Document()
    doc.heading(1, f"Clamp sweep: {manifest['name']}")
    s = manifest["settings"]
    git = manifest["git"]
    doc.para(
        f"Families {', '.join(manifest['families'])}; {len(manifest['seeds'])} fit seeds per cell; "
        f"{s['iterations']} Adam steps (component_lr {s['component_lr']}, mixture_lr {s['mixture_lr']}, "
        f"{s['lr_schedule']} schedule); full batch and mini-batches of {s['batch_size']} rows; resets on and off. "
        f"{manifest['cells']} cells, {manifest['fits']} fits in {manifest['elapsed_seconds']:.1f} s with "
        f"{manifest['jobs']} job(s), by `{manifest['command']}` at git commit `{git['commit']}`"
        f"{' (dirty working tree)' if git['dirty'] else ''}."
    )
    doc.para(manifest["definitions"])
    doc.para(f"Check every number: `python -m experiments.sweep --verify {manifest['folder']}`.")
    roles = {d["name"]: d["role"] for d in manifest["datasets"]}
    for family in manifest["families"]:
        doc.heading(2, f"Family {family}")
        doc.para(family_paragraph(summary, family, roles))
        for d in manifest["datasets"]:
            if d["family"] != family:
                continue
            doc.heading(3, f"{d['name']} ({d['role']}: {d['cause']}, {d['components']} components)")
            headers, rows = cell_table(summary, family, d["name"])
            doc.table(headers, rows)
        doc.family_images(figures, family, FIGURE_CAPTIONS)
    doc.heading(2, "Environment")
    env = environment_rows(manifest) + [["sweep.csv sha256", manifest["sweep_csv_sha256"]]]
    doc.table(["what", "value"], env)
    return doc


# -- verification -----------------------------------------------------------------------------------------
def _equal(expected: Any, got: Any, column: str, exact: bool) -> bool:
    if isinstance(expected, str) or isinstance(got, str):
        return str(expected) == str(got)
    a, b = float(expected), float(got)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if exact or column in COUNT_COLUMNS or column in KEY_COLUMNS or math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= ATOL + RTOL * abs(a)


def first_difference(expected: pd.DataFrame, got: pd.DataFrame, keys: Sequence[str], exact: bool) -> tuple[str | None, int]:
    """The first differing value (row keys, column, expected, got) in `expected`'s order, and the count."""
    first, count = None, 0
    if len(expected) != len(got):
        return f"{len(expected)} rows expected, {len(got)} in the re-run", abs(len(expected) - len(got))
    columns = [c for c in expected.columns if c in got.columns]
    missing = [c for c in expected.columns if c not in got.columns]
    if missing:
        return f"column(s) {', '.join(missing)} missing from the re-run", len(missing)
    for i, (row, other) in enumerate(zip(expected.to_dict("records"), got.to_dict("records"), strict=True)):
        for c in columns:
            if not _equal(row[c], other[c], c, exact):
                count += 1
                if first is None:
                    where = ", ".join(f"{k} {row[k]}" for k in keys)
                    first = f"row {i + 2} ({where}), column {c}: expected {row[c]!r}, got {other[c]!r}"
    return first, count
