"""Rotary position embedding (RoPE) with the context-extension scalings of HybridConfig.

Layout as `transformers` (rotate_half): the head dim d splits into halves (x1, x2) and

    out = x * cos(p * f) + rotate_half(x) * sin(p * f),   rotate_half(x) = (-x2, x1)

with f = cat(inv_freq, inv_freq), inv_freq_i = theta^(-2i/d), i < d/2, and p the explicit
position. Scalings (`scaling`, `factor` = rope_factor, `original_max_len` = rope_original_max_len):

  None      inv_freq as above.
  "linear"  position interpolation: inv_freq / factor.
  "ntk"     NTK-aware base scaling: theta' = theta * factor^(d/(d-2)). This is the dynamic-NTK base
            formula (transformers "dynamic") frozen at the target scale `factor` instead of being
            recomputed from the running sequence length, so cached keys stay valid while decoding.
  "yarn"    YaRN (transformers `_compute_yarn_parameters`, beta_fast=32, beta_slow=1, truncated
            correction range): per-frequency blend of interpolated (inv_freq / factor) and original
            frequencies over the ramp between the dims that rotate beta_fast and beta_slow times in
            `original_max_len`; cos and sin are multiplied by 0.1 * ln(factor) + 1 (factor > 1).

Frequencies and angles are computed in float32 (float64 for float64 input); output is x.dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SCALINGS = (None, "linear", "ntk", "yarn")


def rope_frequencies(
    head_dim: int,
    theta: float,
    *,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_len: int = 4096,
):
    """-> (inv_freq (head_dim // 2,) numpy float64, attention_scale float) for the scaling."""
    if scaling not in SCALINGS:
        raise ValueError(
            f"rope_scaling: {scaling!r} is not allowed; choose from "
            f"{', '.join(repr(s) for s in SCALINGS)}"
        )
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: must be a positive even number for RoPE, got {head_dim}")
    if theta is None or theta <= 0:
        raise ValueError(f"rope_theta: must be > 0, got {theta!r}")
    if factor <= 0:
        raise ValueError(f"rope_factor: must be > 0, got {factor!r}")
    d = head_dim
    exponents = np.arange(0, d, 2, dtype=np.float64) / d
    attention_scale = 1.0
    if scaling is None:
        inv_freq = theta**-exponents
    elif scaling == "linear":
        inv_freq = theta**-exponents / factor
    elif scaling == "ntk":
        if d == 2:
            raise ValueError("head_dim: ntk RoPE scaling needs head_dim > 2")
        inv_freq = (theta * factor ** (d / (d - 2))) ** -exponents
    else:  # yarn
        if original_max_len <= 0:
            raise ValueError(f"rope_original_max_len: must be > 0, got {original_max_len!r}")
        beta_fast, beta_slow = 32.0, 1.0

        def correction_dim(rotations):
            turns = original_max_len / (rotations * 2 * math.pi)
            return d * math.log(turns) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
        pos_freqs = theta**exponents
        inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + extrapolation / pos_freqs
        attention_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_scale


def apply_rope(
    x,
    positions,
    *,
    theta: float,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_len: int = 4096,
):
    """x (B, L, H, D), positions (B, L) int -> x rotated, in x.dtype."""
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x has shape {x.shape}, expected (batch, length, heads, dim)")
    if positions.shape != x.shape[:2]:
        raise ValueError(
            f"apply_rope: positions has shape {positions.shape}, expected "
            f"{x.shape[:2]} = (batch, length)"
        )
    inv_freq, scale = rope_frequencies(
        x.shape[-1], theta, scaling=scaling, factor=factor, original_max_len=original_max_len
    )
    ct = jnp.result_type(jnp.float32, x.dtype)
    angles = positions.astype(ct)[..., None] * jnp.asarray(inv_freq, ct)  # (B, L, D/2)
    cos = jnp.cos(angles) * scale
    sin = jnp.sin(angles) * scale
    cos = jnp.concatenate([cos, cos], -1)[:, :, None, :]
    sin = jnp.concatenate([sin, sin], -1)[:, :, None, :]
    h = x.astype(ct)
    x1, x2 = jnp.split(h, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (h * cos + rotated * sin).astype(x.dtype)
