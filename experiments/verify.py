"""--verify of a seed report: re-run its manifest's config and seeds, compare every number of runs.csv
(exactly on the same platform and versions, else within RTOL/ATOL), then regenerate and compare every file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import ExperimentConfig
from .environment import commit_note, environment, same_environment
from .files import MANIFEST_FORMAT, read_manifest
from .report_doc import report_files
from .report_figures import all_figures
from .runs_table import (
    count_columns,
    normalized,
    read_runs_csv,
    records,
    run_columns,
    runs_frame,
    runs_sha256,
    summarize,
    timing_columns,
)
from .seeds import EXPERIMENT, SeedOutcome, SeedTask, check_plan, default_jobs, run_seeds, seed_groups

RTOL, ATOL = 1e-3, 1e-4  # --verify across platforms or versions: |got - expected| <= ATOL + RTOL * |expected|
_MANIFEST_KEYS = ("format", "name", "families", "config", "seeds", "runs", "versions", "platform", "runs_csv")


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
    not_a_folder = f"{folder} is not a report folder; give the path that `make report` printed (reports/NAME)"
    manifest = read_manifest(folder, not_a_folder, f"; is {folder} a report folder?")
    path = folder / "manifest.json"
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
    check_plan(families, len(seeds), 1)
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


def _equal(expected: Any, got: Any, column: str, exact: bool) -> bool:
    if isinstance(expected, str) or isinstance(got, str):
        return expected == got
    a, b = float(expected), float(got)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if exact or column in count_columns() or column in ("seed", "data_seed") or math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= ATOL + RTOL * abs(a)


def first_difference(expected: pd.DataFrame, got: pd.DataFrame, exact: bool = True) -> tuple[dict[str, Any] | None, int]:
    """The first cell (in runs.csv order) where `got` differs from `expected`, timing columns aside, and the
    number of differing cells. Rows are matched on (family, seed, method)."""
    columns = [c for c in run_columns() if c not in timing_columns() and c not in ("family", "seed", "method")]
    key = ["family", "seed", "method"]
    got_rows = {tuple(r[k] for k in key): r for r in records(got)}
    expected_rows = records(expected)
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


_TIMING_FIELDS = ("manifest created_utc", "manifest elapsed_seconds", *(f"runs.csv {c}" for c in timing_columns()))


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
    folder: str | Path, *, jobs: int | None = None, tracking_uri: str | None = None, experiment: str = EXPERIMENT
) -> Verdict:
    """Re-run the report in `folder` from its manifest and compare every non-timing number of its runs.csv
    (in `jobs` worker processes; default experiments.seeds.default_jobs).

    Raises:
        ValueError / TypeError: the folder is not a readable report (before anything runs).
        SeedFailed: a fit failed in the re-run.
    """
    from .tracking import resolve_tracking_uri, tracked_run

    folder = Path(folder)
    manifest = load_manifest(folder)
    expected = normalized(read_runs_csv(folder / "runs.csv"))
    configs = configs_from_manifest(manifest)
    check_plan(manifest["families"], len(manifest["seeds"]), jobs)
    exact, why = same_environment(manifest, environment())
    name = str(manifest["name"])
    uri = resolve_tracking_uri(tracking_uri)
    tags = {"report.name": name, "report.kind": "verify", "report.folder": folder.as_posix()}
    with tracked_run(uri, experiment, run_name=f"verify {name}", tags=tags) as (client, run_id):
        tasks = [SeedTask(c, uri, experiment, run_id, name) for c in configs]
        # reports made before populations have no fit_mode: they fitted one seed at a time
        population = manifest.get("fit_mode", "one-by-one") == "population"
        if jobs is None:
            jobs = default_jobs(seed_groups(len(manifest["families"]), len(manifest["seeds"]), population))
        outcomes = run_seeds(tasks, jobs, desc=f"verify {name}", population=population)
        difference, count = first_difference(expected, runs_frame(outcomes), exact)
        if difference is None:
            difference, count = _fingerprint_difference(manifest, outcomes)
        mode = "exactly (same platform and versions)" if exact else f"within rtol {RTOL}, atol {ATOL} ({why})"
        passed, message = _judge(folder, manifest, expected, difference, count, mode)
        if passed and (problem := compare_files(folder, manifest, expected, outcomes, configs, exact)[0]) is not None:
            passed, message = False, f"FAIL: {folder}: {problem} (the numbers of runs.csv were reproduced {mode})"
        elif passed:
            cells = len(expected) * (len(run_columns()) - len(timing_columns()))
            figures = "the figures byte for byte" if exact else "the figures not (other platform or versions)"
            message = (
                f"PASS: {folder}: {len(expected)} runs, {cells} values reproduced {mode}; every file regenerated and "
                f"compared, {figures}; timestamps and timings taken from the folder ({', '.join(_TIMING_FIELDS)})"
            )
        if not passed:
            message += commit_note(manifest)
        client.set_tag(run_id, "report.verify", "PASS" if passed else "FAIL")
    return Verdict(passed, exact, message, difference, run_id)


def _fingerprint_difference(manifest: dict[str, Any], outcomes: Sequence[SeedOutcome]) -> tuple[dict[str, Any] | None, int]:
    """The first seed whose re-run data has another fingerprint than the manifest records (and 1), or (None, 0)."""
    recorded = {(r["family"], r["seed"]): r.get("dataset_fingerprint") for r in manifest["runs"] if isinstance(r, dict)}
    for o in outcomes:
        expected = recorded.get((o.family, o.seed))
        if expected != o.fingerprint:
            where = {"family": o.family, "seed": o.seed, "method": "data", "column": "dataset_fingerprint"}
            return {**where, "expected": expected, "got": o.fingerprint}, 1
    return None, 0


def _judge(folder: Path, manifest, expected: pd.DataFrame, difference, count: int, mode: str) -> tuple[bool, str]:
    """(False, the FAIL line) for a differing number or a runs.csv that no longer matches its sha256, else
    (True, "") (the files are compared next)."""
    file_sha = runs_sha256(expected)
    if difference is not None:
        plural = "s" * (count != 1)
        message = f"FAIL: {folder}: {describe_difference(difference)} ({count} differing value{plural}; compared {mode})"
        if file_sha != manifest["runs_csv"].get("sha256"):
            message += "; note: runs.csv no longer matches the manifest's sha256 (edited after it was written?)"
        return False, message
    if file_sha != manifest["runs_csv"].get("sha256"):
        return False, f"FAIL: {folder}: the re-run matches runs.csv but runs.csv does not match the manifest's sha256"
    return True, ""
