"""Benchmarks (not tests): run as `python -m benchmarks.bench_step`."""
