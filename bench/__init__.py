"""Benchmarks: `python -m bench` (or `make bench`) runs each module's run() and records bench/results.json."""
