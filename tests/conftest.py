"""Test-wide settings: CPU only with 8 host devices, float64 available so oracles can run in double precision.

Library code pins its dtypes from HybridConfig, so enabling x64 here changes only what tests
ask for explicitly (float64 inputs to the reference paths).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host devices so sharded code (mesh axes data/fsdp/expert/tensor) is tested on the CPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("WANDB_MODE", "offline")

import jax

jax.config.update("jax_enable_x64", True)
