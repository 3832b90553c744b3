"""Mini-batch memory benchmark: peak resident memory of `gmm.fit` with `batch_size` at N = 2,000,000, D = 16,
against a full-batch fit, each in its own process.

Each process generates the data, then resets the kernel's peak-RSS mark (/proc/self/clear_refs, Linux):
"before" is the resident memory before the fit (torch, the data, the model), "fit peak" the highest during
the whole fit, initialization included, and "loop peak" the highest after the first log point (the mark is
reset again there): the steps, the full-data NLL evaluations and the final one, which is what `batch_size`
bounds. Initialization (gmm.init.base_covariance) holds two float64 copies of the data for a moment.

    python -m bench.minibatch              # N=2e6, K=16, D=16, float32; the full-batch row takes a minute
    python -m bench.minibatch --quick      # N=2e5, a smoke run
    python -m bench.run --only minibatch

The mini-batch fit steps on `batch_size` rows and evaluates the full data's NLL only at its log points, in
chunks (gmm.model.chunk_rows), so its peak stays near the data plus a fixed working set, whatever N is;
the full-batch fit's step holds per-row intermediates (quadratic features and their gradients) for all N.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from bench.child import run_child

SIZE = (2_000_000, 16, 16)  # N, K, D
QUICK_SIZE = (200_000, 16, 16)
BATCH_SIZE = 4096
VARIANTS = ("mini-batch", "full batch")


def _status_gb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, in GB (Linux); falls back on getrusage's lifetime peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _reset_peak() -> None:
    """Release freed heap memory and restart the peak-RSS mark from the current RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child(variant: str, n: int, k: int, d: int) -> dict:
    import torch

    import gmm

    torch.manual_seed(0)
    x = gmm.generate_data(n, k, d, 8.0, "full", seed=0).data  # float32, N * D * 4 bytes
    data_gb = x.numel() * x.element_size() / 1e9
    batched = variant == "mini-batch"
    iterations = 200 if batched else 3
    model = gmm.GmmFull(k, d)
    loop: dict[str, float] = {}

    def after_first_log_point(step: int, nll: float, events: list) -> None:
        if not loop:
            loop["fit_peak_gb"] = _status_gb("VmHWM")
            _reset_peak()

    _reset_peak()
    before = _status_gb("VmRSS")
    result = gmm.fit(
        model,
        x,
        num_iterations=iterations,
        batch_size=BATCH_SIZE if batched else None,
        log_freq=100 if batched else 1,  # batched: two full-data evaluations (the second is the final NLL)
        init="random",  # the same cheap start for both rows
        seed=0,
        progress=False,
        callback=after_first_log_point,
    )
    loop_peak = _status_gb("VmHWM")
    return {
        "data_gb": data_gb,
        "before_gb": before,
        "fit_peak_gb": max(loop["fit_peak_gb"], loop_peak),
        "loop_peak_gb": loop_peak,
        "ms_per_iter": 1000 * result.wall_time / result.num_iterations,
        "nll": result.final_nll,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200,000 instead of 2,000,000")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full-batch row (the slow one)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        variant, *nums = args.child
        print(json.dumps(_child(variant, *map(int, nums))))
        return 0
    n, k, d = QUICK_SIZE if args.quick else SIZE
    print(f"Mini-batch memory: N={n:,} K={k} D={d} float32, batch_size={BATCH_SIZE}, one process per row")
    print(f"{'variant':<12} {'before GB':>9} {'fit peak GB':>11} {'loop peak GB':>12} {'ms/iter':>9} {'final NLL':>10}")
    status = 0
    for variant in VARIANTS:
        if variant == "full batch" and args.skip_full:
            continue
        t0 = time.perf_counter()
        r = run_child("bench.minibatch", variant, n, k, d)
        if "error" in r:
            print(f"{variant:<12} error: {r['error']}")
            status = 1
            continue
        print(
            f"{variant:<12} {r['before_gb']:>9.2f} {r['fit_peak_gb']:>11.2f} {r['loop_peak_gb']:>12.2f} "
            f"{r['ms_per_iter']:>9.1f} {r['nll']:>10.4f}"
            f"   ({time.perf_counter() - t0:.0f} s, data {r['data_gb']:.2f} GB)",
            flush=True,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
