"""Reproducible benchmarks: each prints the project's figure beside a reference, as a ratio."""
