"""Run an SSD implementation per shard of the current mesh.

XLA cannot partition a custom kernel (the Pallas SSD is one opaque call per launch): left to
itself under a sharded batch it gathers the kernel's operands onto every device. Here the scan
runs under `jax.shard_map` instead: rows split over the mesh's batch axes and heads over
"tensor", so each device scans only its own rows and heads, and nothing moves.

B and C (per group) split over "tensor" with the heads when the tensor size divides the groups;
otherwise they stay whole on every device and each device picks the groups its heads read.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.sharding import batch_axes


def mesh_split(x_shape, g: int):
    """(mesh, row axes, head axis, group axis) for x (b, l, h, p) with g groups on the current
    mesh; None when nothing is split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    b, _, h, _ = x_shape
    rows = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    if b % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    n_tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if n_tensor > 1 and h % n_tensor == 0 else None
    groups = heads if heads and g % n_tensor == 0 else None
    if not rows and heads is None:
        return None
    return mesh, rows or None, heads, groups


def ssd_per_shard(scan, x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None,
                  return_final_state=False, **kw):
    """`scan(x, dt, A, B, C, D=, initial_state=, segment_ids=, return_final_state=, **kw)` on each
    device's rows and heads of the current mesh (or on the whole arrays without a mesh)."""
    split = mesh_split(x.shape, B.shape[2])
    if split is None:
        return scan(x, dt, A, B, C, D=D, initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state, **kw)
    mesh, rows, heads, groups = split
    h, g = x.shape[2], B.shape[2]
    n_tensor = mesh.shape.get("tensor", 1)

    def local(x, dt, A, B, C, D, initial_state, segment_ids):
        if heads is not None and groups is None:  # B, C whole: take the groups of our heads
            B, C = (_local_groups(v, h // n_tensor, h // g) for v in (B, C))
        return scan(x, dt, A, B, C, D=D, initial_state=initial_state, segment_ids=segment_ids,
                    return_final_state=return_final_state, **kw)

    bc = P(rows, None, groups, None)
    in_specs = (P(rows, None, heads, None), P(rows, None, heads), P(heads), bc, bc,
                None if D is None else P(heads),
                None if initial_state is None else P(rows, heads, None, None),
                None if segment_ids is None else P(rows, None))
    y_spec = P(rows, None, heads, None)
    out_specs = (y_spec, P(rows, heads, None, None)) if return_final_state else y_spec
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(x, dt, A, B, C, D, initial_state, segment_ids)


def _local_groups(v, local_heads: int, heads_per_group: int):
    """The groups (b, l, g', n) that this tensor shard's heads read, from all groups."""
    first = jax.lax.axis_index("tensor") * local_heads
    if heads_per_group % local_heads == 0:  # all our heads read one group
        return jax.lax.dynamic_slice_in_dim(v, first // heads_per_group, 1, axis=2)
    # heads straddle groups unevenly: one group per head
    return jnp.take(v, (first + jnp.arange(local_heads)) // heads_per_group, axis=2)
