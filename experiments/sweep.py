"""The clamp sweep: does a large enough clamp let a collapsed fit recover, with and without mini-batch noise?

    python -m experiments.sweep --family full [--seeds 5] [--datasets full-collapse,...] [--jobs 2]
    python -m experiments.sweep --family all --out sweeps/all
    python -m experiments.sweep --verify sweeps/full-5seeds-<time>
    make clamp-sweep FAMILY=full [SEEDS=5] [DATASETS=...] [JOBS=N]      then      make verify-clamp-sweep

Per family it fits every cell of dataset x clamp x {full batch, mini-batch} x {reset on, off} over the fit
seeds 0..SEEDS-1 (experiments.sweep_plan: the datasets, the clamp grid and "no clamp", what collapsed and
recovered mean) and writes a folder (built in a hidden sibling and renamed into place, as the seed report's):

| file              | what                                                                                  |
|-------------------|---------------------------------------------------------------------------------------|
| sweep.csv         | one row per fit: family, dataset, clamp, seed, batch (rows; 0 = full), reset, train_nll, |
|                   | val_nll, clamps, resets, collapsed, recovered, recovery_steps                         |
| summary.csv       | per cell: medians and quartiles over seeds, collapse and recovery rates (sweep_outputs) |
| figures/*.png     | per family: validation NLL, collapse rate, recovery rate and steps vs clamp            |
| report.md/.html   | the finding per family (smallest clamp at which mini-batch fits recover in >= 80% of   |
|                   | clamped seeds, and whether full-batch fits do too), a table per dataset, the figures   |
| manifest.json     | plan (families, datasets with fingerprints, grid, seeds, settings), versions, platform, |
|                   | git, sha256 of sweep.csv                                                              |

MLflow (experiment "clamp-sweep"): one parent run per sweep holding the folder as artifacts (the figures
among them) and, to keep tracking cheap, one nested run per (family, dataset, batch, reset) rather than per
fit: its medians and rates logged against the clamp's index in the grid.

`--verify FOLDER` re-runs the manifest's plan and compares every number of sweep.csv and summary.csv:
exactly on the same platform, CPU capability and Python/torch/numpy versions, else within
ATOL + RTOL * |x| (counts exactly); it prints PASS or FAIL with the file, row and column of the first
difference. `--jobs N` runs cells in N spawned processes, one torch thread each, as a serial run does: the
same sweep.csv. Exit status: 0 done / PASS, 1 FAIL, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import gmm
from gmm.cli import OneLineParser
from gmm.recovery import RECOVERY_FLOOR_FACTOR, RECOVERY_MARGIN

from . import sweep_outputs as outputs
from .environment import commit_note, environment, same_environment
from .files import WrittenFolder, check_out_dir, print_written, read_manifest, write_folder
from .seeds import default_jobs, one_thread
from .sweep_plan import (
    DEGENERATE_RATIO,
    NO_CLAMP,
    Cell,
    SweepData,
    SweepSettings,
    group_cells,
    plan_cells,
    run_group,
)

log = logging.getLogger(__name__)

EXPERIMENT = "clamp-sweep"
MANIFEST_FORMAT = "gmm-clamp-sweep/1"
DEFAULT_SEEDS = 5
DEFINITIONS = (
    f"Definitions. No clamp = the smallest positive normal float32 ({NO_CLAMP:.3g}). A fit *collapsed* when at "
    f"its end a component's smallest variance is on the floor (<= {RECOVERY_FLOOR_FACTOR:g} x clamp) or "
    f"below {DEGENERATE_RATIO:g} x the data's smallest per-axis variance, or its NLL went non-finite. A clamped "
    f"component has *recovered* once its smallest variance exceeds {RECOVERY_FLOOR_FACTOR:g} x clamp and "
    f"the exact NLL is back within {RECOVERY_MARGIN:g} nats per sample of its value before its first "
    "clamp (mini-batch fits: the full-data NLL at log points); recovered and recovery steps refer to the "
    "component of a fit's first clamp, and the recovery rate counts only fits that clamped."
)


def families_of(family: str) -> list[str]:
    """`family`, or for "all" every family that has something to clamp."""
    if family == "all":
        return [f for f in gmm.FAMILIES if gmm.families.get_family(f, 2).trainable]
    gmm.families.get_family(family, 2)  # ValueError with the closest name
    if not gmm.families.get_family(family, 2).trainable:
        raise ValueError(f"family {family!r} trains no covariance, so it has no clamp to sweep; pick another family")
    return [family]


def _init_worker() -> None:
    """A worker process: one torch thread (the serial run's numbers), and SIGINT ignored: Ctrl-C reaches every
    process of the terminal's group, and only the parent handles it (a worker's KeyboardInterrupt would come
    back as the result of whichever cell it was running, or kill an idle worker and break the pool).

    Both settings are process-wide on purpose: this runs only as the initializer of a spawned pool's worker
    processes, which end with the pool; the serial path runs in the caller's process under `one_thread`, which
    restores the caller's thread count."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def run_cells(cells: Sequence[Cell], jobs: int = 1, desc: str = "clamp sweep") -> list[list[dict]]:
    """Every cell's rows, in cell order, serially or in `jobs` spawned processes (one torch thread each).

    A bar counts cells done / total with the time left (on a terminal; elsewhere a line every 10%)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(total=len(cells), desc=desc, unit="cell", dynamic_ncols=True, disable=not tty)
    results: list[list[dict] | None] = [None] * len(cells)
    t0, shown = time.perf_counter(), 0

    def done(i: int, rows: list[dict]) -> None:
        nonlocal shown
        results[i] = rows
        bar.update()
        count = sum(r is not None for r in results)
        if not tty and (count * 10 // len(cells) > shown or count == len(cells)):
            shown = count * 10 // len(cells)
            elapsed = time.perf_counter() - t0
            left = elapsed / count * (len(cells) - count)
            print(f"{desc}: {count}/{len(cells)} cells, {elapsed:.0f} s, ~{left:.0f} s left", file=sys.stderr, flush=True)

    groups = group_cells(cells)  # full-batch cells of one dataset and reset setting: one population

    def done_group(g: list[int], rows: list[list[dict]]) -> None:
        for i, cell_rows in zip(g, rows, strict=True):
            done(i, cell_rows)

    try:
        if jobs <= 1 or len(groups) <= 1:
            with one_thread():
                for g in groups:
                    done_group(g, run_group([cells[i] for i in g]))
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(groups)), mp_context=ctx, initializer=_init_worker)
            try:
                futures = {pool.submit(run_group, [cells[i] for i in g]): n for n, g in enumerate(groups)}
                for future in as_completed(futures):
                    done_group(groups[futures[future]], future.result())
            finally:  # on Ctrl-C: pending cells cancelled, running ones finish (they ignore SIGINT)
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class Sweep(WrittenFolder):
    """A written sweep: its folder, frames, manifest and parent MLflow run."""

    sweep: pd.DataFrame = field(repr=False)


def sweep_sha256(sweep: pd.DataFrame) -> str:
    return hashlib.sha256(outputs.csv_text(sweep).encode()).hexdigest()


def _made(out: Path, created: datetime, command: str) -> dict[str, Any]:
    """The manifest's first entries: its format, the folder, when and by which command it was made."""
    created_utc = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "format": MANIFEST_FORMAT,
        "name": out.name,
        "folder": out.as_posix(),
        "created_utc": created_utc,
        "command": command,
    }


def _plan_record(families, seeds, settings, datasets, num_clamps, cells) -> dict[str, Any]:
    used = {(c.family, c.data.name): c.data for c in cells}
    return {
        "families": families,
        "seeds": list(seeds),
        "settings": settings.as_dict(),
        "datasets_requested": datasets,
        "num_clamps": num_clamps,
        "clamps": {f: sorted({c.clamp for c in cells if c.family == f}) for f in families},
        "datasets": [
            {
                "family": f,
                "name": d.name,
                "role": d.role,
                "cause": d.cause,
                "components": d.components,
                "spec": d.spec.as_dict(),
                "fingerprint": d.fingerprint(),
            }
            for (f, _), d in used.items()
        ],
        "cells": len(cells),
    }


def make_sweep(
    families: Sequence[str],
    num_seeds: int = DEFAULT_SEEDS,
    out: str | Path | None = None,
    *,
    datasets: list[str] | None = None,
    settings: SweepSettings | None = None,
    num_clamps: int = 10,
    jobs: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    command: str | None = None,
) -> Sweep:
    """Run the sweep and write its folder `out` (default sweeps/<family>-<n>seeds-<UTC time>) with `jobs`
    worker processes (default experiments.seeds.default_jobs: one per core).

    Raises:
        ValueError: a bad plan (before anything runs).
    """
    from .tracking import get_client, log_params, resolve_tracking_uri, tracked_run

    settings = settings or SweepSettings()
    if num_seeds < 1 or (jobs is not None and jobs < 1):
        raise ValueError(f"seeds and jobs must be at least 1; got seeds={num_seeds}, jobs={jobs}")
    seeds = tuple(range(num_seeds))
    cells = plan_cells(list(families), seeds, settings, datasets, num_clamps)
    jobs = jobs if jobs is not None else default_jobs(len(cells))
    families = [f for f in families if any(c.family == f for c in cells)]  # DATASETS may leave a family out
    created = datetime.now(UTC)
    out = _out_folder(out, families, num_seeds, created)
    uri = resolve_tracking_uri(tracking_uri)
    command = command or shlex.join(list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]))
    head = {**_made(out, created, command), **_plan_record(families, seeds, settings, datasets, num_clamps, cells)}
    t0 = time.perf_counter()
    tags = {"sweep.name": out.name, "sweep.kind": "sweep", "sweep.families": ",".join(families)}
    get_client(uri)  # a bad store fails now (one line), not after minutes of fits
    # the fits run before the parent run opens: no run is RUNNING while worker processes work, so an
    # interrupted sweep leaves nothing behind in MLflow, and a finished one only FINISHED runs
    results = run_cells(cells, jobs, desc=f"sweep {out.name}")
    with tracked_run(uri, experiment, run_name=f"clamp sweep {out.name}", tags=tags) as (client, parent_id):
        params = {"families": ",".join(families), "seeds": num_seeds, "jobs": jobs, "num_clamps": num_clamps}
        log_params(client, parent_id, {**params, **settings.as_dict()})
        sweep = outputs.sweep_frame([row for rows in results for row in rows])
        summary = outputs.summarize(sweep)
        figures = {file: png for family in families for file, png in outputs.family_figures(family, summary).items()}
        elapsed = time.perf_counter() - t0
        manifest = {
            **head,
            "fits": len(sweep),
            "definitions": DEFINITIONS,
            **environment(),
            "sweep_csv_sha256": sweep_sha256(sweep),
            "tolerance": {"rtol": outputs.RTOL, "atol": outputs.ATOL},
            "mlflow": {"tracking_uri": uri, "experiment": experiment, "parent_run_id": parent_id},
            "jobs": jobs,
            "elapsed_seconds": round(elapsed, 3),
        }
        _write_folder(out, manifest, sweep, summary, figures)
        client.log_artifacts(parent_id, str(out), "sweep")
        _log_children(client, uri, experiment, parent_id, summary, out.name)
    return Sweep(folder=out, manifest=manifest, summary=summary, parent_run_id=parent_id, elapsed=elapsed, sweep=sweep)


def _out_folder(out: str | Path | None, families: list[str], num_seeds: int, created: datetime) -> Path:
    """`out`, or sweeps/<family or all>-<n>seeds-<UTC time>; checked to be new or an empty folder."""
    label = "all" if len(families) > 1 else families[0]
    folder = Path(out) if out is not None else Path("sweeps") / f"{label}-{num_seeds}seeds-{created:%Y%m%d-%H%M%S}"
    check_out_dir(folder)
    return folder


def _log_children(client, uri: str, experiment: str, parent_id: str, summary: pd.DataFrame, name: str) -> None:
    """One nested run per (family, dataset, batch, reset): its per-clamp medians and rates, step = clamp index."""
    from mlflow.entities import Metric

    from .tracking import log_metrics_batched, log_params, tracked_run

    metrics = (
        "val_nll_median",
        "train_nll_median",
        "collapse_rate",
        "recovery_rate",
        "recovery_steps_median",
        "clamps_median",
    )
    for key, group in summary.groupby(["family", "dataset", "batch", "reset"], sort=False):
        family, dataset, batch, reset = key
        mode = "full batch" if batch == 0 else f"mini-batch {batch}"
        run_name = f"{dataset} {mode}, reset {'on' if reset else 'off'}"
        with tracked_run(uri, experiment, run_name=run_name, parent_run_id=parent_id, tags={"sweep.name": name}) as (
            c,
            run_id,
        ):
            group = group.sort_values("clamp")
            log_params(
                c,
                run_id,
                {
                    "family": family,
                    "dataset": dataset,
                    "batch": batch,
                    "reset": bool(reset),
                    "clamps": ",".join(f"{v:.3g}" for v in group["clamp"]),
                },
            )
            now = int(time.time() * 1000)
            entities = [
                Metric(m, float(v), now, i)
                for i, (_, row) in enumerate(group.iterrows())
                for m in metrics
                if pd.notna(v := row[m])
            ]
            log_metrics_batched(c, run_id, entities)


def _write_folder(out: Path, manifest: dict, sweep: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, bytes]) -> None:
    """Every file into a hidden temporary sibling, then renamed to `out` (an earlier sweep there is replaced)."""
    doc = outputs.build_document(manifest, summary, figures)
    files = {
        "sweep.csv": outputs.csv_text(sweep),
        "summary.csv": outputs.csv_text(summary),
        **{f"figures/{file}": png for file, png in figures.items()},
        "manifest.json": json.dumps(manifest, indent=2) + "\n",
        "report.md": doc.markdown(),
        "report.html": doc.html(f"Clamp sweep: {manifest['name']}"),
    }
    write_folder(out, files)


# -- verification -----------------------------------------------------------------------------------------
def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a sweep folder.

    Raises:
        ValueError: not a sweep folder, or an unreadable or foreign manifest.
    """
    path = Path(folder) / "manifest.json"
    manifest = read_manifest(Path(folder), f"{folder} is not a sweep folder; give the path that `make clamp-sweep` printed")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a clamp sweep's manifest (format {MANIFEST_FORMAT!r})")
    return manifest


def verify_sweep(folder: str | Path, *, jobs: int | None = None) -> tuple[bool, str]:
    """Re-run the plan in `folder`'s manifest (`jobs` processes, default default_jobs); compare every number
    of sweep.csv and summary.csv.

    Returns:
        (passed, one line: PASS, or FAIL naming the file, row, column, expected and got values).
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    expected = outputs.normalized(outputs.read_csv(folder / "sweep.csv"))
    expected_summary = outputs.read_csv(folder / "summary.csv")
    settings = SweepSettings(**manifest["settings"])
    cells = plan_cells(
        manifest["families"], tuple(manifest["seeds"]), settings, manifest["datasets_requested"], manifest["num_clamps"]
    )
    for d in manifest["datasets"]:
        try:
            mine = SweepData.named(d["name"])
        except ValueError:
            mine = None
        if mine is None or mine.spec.as_dict() != d["spec"] or mine.fingerprint() != d["fingerprint"]:
            return False, f"FAIL: {folder}/manifest.json: dataset {d['name']} is no longer defined as it was"
    exact, why = same_environment(manifest, environment())
    jobs = jobs if jobs is not None else default_jobs(len(cells))
    got = outputs.sweep_frame([row for rows in run_cells(cells, jobs, desc=f"verify {folder.name}") for row in rows])
    mode = "exactly (same platform and versions)" if exact else f"within rtol {outputs.RTOL}, atol {outputs.ATOL} ({why})"
    difference, count = outputs.first_difference(expected, got, outputs.KEY_COLUMNS, exact)
    if difference is not None:
        where = f"{folder}/sweep.csv: {difference} ({count} differing value(s); compared {mode})"
        return False, f"FAIL: {where}{commit_note(manifest)}"
    got_summary = outputs.summarize(got)
    difference, count = outputs.first_difference(expected_summary, got_summary, outputs.CELL_COLUMNS, exact)
    if difference is not None:
        where = f"{folder}/summary.csv: {difference} ({count} differing value(s); compared {mode})"
        return False, f"FAIL: {where}{commit_note(manifest)}"
    if sweep_sha256(expected) != manifest.get("sweep_csv_sha256"):
        return False, f"FAIL: {folder}/sweep.csv does not match the manifest's sha256 (edited after it was written?)"
    return True, f"PASS: {folder}: {len(expected)} fits and {len(expected_summary)} cells reproduced {mode}"


# -- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m experiments.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="full", help=f"one of {', '.join(gmm.FAMILIES)} or 'all' [default: full]")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"fit seeds per cell [default: {DEFAULT_SEEDS}]")
    parser.add_argument(
        "--datasets", default="", help="comma-separated dataset names [default: the family's collapse datasets and controls]"
    )
    parser.add_argument(
        "--clamps", type=int, default=10, help="clamp values on the log grid, 'no clamp' aside [default: 10]"
    )
    defaults = SweepSettings()
    parser.add_argument(
        "--iterations", type=int, default=defaults.iterations, help=f"Adam steps per fit [default: {defaults.iterations}]"
    )
    parser.add_argument(
        "--component-lr", type=float, default=defaults.component_lr, help=f"[default: {defaults.component_lr}]"
    )
    parser.add_argument("--mixture-lr", type=float, default=defaults.mixture_lr, help=f"[default: {defaults.mixture_lr}]")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"mini-batch rows [default: {defaults.batch_size}]"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, one cell each at a time [default: one per core; the numbers do not depend on it]",
    )
    parser.add_argument("--out", default=None, help="output folder [default: sweeps/<family>-<N>seeds-<time>]")
    parser.add_argument("--verify", metavar="FOLDER", default=None, help="re-run the sweep in FOLDER and compare")
    from .tracking import add_tracking_arguments

    add_tracking_arguments(parser, EXPERIMENT)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .tracking import start_command  # noqa: PLC0415

    start_command()
    from mlflow.exceptions import MlflowException

    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    try:
        if args.verify is not None:
            passed, message = verify_sweep(args.verify, jobs=args.jobs)
            print(message)
            return 0 if passed else 1
        families = families_of(args.family)
        settings = SweepSettings(args.iterations, args.component_lr, args.mixture_lr, args.batch_size)
        datasets = [d for d in args.datasets.split(",") if d] or None
        t0 = time.perf_counter()
        result = make_sweep(
            families,
            args.seeds,
            args.out,
            datasets=datasets,
            settings=settings,
            num_clamps=args.clamps,
            jobs=args.jobs,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
        )
    except (ValueError, TypeError, MlflowException) as err:
        parser.error(" ".join(str(err).split()))
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (nothing written)", file=sys.stderr)
        return 130
    roles = {d["name"]: d["role"] for d in result.manifest["datasets"]}
    for family in families:
        print(outputs.family_paragraph(result.summary, family, roles))
    what = f"{result.manifest['cells']} cells, {result.manifest['fits']} fits; MLflow parent run {result.parent_run_id}"
    print_written(result.folder, time.perf_counter() - t0, f" ({what})", "experiments.sweep", "verify-clamp-sweep SWEEP")
    return 0


if __name__ == "__main__":
    from experiments.commands import leave
    from experiments.sweep import main as _main  # spawned workers and this process share one module

    leave(_main())
