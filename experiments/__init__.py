"""Sweep and ablation reports: `python -m experiments.report MULTIRUN_DIR --out DIR`."""
