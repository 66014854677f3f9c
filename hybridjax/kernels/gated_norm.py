"""Pallas (Triton backend) kernels of the Mamba-2 mixer's gated, grouped RMSNorm.

    out = w * n,   n = g * rsqrt(mean_group(g^2) + eps),   g = y * silu(z)

all in float32 and cast once to the output dtype (what `hybridjax.ops.norms.gated_rmsnorm` computes
with `out_dtype`). Left to XLA, the layer's forward writes the float32 product g and reads it back
for the statistics, and the backward reduces the weight's gradient over all rows in a pass of its
own. Here each program reads its rows of y and z once and writes the result (forward), or reads
y, z and the output's cotangent once and writes dy and dz (backward), with the weight's gradient
summed over the program's rows in registers: one float32 partial per program, summed in XLA.

Rows are tokens, reshaped to (rows, groups, group_size); a program takes one group of a block of
rows, so group_size must be a power of two (Triton's block shapes), which the support check asks.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from hybridjax.kernels.ssd import backend_reason

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
ROWS = 8  # rows per block: 8 x 512 channels = 32 floats a thread of 4 warps, per tensor
PROGRAM_ROWS = 128  # rows a backward program walks (its weight partial covers them)


def gated_norm_unsupported_reason(x, group_size, *, interpret=False):
    """None when the kernels take x (..., d) with groups of group_size, else why not."""
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"dtype {x.dtype} is not bfloat16, float16 or float32"
    if group_size < 16 or group_size & (group_size - 1):
        return f"group_size {group_size} is not a power of two >= 16"
    return backend_reason("hybridjax.kernels.gated_rmsnorm_pallas", interpret)


def _gate(y, z):
    s = jax.nn.sigmoid(z)
    return y * z * s, s


def _normalise(g, eps):
    r = jax.lax.rsqrt(jnp.mean(g * g, axis=1, keepdims=True) + eps)
    return g * r, r


def _fwd_kernel(y_ref, z_ref, w_ref, o_ref, *, eps):
    g, _ = _gate(y_ref[...].astype(F32), z_ref[...].astype(F32))
    n, _ = _normalise(g, eps)
    o_ref[...] = (w_ref[...].astype(F32)[None, :] * n).astype(o_ref.dtype)


def _bwd_kernel(y_ref, z_ref, w_ref, do_ref, dy_ref, dz_ref, dw_ref, *, eps, rows, blocks):
    w = w_ref[...].astype(F32)

    def block(i, dw):
        sl = pl.ds(pl.multiple_of(i * rows, rows), rows)
        y, z = y_ref[sl, :].astype(F32), z_ref[sl, :].astype(F32)
        do = do_ref[sl, :].astype(F32)
        g, s = _gate(y, z)
        n, r = _normalise(g, eps)
        dn = do * w[None, :]
        dg = r * (dn - n * jnp.mean(dn * n, axis=1, keepdims=True))
        dy_ref[sl, :] = (dg * z * s).astype(dy_ref.dtype)
        dz_ref[sl, :] = (dg * y * s * (1.0 + z * (1.0 - s))).astype(dz_ref.dtype)
        return dw + jnp.sum(do * n, axis=0)

    dw_ref[...] = jax.lax.fori_loop(0, blocks, block, jnp.zeros(w.shape, F32))


def _plan(r):
    """(rows per block, blocks per backward program) for r rows: powers of two dividing r."""
    rows = min(ROWS, r & -r)
    blocks = min(PROGRAM_ROWS // rows, (r // rows) & -(r // rows))
    return rows, blocks


def _params(warps):
    return plt.CompilerParams(num_warps=warps, num_stages=2)


def _forward(y, z, w, eps, out_dtype, interpret):
    r, g, gs = y.shape
    rows, _ = _plan(r)
    rg = pl.BlockSpec((rows, _SQ, gs), lambda i, j: (i, j, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps),
        grid=(r // rows, g),
        in_specs=[rg, rg, pl.BlockSpec((_SQ, gs), lambda i, j: (j, 0))],
        out_specs=rg,
        out_shape=jax.ShapeDtypeStruct(y.shape, out_dtype),
        interpret=interpret,
        compiler_params=_params(4),
        name="gated_rmsnorm_fwd",
    )(y, z, w)


def _backward(y, z, w, do, eps, interpret):
    r, g, gs = y.shape
    rows, blocks = _plan(r)
    span = rows * blocks
    rg = pl.BlockSpec((span, _SQ, gs), lambda i, j: (i, j, 0))
    dy, dz, dw = pl.pallas_call(
        functools.partial(_bwd_kernel, eps=eps, rows=rows, blocks=blocks),
        grid=(r // span, g),
        in_specs=[rg, rg, pl.BlockSpec((_SQ, gs), lambda i, j: (j, 0)), rg],
        out_specs=[rg, rg, pl.BlockSpec((_SQ, _SQ, gs), lambda i, j: (i, j, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(y.shape, y.dtype),
            jax.ShapeDtypeStruct(z.shape, z.dtype),
            jax.ShapeDtypeStruct((r // span, g, gs), F32),
        ],
        interpret=interpret,
        compiler_params=_params(4),
        name="gated_rmsnorm_bwd",
    )(y, z, w, do)
    return dy, dz, dw.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gated_norm(y, z, w, group_size, eps, out_dtype, interpret):
    return _gated_norm_fwd(y, z, w, group_size, eps, out_dtype, interpret)[0]


def _grouped(v, group_size):
    return v.reshape(-1, v.shape[-1] // group_size, group_size)


def _gated_norm_fwd(y, z, w, group_size, eps, out_dtype, interpret):
    wg = w.reshape(-1, group_size)
    out = _forward(_grouped(y, group_size), _grouped(z, group_size), wg, eps, out_dtype, interpret)
    return out.reshape(y.shape), (y, z, w)


def _gated_norm_bwd(group_size, eps, out_dtype, interpret, res, do):
    y, z, w = res
    grouped = functools.partial(_grouped, group_size=group_size)
    dy, dz, dw = _backward(
        grouped(y), grouped(z), w.reshape(-1, group_size), grouped(do), eps, interpret
    )
    return dy.reshape(y.shape), dz.reshape(z.shape), dw.reshape(w.shape).astype(w.dtype)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


def gated_rmsnorm_pallas(y, z, weight, *, group_size, eps=1e-5, out_dtype=None, interpret=False):
    """y, z (..., d), weight (d,) -> w * rmsnorm_group(y * silu(z)) (..., d) in out_dtype (default
    y's), computed in float32 with one rounding. interpret=True runs the kernels in Pallas
    interpret mode (CPU)."""
    reason = gated_norm_unsupported_reason(y, group_size, interpret=interpret)
    if reason is not None:
        raise ValueError(f"gated_rmsnorm_pallas: {reason}")
    out_dtype = jnp.dtype(y.dtype if out_dtype is None else out_dtype)
    return _gated_norm(y, z, weight, group_size, float(eps), out_dtype, bool(interpret))
