"""report.md and report.html of a seed report, and every file of its folder as bytes (`report_files`)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .commands import module
from .document import Document
from .environment import environment_rows
from .files import MANIFEST_FORMAT, MARKER
from .runs_table import KEY_COLUMNS, METHODS, glossary, metric_columns, records, run_columns, runs_csv_text, timing_columns

# the figures of a family (experiments.report_figures): file stem, alt text
FIGURE_CAPTIONS = (
    ("nll_curves", "NLL curves of every seed"),
    ("final_nll", "final NLL per method"),
    ("fit", "fit of the median seed"),
)


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
    for metric in metric_columns():
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
) -> Document:
    """report.md / report.html: what was run, the summary per family, the figures, every run, the setup."""
    name, families = manifest["name"], manifest["families"]
    config = manifest["config"]
    doc = Document()
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
        doc.family_images(figures, family, FIGURE_CAPTIONS)
    doc.heading(2, "Every run (runs.csv)")
    doc.para(
        "Two tables, so that each fits a page; rows pair by family, seed and method. Numbers: 6 significant "
        "digits here (runs.csv keeps full precision); in the summaries, mean, std, min and max are rounded to "
        "the decimal of the std's second significant digit (its scientific form below 1e-6), or 6 significant "
        "digits when the std is 0."
    )
    rows_of_runs = records(runs)
    for columns in (run_columns()[:10], KEY_COLUMNS + run_columns()[10:]):
        doc.table(
            list(columns), [[_fmt(row[c], 3 if c in timing_columns() else 6) for c in columns] for row in rows_of_runs]
        )
    doc.heading(2, "Glossary")
    doc.table(["column", "meaning"], [[name, meaning] for name, meaning in glossary().items()])
    doc.heading(2, "Configuration")
    doc.code(json.dumps(config, indent=2))
    doc.heading(2, "Environment")
    env_rows = environment_rows(manifest) + [["runs.csv sha256 (timing columns excluded)", manifest["runs_csv"]["sha256"]]]
    env_rows += [[f"mlflow.{k}", str(v)] for k, v in manifest["mlflow"].items()]
    doc.table(["what", "value"], env_rows)
    packages = manifest.get("packages") or []
    if packages:
        doc.para(f"Installed packages ({len(packages)}, as `pip freeze` lists them; also in manifest.json):")
        doc.code("\n".join(packages))
    return doc


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
