"""What a report or sweep records of the machine it ran on (versions, platform, git state), and whether a
re-run must reproduce its numbers exactly."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch


def environment() -> dict[str, Any]:
    """Versions, platform and git state, as the manifest records them."""
    from importlib.metadata import PackageNotFoundError, version

    from .tracking import static_tags

    versions = {"python": platform.python_version()}
    for package in ("torch", "numpy", "pandas", "scipy", "matplotlib", "mlflow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    versions["torch"] = torch.__version__
    versions["numpy"] = np.__version__
    static = static_tags()
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


EXACT_VERSIONS = ("python", "torch", "numpy")
EXACT_PLATFORM = ("system", "machine", "cpu_capability")


def same_environment(manifest: dict[str, Any], env: dict[str, Any]) -> tuple[bool, str]:
    """Whether numbers must match exactly: same system, machine, CPU capability, Python, torch and numpy."""
    diffs = []
    for key in EXACT_VERSIONS:
        old, new = manifest.get("versions", {}).get(key), env["versions"].get(key)
        if old != new:
            diffs.append(f"{key} {old} -> {new}")
    for key in EXACT_PLATFORM:
        old, new = manifest.get("platform", {}).get(key), env["platform"].get(key)
        if old != new:
            diffs.append(f"{key} {old} -> {new}")
    return not diffs, ", ".join(diffs)


def commit_note(manifest: dict[str, Any]) -> str:
    """The last clause of a verify FAIL line when another commit of this project wrote `manifest` ("" otherwise):
    `same_environment` looks at Python, torch and numpy, and code that rounds differently changes numbers too."""
    made, now = (manifest.get("git") or {}).get("commit"), environment()["git"]["commit"]
    if not made or not now or "unknown" in (made, now) or made == now:
        return ""
    return (
        f"; note: commit {made[:12]} made it and this is {now[:12]}: newer code may round differently; "
        f"check out {made[:12]} to reproduce it exactly"
    )


def environment_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """The rows a report's Environment table shows of a manifest: its versions, then its platform."""
    rows = [[f"version.{k}", v] for k, v in manifest["versions"].items()]
    return rows + [[f"platform.{k}", str(v)] for k, v in manifest["platform"].items()]
