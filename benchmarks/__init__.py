"""Benchmarks run by hand; their results are recorded in docs/benchmarks-*.md."""
