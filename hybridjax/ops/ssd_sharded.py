"""Run an SSD implementation per shard of the current mesh, the sequence included.

XLA cannot partition a custom kernel (the Pallas SSD is one opaque call per launch), nor a scan
whose state runs along a split sequence: left to itself it gathers the operands onto every
device. Here the scan runs under `jax.shard_map` instead: rows split over the mesh's batch
axes, heads over "tensor" and the sequence over "context", so each device scans only its own
stretch of its own rows and heads.

Context parallelism is exact state passing, for any number of shards:
  1. each shard scans its stretch from a zero state: its outputs and end state h_k;
  2. its total decay a_k = exp(sum dt A), or 0 when a document starts inside the stretch or at
     its first position (the id differs from the previous shard's last one);
  3. the (a_k, h_k) of all shards are combined in order with the SSM's associative operator
     (`ssm_combine.combine`, the one that carries states between chunks) by a parallel prefix
     over the shards: log2(shards) rounds of neighbour sends, which gives the state entering
     each shard, the caller's initial state folded into the first;
  4. each shard adds what that entering state contributes to its outputs, up to its first
     document start: y_t += exp(cs_t) C_t . h_in.
Each send is one (b, h, p, n) state: small next to the activations.

B and C (per group) split over "tensor" with the heads when the tensor size divides the groups;
otherwise they stay whole on every device and each device picks the groups its heads read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.ops.segments import document_index
from hybridjax.ops.ssm_combine import carry, combine
from hybridjax.sharding import SEQUENCE_AXIS, axis_size, batch_axes


def mesh_split(x_shape, g: int):
    """(mesh, row axes, sequence axis, head axis, group axis) for x (b, l, h, p) with g groups on
    the current mesh; None when nothing is split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    b, l, h, _ = x_shape
    rows = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    if b % axis_size(mesh, rows):
        rows = ()
    n_seq = mesh.shape.get(SEQUENCE_AXIS, 1)
    seq = SEQUENCE_AXIS if n_seq > 1 and l % n_seq == 0 else None
    n_tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if n_tensor > 1 and h % n_tensor == 0 else None
    groups = heads if heads and g % n_tensor == 0 else None
    if not rows and seq is None and heads is None:
        return None
    return mesh, rows or None, seq, heads, groups


def splits_sequence(x_shape, g: int) -> bool:
    """Whether the current mesh splits the sequence of x (b, l, h, p)."""
    split = mesh_split(x_shape, g)
    return split is not None and split[2] is not None


def ssd_per_shard(
    scan,
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    initial_state=None,
    segment_ids=None,
    return_final_state=False,
    **kw,
):
    """`scan(x, dt, A, B, C, D=, initial_state=, segment_ids=, return_final_state=, **kw)` on each
    device's rows, stretch and heads of the current mesh (on the whole arrays without one)."""
    split = mesh_split(x.shape, B.shape[2])
    if split is None:
        return scan(
            x,
            dt,
            A,
            B,
            C,
            D=D,
            initial_state=initial_state,
            segment_ids=segment_ids,
            return_final_state=return_final_state,
            **kw,
        )
    mesh, rows, seq, heads, groups = split
    h, g = x.shape[2], B.shape[2]
    n_tensor = mesh.shape.get("tensor", 1)

    def local(x, dt, A, B, C, D, initial_state, segment_ids):
        if heads is not None and groups is None:  # B, C whole: take the groups of our heads
            B, C = (_local_groups(v, h // n_tensor, h // g) for v in (B, C))
        args = (scan, x, dt, A, B, C, D, initial_state, segment_ids, return_final_state)
        if seq is not None:
            return _context_scan(*args, **kw)
        return scan(
            *args[1:6],
            D=D,
            initial_state=initial_state,
            segment_ids=segment_ids,
            return_final_state=return_final_state,
            **kw,
        )

    bc = P(rows, seq, groups, None)
    in_specs = (
        P(rows, seq, heads, None),
        P(rows, seq, heads),
        P(heads),
        bc,
        bc,
        None if D is None else P(heads),
        None if initial_state is None else P(rows, heads, None, None),
        None if segment_ids is None else P(rows, seq),
    )
    y_spec = P(rows, seq, heads, None)
    out_specs = (y_spec, P(rows, heads, None, None)) if return_final_state else y_spec
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        x, dt, A, B, C, D, initial_state, segment_ids
    )


def _context_scan(scan, x, dt, A, B, C, D, initial_state, segment_ids, return_final_state, **kw):
    """This shard's stretch of the scan, with the state carried in from the shards before it
    (steps 1-4 of the module doc). Inside shard_map over SEQUENCE_AXIS."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    y, h_own = scan(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        initial_state=None,
        segment_ids=segment_ids,
        return_final_state=True,
        **kw,
    )
    shard = jax.lax.axis_index(SEQUENCE_AXIS)
    n_shards = jax.lax.axis_size(SEQUENCE_AXIS)

    # positions the entering state still reaches: before the stretch's first document start
    if segment_ids is None:
        alive = jnp.ones((b, l), bool)
    else:
        # the previous shard's last id; shard 0 continues the caller's initial state
        before = _shift_one_shard(segment_ids[:, -1], n_shards)
        before = jnp.where(shard > 0, before, segment_ids[:, 0])
        alive = document_index(segment_ids, previous=before) == 0
    cs = jnp.cumsum(dt.astype(acc) * A.astype(acc), axis=1)  # (b, l, h), <= 0
    reach = jnp.where(alive[..., None], jnp.exp(cs), 0)  # decay from the stretch's start to t

    # the state entering each shard: an exclusive prefix of the shards' (decay, end state),
    # the caller's initial state folded into shard 0's
    a_own = reach[:, -1]
    h_own = h_own.astype(acc)
    if initial_state is not None:
        h_own = jnp.where(shard == 0, carry(a_own, initial_state.astype(acc), h_own), h_own)
    _, h_upto = _prefix_over_shards(a_own, h_own, shard, n_shards)
    h_in = _shift_one_shard(h_upto, n_shards)
    if initial_state is not None:
        h_in = jnp.where(shard == 0, initial_state.astype(acc), h_in)

    r = h // g
    y_in = jnp.einsum("blgn,bgrpn->blgrp", C.astype(acc), h_in.reshape(b, g, r, p, n))
    y = (y.astype(acc) + y_in.reshape(b, l, h, p) * reach[..., None]).astype(x.dtype)
    if not return_final_state:
        return y
    # the last shard's inclusive prefix is the sequence's final state, replicated over shards
    last = jnp.where(shard == n_shards - 1, h_upto, 0)
    return y, jax.lax.psum(last, SEQUENCE_AXIS)


def _prefix_over_shards(a, h, shard, n_shards: int):
    """Inclusive prefix of `combine` over the shards in order: log2(shards) rounds, in round j
    each shard folds in the running prefix of the shard 2^j before it (Hillis-Steele). Only
    neighbour sends (ppermute), no gather: each shard holds one (b, h, p, n) state."""
    step = 1
    while step < n_shards:
        pairs = [(k, k + step) for k in range(n_shards - step)]
        a_prev, h_prev = (jax.lax.ppermute(v, SEQUENCE_AXIS, pairs) for v in (a, h))
        a_new, h_new = combine((a_prev, h_prev), (a, h))
        has_prev = shard >= step
        a, h = jnp.where(has_prev, a_new, a), jnp.where(has_prev, h_new, h)
        step *= 2
    return a, h


def _shift_one_shard(h, n_shards: int):
    """Each shard's value moved to the next shard; shard 0 gets zeros."""
    return jax.lax.ppermute(h, SEQUENCE_AXIS, [(k, k + 1) for k in range(n_shards - 1)])


def _local_groups(v, local_heads: int, heads_per_group: int):
    """The groups (b, l, g', n) that this tensor shard's heads read, from all groups."""
    first = jax.lax.axis_index("tensor") * local_heads
    if heads_per_group % local_heads == 0:  # all our heads read one group
        return jax.lax.dynamic_slice_in_dim(v, first // heads_per_group, 1, axis=2)
    # heads straddle groups unevenly: one group per head
    return jnp.take(v, (first + jnp.arange(local_heads)) // heads_per_group, axis=2)
