"""Benchmarks: `make bench` (python -m bench.run) prints ratios against a baseline timed in the same run."""
