"""Measure in a fresh process: peak resident memory is per process, so each variant gets its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(module: str, *args: object) -> dict:
    """Run `python -m module --child ARGS...` and return the JSON dict its last stdout line holds, or
    {"error": last stderr line} when it failed."""
    cmd = [sys.executable, "-m", module, "--child", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])
