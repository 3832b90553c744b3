"""Commands printed for the user to type next, so that they work as typed.

The project's environment is `.venv` (made by `make install`); without activating it, a bare `python` is
another interpreter that lacks torch. Printed commands therefore name `.venv/bin/python` when this process
runs from that environment (to be typed in the project root, as every command in the README), and the
interpreter's own path otherwise.
"""

from __future__ import annotations

import gc
import shlex
import sys
from pathlib import Path
from typing import NoReturn

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV = PROJECT_ROOT / ".venv"


def python() -> str:
    """The interpreter to print in a command: `.venv/bin/python` (relative to the project root) when this is
    the project's environment, else the full path of the running interpreter."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return ".venv/bin/python"
    return shlex.quote(sys.executable)


def module(name: str, *args: str) -> str:
    """`<python> -m name args...`, quoted for a POSIX shell."""
    return " ".join([python(), "-m", name, *(shlex.quote(str(a)) for a in args)])


def leave(code: int) -> NoReturn:
    """sys.exit(code) for a command's end, without the interpreter's last garbage collection: after a report or
    a study it walks the millions of objects torch, MLflow and matplotlib hold, for about a second, only to free
    memory the exit frees anyway. Everything the command wrote is closed by then (its `with` blocks), and
    atexit handlers still run."""
    gc.freeze()
    sys.exit(code)
