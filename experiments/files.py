"""Writing a report or sweep folder whole or not at all: atomic file writes, a folder built in a hidden
sibling and renamed into place, and the checks that never write into (or replace) a folder of the user's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "gmm-seed-report/1"
MARKER = ".gmm-report.json"  # in every report folder: {"format": MANIFEST_FORMAT, "files": [every file written]}


@dataclass(frozen=True)
class WrittenFolder:
    """A written report or sweep: its folder, manifest, summary frame, parent MLflow run and seconds taken."""

    folder: Path
    manifest: dict[str, Any] = field(repr=False)
    summary: Any = field(repr=False)  # a pandas DataFrame
    parent_run_id: str
    elapsed: float


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _marker_files(folder: Path) -> set[str] | None:
    """The files the report marker of `folder` lists (relative paths), or None when it carries no marker."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"] if marker.get("format") == MANIFEST_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return {str(f) for f in files} if isinstance(files, list) else None


def _foreign_files(folder: Path, listed: set[str]) -> list[str]:
    """Files under `folder` that its marker does not list (written by someone else)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    return sorted(found - listed - {MARKER})


def check_out_dir(out: Path, force: bool = False) -> None:
    """--out must be new, an empty folder, or (with `force`) an earlier report holding only files it wrote.

    A report folder carries the marker file MARKER, which lists every file the report wrote; a folder without
    it is never written into or replaced, so no file of the user's is ever deleted.

    Raises:
        ValueError: `out` is a file, a non-empty folder that is not a report, an earlier report without
            `force`, or a report folder someone added files to.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder path such as reports/NAME")
    if not out.is_dir() or not any(out.iterdir()):
        return
    listed = _marker_files(out)
    if listed is None:
        raise ValueError(
            f"--out {out} is a non-empty folder that is not a report (no {MARKER} marker); its files are left "
            "alone: choose another path"
        )
    if not force:
        raise ValueError(f"--out {out} holds an earlier report; pass --force to replace it, or choose another path")
    foreign = _foreign_files(out, listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out} holds files the report did not write ({shown}); move them away or choose another path"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out` (an earlier report there, checked by check_out_dir, is replaced)."""
    if out.exists():
        check_out_dir(out, force=True)  # again: files may have been added while the seeds ran
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_folder(out: Path, files: Mapping[str, bytes | str]) -> None:
    """Write `files` (relative path -> content) into a hidden temporary sibling folder, then rename it to
    `out` (an earlier folder there, checked by check_out_dir, is replaced); on any error nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, content in files.items():
            atomic_write(tmp / name, content)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: Path, not_a_folder: str, hint: str = "") -> Any:
    """The parsed manifest.json of `folder` (any JSON value: the caller checks its fields).

    Raises:
        ValueError: `not_a_folder` when `folder` is no folder; unreadable (then `hint` follows) or invalid JSON.
    """
    if not folder.is_dir():
        raise ValueError(not_a_folder)
    path = folder / "manifest.json"
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}{hint}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def print_written(folder: Path, seconds: float, what: str, module_name: str, make_verify: str) -> None:
    """The CLI's closing lines: the folder written (`what` follows the time as is) and how to check it."""
    from .commands import module

    shown = folder.as_posix()
    print(f"Wrote {shown}/ in {seconds:.1f} s{what}")
    print(f"Check it: {module(module_name, '--verify', shown)}   (or: make {make_verify}={shown})")
