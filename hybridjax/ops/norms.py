"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer (transformers NemotronH semantics).

    rmsnorm(x, w)                 = w * x / sqrt(mean(x^2) + eps)
    gated_rmsnorm(x, z, w, group) = w * g / sqrt(mean_group(g^2) + eps),   g = x * silu(z)

The gate multiplies *before* normalising (NemotronH `norm_before_gate=False`), and the mean runs
over contiguous groups of `group_size` channels (NemotronH: d_inner // n_groups). Both compute in
float32 (float64 when the input is float64) and return the input's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.sharding import kernel_split


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


def gated_rmsnorm(
    x, gate, weight, *, group_size: int, eps: float = 1e-5, out_dtype=None, impl="xla"
):
    """NemotronHRMSNormGated: normalise g = x * silu(gate) over groups of `group_size` channels.

    x, gate (..., d); weight (d,); d % group_size == 0. As transformers: x * silu(gate) and the
    statistics in float32, the normalised value cast to x.dtype, then multiplied by the weight;
    the result is returned in x.dtype. With `out_dtype`, everything stays in float32 (float64 for
    float64 input) and is cast once to out_dtype (the Mamba-2 mixer's rounding).

    impl: "xla"; "pallas", the fused GPU kernels of `hybridjax.kernels.gated_norm` (with a gate
    and out_dtype; under a device mesh each device normalises its own tokens); "auto", "pallas"
    when those apply on a GPU backend, else "xla".
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
    if impl not in NORM_IMPLS:
        raise ValueError(f"gated_rmsnorm: impl must be one of {NORM_IMPLS}, got {impl!r}")
    if impl != "xla":
        reason = _pallas_reason(x, gate, group_size, out_dtype)
        if reason is None:
            return _per_shard(x, gate, weight, group_size, eps, out_dtype)
        if impl == "pallas":
            raise ValueError(f"gated_rmsnorm: impl='pallas' does not apply: {reason}")
    ct = _compute_dtype(x) if gate is None else _compute_dtype(x, gate)
    h = x.astype(ct)
    if gate is not None:
        h = h * jax.nn.silu(gate.astype(ct))
    h = h.reshape(*x.shape[:-1], d // group_size, group_size)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    h = h.reshape(x.shape)
    if out_dtype is not None:
        return (weight.astype(ct) * h).astype(out_dtype)
    h = h.astype(x.dtype)
    return (weight.astype(ct) * h.astype(ct)).astype(x.dtype)


NORM_IMPLS = ("auto", "xla", "pallas")


def _pallas_reason(x, gate, group_size, out_dtype):
    """None when the fused kernels take this call, else why not."""
    if gate is None or out_dtype is None:
        return "the kernels take a gate and an out_dtype"
    if x.dtype != gate.dtype:
        return f"x ({x.dtype}) and gate ({gate.dtype}) differ in dtype"
    try:
        from hybridjax.kernels.gated_norm import gated_norm_unsupported_reason
    except ImportError as e:  # a jax without Pallas' Triton backend
        return str(e)
    return gated_norm_unsupported_reason(x, group_size)


def _per_shard(x, gate, weight, group_size, eps, out_dtype):
    """The fused kernels on each device's tokens (and whole groups of channels where the mesh's
    "tensor" axis splits them): XLA cannot partition the kernels' custom calls."""
    from hybridjax.kernels.gated_norm import gated_rmsnorm_pallas

    norm = functools.partial(
        gated_rmsnorm_pallas, group_size=group_size, eps=eps, out_dtype=out_dtype
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim != 3:
        return norm(x, gate, weight)
    b, l, d = x.shape
    rows, seq, channels = kernel_split(mesh, b, l, d // group_size)
    if rows is None and seq is None and channels is None:
        return norm(x, gate, weight)
    spec = P(rows, seq, channels)
    return jax.shard_map(
        norm, mesh=mesh, in_specs=(spec, spec, P(channels)), out_specs=spec, check_vma=False
    )(x, gate, weight)
