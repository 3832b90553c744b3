"""optuna-dashboard on the study storage, bound to 127.0.0.1 (`make dashboard`).

    python -m studies.dashboard                        # the default storage (studies.log in the project)
    python -m studies.dashboard --storage sqlite:///studies.db --port 8081

Exit status: 2 with one line on stderr for a bad storage URL.
"""

from __future__ import annotations

import argparse
import sys

from .storage import open_storage, resolve_storage_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--storage", default=None, help="as for python -m studies.run (default: studies.log)")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    args = p.parse_args(argv)
    url = resolve_storage_url(args.storage)
    try:
        storage = open_storage(url)
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    from optuna_dashboard import run_server

    print(f"optuna-dashboard on {url}: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
