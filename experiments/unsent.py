"""A finished fit whose tracking store went away before the end, kept on disk: <project>/unsent/<run_id>/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import gmm

from .config import ExperimentConfig
from .redact import redact
from .run_log import events_csv

UNSENT_DIR = "unsent"  # <project>/unsent/<run_id>/ ($GMM_UNSENT_DIR): runs whose store went away before the end


def unsent_root() -> Path:
    """The folder that keeps what a store never received: $GMM_UNSENT_DIR, else <project>/unsent."""
    from .tracking import PROJECT_ROOT

    return Path(os.environ.get("GMM_UNSENT_DIR") or PROJECT_ROOT / UNSENT_DIR)


def keep_locally(run_id: str, config: ExperimentConfig, model, result: gmm.FitResult, pending, err) -> Path:
    """Write a finished fit whose tracking store stopped answering to <project>/unsent/<run_id>/ (or
    $GMM_UNSENT_DIR/<run_id>/; built in a
    temporary folder and renamed into place, so it is whole or absent): record.json (config, final NLL,
    counts, the error), nll_history.csv, events.csv, metrics.csv (the metrics the store never received) and
    model.pt (`torch.load` it and `MixtureModel.load_state_dict`). Returns the folder."""
    root = unsent_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / run_id
    building = Path(tempfile.mkdtemp(prefix=f".{run_id}.building-", dir=root))
    try:
        _write_unsent(building, run_id, config, model, result, pending, err)
        building.rename(final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)  # whole or absent
        raise
    return final


def _write_unsent(building: Path, run_id: str, config: ExperimentConfig, model, result, pending, err) -> None:
    record = {
        "run_id": run_id,
        "why": redact(" ".join(str(err).split()))[:2000],
        "config": config.to_dict(),
        "final_nll": result.final_nll,
        "num_iterations": result.num_iterations,
        "clamp_count": result.clamp_count,
        "reset_count": result.reset_count,
        "wall_time": result.wall_time,
        "model": {"family": config.family, "num_components": config.model_components, "num_dims": config.model_dims},
    }
    (building / "record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    history = result.nll_history.double().cpu().tolist()
    (building / "nll_history.csv").write_text("step,nll\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(history)))
    (building / "events.csv").write_text(events_csv(result.events))
    rows = "".join(f"{m.key},{m.step},{m.value!r},{m.timestamp}\n" for m in pending)
    (building / "metrics.csv").write_text("key,step,value,timestamp\n" + rows)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, building / "model.pt")
