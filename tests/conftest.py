"""Test-wide settings: CPU only, float64 available so oracles can run in double precision.

Library code pins its dtypes from HybridConfig, so enabling x64 here changes only what tests
ask for explicitly (float64 inputs to the reference paths).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
