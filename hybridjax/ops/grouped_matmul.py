"""Grouped matmul: the one function behind which the MoE expert matmul lives.

    grouped_matmul(lhs (M, K), rhs (E, K, N), group_sizes (E,), impl="auto", *, capacity=None)
        -> out (M, N)

Rows of `lhs` come in contiguous groups: rows [start_e, start_e + group_sizes[e]) are multiplied by
`rhs[e]`, with start_e = sum(group_sizes[:e]). Rows at or past sum(group_sizes) give zero output
and zero gradient (every implementation; the expert-parallel path relies on it for its padding).

impl:
  "ragged_dot"  `jax.lax.ragged_dot`: exact, differentiable, runs everywhere. Its stock GPU lowering
                densifies (11 TFLOP/s on an H200 at M131072 d2048 f1024 E64): use it on CPU.
  "mgpu"        jax's own Mosaic-GPU Hopper kernels (`jax.experimental.pallas.ops.gpu`
                ragged_dot_mgpu forward; backward through a custom_vjp: d lhs = the same kernel on
                the transposed rhs, d rhs = transposed_ragged_dot_mgpu). GPU (sm_90) only;
                needs lhs and rhs of one dtype in {bfloat16, float16}, K and N multiples of 128.
                Imported lazily.
  "persistent"  "mgpu" with our persistent forward and d lhs kernel
                (`hybridjax.ops.ragged_matmul_mgpu`: one TMA pipeline per SM across its tiles, so
                the next tile's loads overlap the last one's write-back; block-aligned row tiles,
                none for row blocks outside the groups); the weight gradient as "mgpu". Same
                requirements, and M >= 128. Opt-in until measured against "mgpu" on a GPU
                (`python -m hybridjax.bench grouped_matmul --impls mgpu persistent`).
  "padded"      capacity-padded batched matmul: rows are scattered into an (E, C, K) buffer,
                multiplied by one batched matmul, gathered back. C = `capacity` (rows past it in a
                group are dropped: zero output, zero gradient) or, when None, M (exact, but E x the
                memory). Fast on GPUs when C ~ M/E (469 useful TFLOP/s at capacity 1.25 measured).
  "auto"        "mgpu" on a Hopper GPU when the dtypes/shapes are supported, else "ragged_dot".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybridjax.ops.remat_names import saved_kernel_output
from hybridjax.ops.varying import same_varying_axes, vary, varying_axes

IMPLS = ("auto", "ragged_dot", "mgpu", "persistent", "padded")

# Mosaic-GPU tiling. K and N must be multiples of MGPU_ALIGN for the forward and both gradients.
# 128 x 128 x 64 tiles with 5 stages in flight; the forward visits `grid_block_n` column tiles per
# row tile, the widest of 4, 3, 2 that divides the output's column tiles. Picked by a sweep on an
# H100 (jax 0.11.2, bf16) at the MoE preset's shapes, M98304 E64: the up projection K2048 N768
# 0.988 -> 0.584 ms (grid_block_n 1 -> 3, 4 -> 5 stages), the down projection's d lhs K2048 N768
# (transposed) 1.000 -> 0.593 ms, the weight gradients 0.574 -> 0.554 and 0.600 -> 0.561 ms
# (docs/measurements/h100_grouped_matmul_tiling.log). Sweep other shapes or GPUs with
# `python -m hybridjax.bench grouped_matmul --sweep --shapes mM,kK,nN,eE`.
MGPU_ALIGN = 128
_MGPU_TILE = {"block_m": 128, "block_n": 128, "block_k": 64, "max_concurrent_steps": 5}
_MGPU_SWIZZLE = (4, 3, 2)  # forward grid_block_n candidates, widest first
# the weight gradient's kernel (`transposed_ragged_dot_mgpu.transposed_ragged_dot`)
MGPU_WGRAD_TILING = {**_MGPU_TILE, "grid_block_n": 1}
_MGPU_DTYPES = (jnp.bfloat16, jnp.float16)


def grouped_matmul(lhs, rhs, group_sizes, impl: str = "auto", *, capacity: int | None = None):
    """(M, K) x (E, K, N) over contiguous row groups -> (M, N). See the module docstring."""
    return saved_kernel_output(_grouped_matmul(lhs, rhs, group_sizes, impl, capacity))


def _grouped_matmul(lhs, rhs, group_sizes, impl, capacity):
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"grouped_matmul: want lhs (M, K), rhs (E, K, N); got lhs {lhs.shape}, rhs {rhs.shape}"
        )
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(
            f"grouped_matmul: group_sizes must be ({rhs.shape[0]},), got {group_sizes.shape}"
        )
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "auto":
        impl = "mgpu" if mgpu_supported(lhs, rhs) else "ragged_dot"
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if impl == "padded":
        return _padded(lhs, rhs, group_sizes, capacity)
    if impl in ("mgpu", "persistent"):
        rows = MGPU_ALIGN if impl == "persistent" else 1
        if not mgpu_supported(lhs, rhs, check_device=False) or lhs.shape[0] < rows:
            raise ValueError(
                f"grouped_matmul: impl {impl!r} needs lhs/rhs of one dtype in (bfloat16, "
                f"float16), K and N multiples of {MGPU_ALIGN} and M >= {rows}; got lhs "
                f"{lhs.shape} {lhs.dtype}, rhs {rhs.shape} {rhs.dtype}"
            )
        return _mgpu(*same_varying_axes(lhs, rhs), group_sizes, impl == "persistent")
    raise ValueError(
        f"grouped_matmul: impl {impl!r} is not allowed; choose from "
        + ", ".join(repr(i) for i in IMPLS)
    )


def is_hopper() -> bool:
    """True when the default device is an NVIDIA sm_90 GPU (H100 / H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def mgpu_supported(lhs, rhs, check_device: bool = True) -> bool:
    """Whether impl "mgpu" can run these operands (and, with check_device, on this machine)."""
    _, k, n = rhs.shape
    ok = (
        lhs.dtype == rhs.dtype
        and any(lhs.dtype == d for d in _MGPU_DTYPES)
        and k % MGPU_ALIGN == 0
        and n % MGPU_ALIGN == 0
        and lhs.shape[0] > 0
    )
    return ok and (not check_device or is_hopper())


# ------------------------------------------------------------------------------------- padded
def group_ids_and_positions(group_sizes, n_rows):
    """For each of n_rows rows: its group (E for rows past the last group) and rank within it."""
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(n_rows, dtype=jnp.int32)
    gid = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)  # in [0, E]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])
    return gid, row - starts[gid]


def _padded(lhs, rhs, group_sizes, capacity):
    m, k = lhs.shape
    e = rhs.shape[0]
    cap = m if capacity is None else int(capacity)
    gid, pos = group_ids_and_positions(group_sizes, m)
    keep = (gid < e) & (pos < cap)
    slot = jnp.where(keep, gid * cap + pos, e * cap)  # e * cap = out of range: dropped
    # Inverse map buffer slot -> source row (m = an all-zero pad row); gathers both ways so the
    # backward is a gather/scatter-add of the same size.
    src = (
        jnp.full((e * cap,), m, jnp.int32).at[slot].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    )
    lhs_pad = jnp.concatenate([lhs, jnp.zeros((1, k), lhs.dtype)])
    buf = lhs_pad[src].reshape(e, cap, k)
    out = jnp.einsum("eck,ekn->ecn", buf, rhs).reshape(e * cap, -1)
    out = jnp.concatenate([out, jnp.zeros((1, out.shape[1]), out.dtype)])
    return out[slot]


# --------------------------------------------------------------------------------------- mgpu
def _row_mask(group_sizes, n_rows):
    return (jnp.arange(n_rows) < jnp.sum(group_sizes))[:, None]


def _mgpu_fwd_kernel(lhs, rhs, group_sizes, transpose_rhs=False, persistent=False):
    if persistent:
        from hybridjax.ops.ragged_matmul_mgpu import ragged_matmul

        out = ragged_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    else:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        out = ragged_dot_mgpu.ragged_dot(
            lhs, rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs, **mgpu_forward_tiling(n)
        )
    # The kernel leaves rows past sum(group_sizes) unwritten: zero them.
    return jnp.where(_row_mask(group_sizes, lhs.shape[0]), out, jnp.zeros((), out.dtype))


def mgpu_forward_tiling(n: int) -> dict:
    """The parameters of jax's forward kernel (`ragged_dot_mgpu.ragged_dot`) for an output of n
    columns (also the d lhs kernel's, n the lhs's width): the column-tile swizzle is the widest
    in _MGPU_SWIZZLE that divides the column tiles (module tiling note)."""
    tiles = n // _MGPU_TILE["block_n"]
    width = next((w for w in _MGPU_SWIZZLE if tiles % w == 0), 1)
    return {**_MGPU_TILE, "grid_block_n": width}


def _mgpu_out(lhs, rhs, group_sizes, persistent):
    out = _mgpu_fwd_kernel(lhs, rhs, group_sizes, persistent=persistent)
    return vary(out, varying_axes(lhs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mgpu(lhs, rhs, group_sizes, persistent: bool):
    return _mgpu_out(lhs, rhs, group_sizes, persistent)


def _mgpu_fwd(lhs, rhs, group_sizes, persistent):
    return _mgpu_out(lhs, rhs, group_sizes, persistent), (lhs, rhs, group_sizes)


def _mgpu_bwd(persistent, res, d_out):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    lhs, rhs, group_sizes = res
    d_out = jnp.where(_row_mask(group_sizes, lhs.shape[0]), d_out, 0).astype(lhs.dtype)
    # d lhs (M, K) = d_out (M, N) x rhs[e]^T (N, K): rhs (E, K, N) read as (E, N, K)^T.
    d_lhs = _mgpu_fwd_kernel(d_out, rhs, group_sizes, transpose_rhs=True, persistent=persistent)
    # d rhs[e] (K, N) = lhs[group e]^T x d_out[group e]; empty groups give zeros.
    d_rhs = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, d_out, group_sizes=group_sizes, **MGPU_WGRAD_TILING
    )
    return (
        vary(d_lhs, varying_axes(lhs)),
        vary(d_rhs.astype(rhs.dtype), varying_axes(rhs)),
        None,
    )


_mgpu.defvjp(_mgpu_fwd, _mgpu_bwd)
