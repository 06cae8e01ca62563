"""Benchmarks: each module builds its own workload, measures a baseline in the same run, and prints one table."""
