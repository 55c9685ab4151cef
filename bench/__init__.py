"""Benchmarks: run with ``make bench`` (full) or ``make bench-quick``; results go to BENCHMARKS.md."""
