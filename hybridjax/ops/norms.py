"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer (transformers NemotronH semantics).

    rmsnorm(x, w)                 = w * x / sqrt(mean(x^2) + eps)
    gated_rmsnorm(x, z, w, group) = w * g / sqrt(mean_group(g^2) + eps),   g = x * silu(z)

The gate multiplies *before* normalising (NemotronH `norm_before_gate=False`), and the mean runs
over contiguous groups of `group_size` channels (NemotronH: d_inner // n_groups). Both compute in
float32 (float64 when the input is float64) and return the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(*arrays):
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def rmsnorm(x, weight, *, eps: float = 1e-5):
    """x (..., d), weight (d,) -> (..., d) in x.dtype; statistics and the weight multiply in
    float32 (as NemotronHRMSNorm: the product is cast back to x.dtype at the end)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rmsnorm: weight has shape {weight.shape}, expected ({x.shape[-1]},) "
            f"for x of shape {x.shape}"
        )
    ct = _compute_dtype(x)
    h = x.astype(ct)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    return (weight.astype(ct) * h).astype(x.dtype)


def gated_rmsnorm(x, gate, weight, *, group_size: int, eps: float = 1e-5):
    """NemotronHRMSNormGated: normalise g = x * silu(gate) over groups of `group_size` channels.

    x, gate (..., d); weight (d,); d % group_size == 0. As transformers: x * silu(gate) and the
    statistics in float32, the normalised value cast to x.dtype, then multiplied by the weight;
    the result is returned in x.dtype.
    """
    d = x.shape[-1]
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: gate has shape {gate.shape}, expected x's {x.shape}")
    if weight.shape != (d,):
        raise ValueError(f"gated_rmsnorm: weight has shape {weight.shape}, expected ({d},)")
    if not isinstance(group_size, int) or group_size <= 0 or d % group_size:
        raise ValueError(
            f"gated_rmsnorm: group_size must be a positive divisor of {d}, got {group_size!r}"
        )
    ct = _compute_dtype(x) if gate is None else _compute_dtype(x, gate)
    h = x.astype(ct)
    if gate is not None:
        h = h * jax.nn.silu(gate.astype(ct))
    h = h.reshape(*x.shape[:-1], d // group_size, group_size)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    h = h.reshape(x.shape).astype(x.dtype)
    return (weight.astype(ct) * h.astype(ct)).astype(x.dtype)
