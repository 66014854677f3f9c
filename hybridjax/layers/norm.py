"""RMSNorm module (NemotronHRMSNorm): parameter `weight` (d,), initialised to ones.

Statistics and the weight multiply run in float32 (float64 for float64 input); the result is cast
to `dtype` (the compute dtype; None = the input's dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.ops.norms import rmsnorm
from hybridjax.ops.remat_names import saved_kernel_output


class RMSNorm(nnx.Module):
    def __init__(
        self,
        d: int,
        *,
        eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic init; accepted so every layer can be built the same way
        if d <= 0:
            raise ValueError(f"RMSNorm: d must be > 0, got {d!r}")
        self.eps = eps
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.weight = nnx.Param(jnp.ones((d,), jnp.dtype(param_dtype)))

    def __call__(self, x):
        # Rematerialised: the backward keeps x (in its own dtype, usually saved anyway as the
        # block's input), not the float32 copies of x and of the normalised x over the sequence.
        y = jax.checkpoint(functools.partial(rmsnorm, eps=self.eps))(x, self.weight[...])
        # The next matmul's weight gradient reads y: kept by the matmul-saving remat policies,
        # which would otherwise form it again in the backward (an extra pass over x).
        return saved_kernel_output(y if self.dtype is None else y.astype(self.dtype))
