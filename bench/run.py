"""`make bench`: every benchmark of the project, each printing ratios against a baseline timed in the same run.

python -m bench.run            # small (N=1000, K=5, D=2) and large (N up to 1e6, K=16, D=16) problems
python -m bench.run --quick    # smaller sizes, a smoke run of a minute or two
python -m bench.run --only minibatch   # peak memory of a mini-batch fit at N = 2,000,000, D = 16
python -m bench.run --only adam        # the private fused Adam call against torch.optim.Adam(fused=True)
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("small", "adam", "population", "harness", "large", "minibatch")  # bench.<name>.main(argv) -> exit status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", choices=BENCHMARKS, help="run one benchmark")
    args = parser.parse_args(argv)
    status = 0
    for name in BENCHMARKS:
        if args.only and name != args.only:
            continue
        module = importlib.import_module(f"bench.{name}")
        print(f"\n== bench.{name} ==", flush=True)
        status |= module.main(["--quick"] if args.quick else [])
    return status


if __name__ == "__main__":
    sys.exit(main())
