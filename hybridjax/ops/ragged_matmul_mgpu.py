"""A persistent Mosaic GPU grouped matmul for Hopper (sm_90): out[r] = lhs[r] @ rhs[group of r].

    ragged_matmul(lhs (M, K), rhs (E, K, N) or (E, N, K) with transpose_rhs, group_sizes (E,),
                  block_m=128, block_n=128, block_k=64, stages=5) -> (M, N)

Rows come in contiguous groups as in `jax.lax.ragged_dot`; rows past sum(group_sizes) are left
unwritten (the caller masks them). The output is split into block_m x block_n tiles. Row tiles
are block-aligned; a row block that straddles a group boundary becomes one tile per group in it,
each storing its own group's rows, and row blocks of no group (empty groups, the tail) none at
all. `tile_table` lists the tiles in XLA before the kernel runs.

Each CTA (one per SM) takes every SM-th (row tile, column tile) item and runs all of its items'
(item, k block) steps as one TMA pipeline, `stages` loads in flight: the next tile's first
operands arrive while the current tile's accumulator is written back. jax's example kernel
(`ragged_dot_mgpu`) fills and drains its pipeline once per tile, which weighs most at the short
contractions of MoE experts (K = 768 in the MoE preset's down projection).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hybridjax.ops.grouped_matmul import group_ids_and_positions


def tile_table(group_sizes, m: int, block_m: int):
    """The tiles of the row schedule, a prefix of a static-length list.

    Returns (table (4, capacity) int32, count (1,) int32): for tile t < count its group, row block
    (rows block * block_m ...), first row of its group within the block and the number of its
    group's rows in the block; capacity = ceil(m / block_m) + E - 1 bounds the count. Tiles at or
    past count are empty (0 rows)."""
    e = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_block = starts // block_m
    blocks = jnp.where(sizes > 0, (ends - 1) // block_m - first_block + 1, 0)  # row blocks touched
    # Tiles come in groups of `blocks` tiles, as rows come in groups of `sizes` rows.
    group, nth = group_ids_and_positions(blocks, -(-m // block_m) + e - 1)
    group = jnp.minimum(group, e - 1)  # tiles past the last (E) get no rows below
    block = first_block[group] + nth
    lo = jnp.maximum(starts[group], block * block_m)
    hi = jnp.minimum(ends[group], (block + 1) * block_m)
    count = jnp.sum(blocks, keepdims=True)
    rows = jnp.where(jnp.arange(group.shape[0]) < count, jnp.maximum(hi - lo, 0), 0)
    table = jnp.stack([group, block, lo - block * block_m, rows]).astype(jnp.int32)
    return jnp.where(rows > 0, table, 0), count.astype(jnp.int32)


def ragged_matmul(
    lhs,
    rhs,
    group_sizes,
    *,
    transpose_rhs: bool = False,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    stages: int = 5,
):
    """See the module docstring. lhs and rhs share a 16-bit dtype; K % block_k == 0,
    N % block_n == 0 and M >= block_m."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if k % block_k or n % block_n or m < block_m:
        raise ValueError(
            f"ragged_matmul: K={k} must be a multiple of block_k={block_k}, N={n} of "
            f"block_n={block_n}, and M={m} >= block_m={block_m}"
        )
    col_tiles, k_steps = n // block_n, k // block_k
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    table, count = tile_table(group_sizes, m, block_m)

    def body(table_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
        sm = lax.axis_index("sm")
        items = count_gmem[0] * col_tiles
        mine = lax.div(jnp.maximum(items - sm, 0) + sms - 1, jnp.int32(sms))

        def item(i):  # -> (tile, column tile); column tiles of a row tile run side by side
            w = sm + i * sms
            return lax.div(w, jnp.int32(col_tiles)), lax.rem(w, jnp.int32(col_tiles))

        def lhs_block(i, kk):
            return table_gmem[1, item(i)[0]], kk

        def rhs_block(i, kk):
            t, c = item(i)
            return (table_gmem[0, t], c, kk) if transpose_rhs else (table_gmem[0, t], kk, c)

        def scoped(acc_ref, out_smem):
            def step(idx, lhs_smem, rhs_smem):
                i, kk = idx

                @pl.when(kk == 0)
                def _():
                    acc_ref[...] = jnp.zeros((block_m, block_n), jnp.float32)

                plgpu.wgmma(acc_ref, lhs_smem, _transposed(rhs_smem) if transpose_rhs else rhs_smem)

                @pl.when(kk == k_steps - 1)
                def _():
                    t, c = item(i)
                    acc = acc_ref[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores
                    out_smem[...] = acc.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    _store_rows(
                        out_smem,
                        out_gmem,
                        row0=table_gmem[1, t] * block_m,
                        first=table_gmem[2, t],
                        rows=table_gmem[3, t],
                        cols=pl.ds(c * block_n, block_n),
                        block_m=block_m,
                    )

            rhs_shape = (None, block_n, block_k) if transpose_rhs else (None, block_k, block_n)

            @pl.when(mine > 0)
            def _():
                plgpu.emit_pipeline(
                    step,
                    grid=(mine, k_steps),
                    in_specs=[
                        # delay_release: the wgmma reading a stage runs past its step
                        plgpu.BlockSpec((block_m, block_k), lhs_block, delay_release=1),
                        plgpu.BlockSpec(rhs_shape, rhs_block, delay_release=1),
                    ],
                    max_concurrent_steps=stages,
                )(lhs_gmem, rhs_gmem)

            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped, plgpu.ACC((block_m, block_n)), plgpu.SMEM((block_m, block_n), lhs.dtype)
        )

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=(sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(table, count, lhs, rhs)


def _transposed(ref):
    """A (b, a) view of an SMEM ref (a, b) (jax 0.11 has ref.transpose, 0.10 transpose_ref)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _store_rows(out_smem, out_gmem, *, row0, first, rows, cols, block_m: int):
    """TMA-store rows [first, first + rows) of the tile in out_smem to out_gmem[row0 + ...].
    A TMA box has a static shape, so the dynamic row count goes out as its binary digits: one
    store of 2^j rows for each set bit j, largest first."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    offset = first
    for j in reversed(range(block_m.bit_length())):
        size = 1 << j

        @pl.when(rows & size != 0)
        def _(offset=offset, size=size):
            plgpu.copy_smem_to_gmem(
                out_smem.at[pl.ds(offset, size)], out_gmem.at[pl.ds(row0 + offset, size), cols]
            )

        offset = offset + (rows & size)
