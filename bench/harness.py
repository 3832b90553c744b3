"""The harness with and without populations, timed in one run: a study (`--batch B` against `--batch 1`) and a
seed report (a family's seeds as one population against `--one-by-one` in one process, the reports of before
populations; then as typed, whose default is a process per core, one family each).

    python -m bench.harness                 # full study, 40 trials, --batch 16 (the default) vs 1; report all x 10 seeds
    python -m bench.harness --quick         # 8 trials; report full x 4 seeds
    python -m bench.harness --only study    # or --only report

Each command runs as `python -m studies.run` / `python -m experiments.report` would from `make`, in its own
temporary folder (storage, MLflow store, best file, report), one after the other. The study's Optuna storage
is a journal file, the storage `make study` uses when none is named (`--storage sqlite`: an SQLite file).
The study's trials phase is the span from the first trial's start to the last trial's end (the storage's
timestamps): setup, imports and the closing artifacts are not part of it. The report's time is the command's
wall time.
Targets (issue 14): the study's trials phase >= 4x faster with `--batch` than with `--batch 1`, with a best
value at least as good; the report >= 4x faster than one seed at a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gmm
from experiments.seeds import default_jobs
from studies.run import DEFAULT_BATCH

ROOT = Path(__file__).resolve().parent.parent
TARGET = 4.0


def _run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def _study(family: str, trials: int, batch: int, storage_kind: str, tmp: Path) -> tuple[float, float, float]:
    """(trials phase s, command wall s, best value) of one study."""
    import optuna

    from studies.storage import open_storage

    folder = tmp / f"study-batch{batch}"
    folder.mkdir()
    storage = str(folder / "studies.log") if storage_kind == "journal" else f"sqlite:///{folder / 'optuna.db'}"
    cmd = [
        sys.executable, "-m", "studies.run", "--family", family, "--trials", str(trials), "--batch", str(batch),
        "--storage", storage, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--best-dir", str(folder / "best"),
        "--no-progress", "--no-plots",
    ]  # fmt: skip
    wall = _run(cmd, folder)
    (summary,) = optuna.get_all_study_summaries(open_storage(storage))
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(storage))
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return span, wall, study.best_value


def _report(family: str, seeds: int, one_by_one: bool, jobs: int | None, tmp: Path) -> float:
    """Wall seconds of one report command (jobs None: the command's default, one process per core)."""
    folder = tmp / f"report-{'one' if one_by_one else 'population'}-{jobs or 'default'}"
    folder.mkdir()
    cmd = [
        sys.executable, "-m", "experiments.report", "--family", family, "--seeds", str(seeds), "--out",
        str(folder / "report"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
        *(["--one-by-one"] if one_by_one else []), *(["--jobs", str(jobs)] if jobs else []),
    ]  # fmt: skip
    return _run(cmd, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 trials; a report of full x 4 seeds")
    parser.add_argument("--only", choices=("study", "report"), help="one of the two")
    parser.add_argument("--family", default="full", help="the study's family (default full)")
    parser.add_argument("--trials", type=int, help="study trials (default 40, quick 8)")
    batch_help = f"the batched study's --batch (default {DEFAULT_BATCH}, the study's)"
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=batch_help)
    storage_help = "the study's Optuna storage: a journal file, as `make study` uses by default, or SQLite"
    parser.add_argument("--storage", choices=("journal", "sqlite"), default="journal", help=storage_help)
    args = parser.parse_args(argv)
    trials = args.trials or (8 if args.quick else 40)
    report_family, seeds = ("full", 4) if args.quick else ("all", 10)
    print(f"Harness with populations; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-harness-") as name:
        tmp = Path(name)
        if args.only in (None, "study"):
            one = _study(args.family, trials, 1, args.storage, tmp)
            batched = _study(args.family, trials, args.batch, args.storage, tmp)
            ratio = one[0] / batched[0]
            print(f"study {args.family}, {trials} trials, {args.storage} storage: trials phase --batch 1 {one[0]:.1f} s "
                  f"(command {one[1]:.1f} s), --batch {args.batch} {batched[0]:.1f} s (command {batched[1]:.1f} s): "
                  f"{ratio:.1f}x {'ok' if ratio >= TARGET else 'MISSED'} (target {TARGET:g}x)")  # fmt: skip
            better = batched[2] <= one[2]
            print(f"  best value --batch 1 {one[2]:.4f}, --batch {args.batch} {batched[2]:.4f} "
                  f"({'at least as good' if better else 'worse'})")  # fmt: skip
        if args.only in (None, "report"):
            slow = _report(report_family, seeds, True, 1, tmp)  # the reports of before populations: --jobs 1
            serial = _report(report_family, seeds, False, 1, tmp)
            fast = _report(report_family, seeds, False, None, tmp)
            ratio = slow / fast
            print(f"report {report_family} x {seeds} seeds: one by one, one process {slow:.1f} s; populations, one "
                  f"process {serial:.1f} s ({slow / serial:.1f}x); populations as typed (one process per core, "
                  f"{default_jobs(len(gmm.FAMILIES) if report_family == 'all' else 1)} here) {fast:.1f} s: "
                  f"{ratio:.1f}x {'ok' if ratio >= TARGET else 'MISSED'} (target {TARGET:g}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
