"""Benchmarks: one driver per benchmark, results in loadtest/results/."""
