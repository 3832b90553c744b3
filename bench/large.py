"""Large-N benchmark: ms per iteration and peak memory of this project's fit against the original-style
baseline, each in its own process (so peak resident memory is measured per variant), same run.

    python -m bench.large                  # N=1e5/K=8/D=8 and N=1e6/K=16/D=16, full
    python -m bench.large --quick          # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from bench.child import run_child

SIZES = [(100_000, 8, 8), (1_000_000, 16, 16)]
QUICK_SIZES = [(20_000, 4, 4), (100_000, 8, 8)]
TARGET_SIZE, TARGET_SPEEDUP, TARGET_PEAK_GB = (1_000_000, 16, 16), 20.0, 2.5  # issue 2


def _child(variant: str, n: int, k: int, d: int, iters: int) -> dict:
    import torch

    import gmm

    x = gmm.generate_data(n, k, d, 8.0, "full", seed=0).data
    times = []
    if variant == "baseline":
        from bench.baseline import OriginalFull, make_fit

        model = OriginalFull(k, d, x)
        step = make_fit(model, x, 1000)
        setup = 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    else:
        from gmm.options import make_options
        from gmm.steps import AutogradStep

        model = gmm.GmmFull(k, d)
        model.fit(x[: max(k, 10_000)], num_iterations=1, init="random")  # parameters at a sensible start
        t0 = time.perf_counter()
        stepper = AutogradStep(model, x, make_options(), quadratic=(variant == "quadratic"))
        setup = time.perf_counter() - t0
        for _ in range(iters + 1):
            t0 = time.perf_counter()
            stepper.step(1e-2, 1e-2)
            stepper.clamp(1e-6)
            times.append(time.perf_counter() - t0)
        times = times[1:]  # first step warms allocator caches
        del torch
    return {
        "ms_per_iter": 1000 * statistics.median(times),
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "setup_s": setup,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        variant, *nums = args.child
        print(json.dumps(_child(variant, *map(int, nums))))
        return 0
    sizes = QUICK_SIZES if args.quick else SIZES
    print("Large N, full covariance, float32, one process per row (peak = max resident memory of that process)")
    print(f"{'N':>9} {'K':>3} {'D':>3}  {'variant':<22} {'ms/iter':>9} {'peak GB':>8} {'setup s':>8} {'speedup':>8}")
    verdict = None
    for n, k, d in sizes:
        base = run_child("bench.large", "baseline", n, k, d, 2 if n >= 1_000_000 else 5)
        rows = [("baseline (original)", base)]
        rows.append(("difference path", run_child("bench.large", "difference", n, k, d, 3)))
        rows.append(("quadratic path", run_child("bench.large", "quadratic", n, k, d, 5)))
        for name, r in rows:
            if "error" in r:
                print(f"{n:>9} {k:>3} {d:>3}  {name:<22} error: {r['error']}")
                continue
            ratio = base.get("ms_per_iter", float("nan")) / r["ms_per_iter"]
            print(
                f"{n:>9} {k:>3} {d:>3}  {name:<22} {r['ms_per_iter']:>9.1f} {r['peak_gb']:>8.2f} "
                f"{r['setup_s']:>8.2f} {ratio:>7.1f}x"
            )
        if (n, k, d) == TARGET_SIZE:
            verdict = (base, rows[-1][1])  # `fit` picks the quadratic path at this size (N K D >= 2^20)
    if verdict is None:
        return 0
    base, ours = verdict
    if "error" in base or "error" in ours:
        print(f"target at N={TARGET_SIZE[0]:,}: not measured (a variant failed)")
        return 1
    ratio = base["ms_per_iter"] / ours["ms_per_iter"]
    fast, lean = ratio >= TARGET_SPEEDUP, ours["peak_gb"] <= TARGET_PEAK_GB
    print(
        f"target at N={TARGET_SIZE[0]:,}, K={TARGET_SIZE[1]}, D={TARGET_SIZE[2]} (fit's default, quadratic path): "
        f"{ratio:.1f}x {'>=' if fast else '<'} {TARGET_SPEEDUP:g}x {'ok' if fast else 'MISSED'}; "
        f"peak {ours['peak_gb']:.2f} GB {'<=' if lean else '>'} {TARGET_PEAK_GB:g} GB {'ok' if lean else 'MISSED'}"
    )
    return 0  # timings and memory are reported, not enforced


if __name__ == "__main__":
    sys.exit(main())
