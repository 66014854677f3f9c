"""Benchmark programs: `python -m hybridjax.bench <name> ...` prints a table of medians."""
