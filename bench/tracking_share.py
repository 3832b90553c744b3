"""The share of a study's trials loop that its own process spends on tracking (issue 14: <= 5%), from a py-spy
profile of the `--batch 16` study's process:

    pip install py-spy        # not a dependency of the project
    py-spy record -f raw -r 100 -o /tmp/study.txt -- .venv/bin/python -m studies.run --family full \
        --trials 40 --storage /tmp/s/studies.log --tracking-uri sqlite:////tmp/s/mlflow.db --best-dir /tmp/s/best \
        --no-progress --no-plots
    .venv/bin/python -m bench.tracking_share /tmp/study.txt

Counts the samples whose stack passes through the trials loop (`optimize` in studies.worker), and among those
the ones inside tracking: MLflow and SQLAlchemy frames, experiments.tracking / writer / redact / stores, and the
logging parts of experiments.run_log (RunLogger, log_*, event_rows). Optuna's storage is reported apart: it is
not tracking. The write-behind helper is another process, on the other core, and is not sampled.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

TRACKING_FILES = ("experiments/tracking.py", "experiments/writer.py", "experiments/redact.py", "experiments/stores.py")
LIBRARIES = ("mlflow/", "sqlalchemy/")
RUN_LOG_PARTS = ("RunLogger.", "log_", "event_rows", "events_csv", "start_logging")


def _is_tracking(frame: str) -> bool:
    if any(f in frame for f in TRACKING_FILES + LIBRARIES):
        return True
    return "experiments/run_log.py" in frame and frame.startswith(RUN_LOG_PARTS)


def share(lines, root: str = "optimize") -> tuple[int, int, int, collections.Counter]:
    """(samples in `root`, of them in tracking, in Optuna's storage, tracking samples by their outermost frame)."""
    total = tracking = optuna = 0
    outermost: collections.Counter = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]
        if root not in names:
            continue
        n = int(count)
        total += n
        below = frames[names.index(root) :]
        hits = [f for f in below if _is_tracking(f)]
        if hits:
            tracking += n
            outermost[hits[0].split(" (")[0]] += n
        elif any("optuna/storages" in f for f in below):
            optuna += n
    return total, tracking, optuna, outermost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy's raw output (record -f raw)")
    args = parser.parse_args(argv)
    total, tracking, optuna, outermost = share(args.profile.read_text().splitlines())
    if not total:
        raise SystemExit(f"{args.profile}: no samples in the trials loop (optimize); is it a study's py-spy raw file?")
    print(f"trials loop: {total} samples; tracking {100 * tracking / total:.1f}% (target <= 5%), Optuna's storage "
          f"{100 * optuna / total:.1f}%")  # fmt: skip
    for name, n in outermost.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
