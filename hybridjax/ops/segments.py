"""What a document is in a packed row: one definition for every layer.

A document is a maximal run of equal segment ids: a boundary is wherever the id changes between
consecutive positions. This is what packing produces, what the SSM and the conv reset on, and
what attention masks by: an id that comes back later in the row (1 1 2 2 1 1) starts a new,
third document, which sees neither of the others. Padding (id 0 in the data pipeline) is a run
like any other, so trailing padding is a document of its own.

    document_starts(segment_ids, previous=None)     (B, L) bool   the id changed from t-1
    document_index(segment_ids, previous=None)      (B, L) int32  0, 1, 2, ... per run
    document_positions(segment_ids, batch, length)  (B, L) int32  position in the document

Position 0 starts a document only when `previous` (B,), the id just before the row (the last id
of the previous context-parallel shard), differs from it; without `previous` it continues
whatever state the caller hands in (the SSM's and the conv's `initial_state`).

With the sequence split over the mesh's "context" axis (outside a shard_map), the index and the
positions are formed per shard and carried across the shards (`over_context`): each shard runs
its own cumsum / cummax and adds what the shards before it hold (an all-gather of one value per
row and shard). Left to XLA, a cumsum over a split axis becomes a reduce-window as wide as the
whole row over an all-gathered copy, which XLA does not rewrite into a scan: O(L^2 / shards)
adds per device (docs/measurements/cpu_context_parallel_diagnosis.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.sharding import SEQUENCE_AXIS


def document_starts(segment_ids, previous=None):
    """(B, L) bool: True where the id differs from the previous position's (module doc)."""
    before = (
        jnp.zeros_like(segment_ids[:, :1], bool)
        if previous is None
        else (segment_ids[:, :1] != previous[:, None])
    )
    return jnp.concatenate([before, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def document_index(segment_ids, previous=None):
    """(B, L) int32: the run each position belongs to, counted from 0 at the row's start. Equal
    indices mean the same document, so attention compares these, never the raw ids."""
    if context_shards(segment_ids.shape[1]) > 1:
        if previous is None:
            return over_context(_index_per_shard, segment_ids)
        return over_context(_index_per_shard, segment_ids, previous, shard_args=1)
    return jnp.cumsum(document_starts(segment_ids, previous), axis=1, dtype=jnp.int32)


def document_positions(segment_ids, batch: int, length: int):
    """(B, L) int32 token positions, restarting at 0 at every document start (0..L-1 per row
    without segment_ids)."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return positions
    if context_shards(length) > 1:
        return over_context(_positions_per_shard, segment_ids)
    starts = document_starts(segment_ids)
    return positions - jax.lax.cummax(jnp.where(starts, positions, 0), axis=1)


# --- the sequence split over "context" ------------------------------------------------------
def context_shards(length: int) -> int:
    """How many stretches the current mesh's "context" axis splits a sequence of `length` into,
    where that split is still XLA's to make (outside shard_map); 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or SEQUENCE_AXIS in mesh.manual_axes:
        return 1
    n = mesh.shape[SEQUENCE_AXIS]
    return n if n > 1 and length % n == 0 else 1


def over_context(fn, *args, shard_args=None):
    """`fn(*args)` on each device's stretch of the sequence: arrays (B, L, ...) split over
    "context" (axis 1) by a shard_map manual over that axis only, the other axes left to XLA.
    The first `shard_args` arguments (default: all) are split, the rest (e.g. (B,) values) are
    whole on every shard; None arguments stay None. Returns what fn returns, split likewise."""
    mesh = jax.sharding.get_abstract_mesh()
    n_split = len(args) if shard_args is None else shard_args
    split = P(None, SEQUENCE_AXIS)
    in_specs = tuple(
        None if a is None else split if i < n_split else P() for i, a in enumerate(args)
    )
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=split,
        axis_names={SEQUENCE_AXIS},
        check_vma=False,
    )(*args)


def _before_shard(x):
    """(B, L, ...) -> (B, ...): the previous shard's last position; shard 0 gets x's first."""
    n = jax.lax.axis_size(SEQUENCE_AXIS)
    prev = jax.lax.ppermute(x[:, -1], SEQUENCE_AXIS, [(k, k + 1) for k in range(n - 1)])
    return jnp.where(jax.lax.axis_index(SEQUENCE_AXIS) > 0, prev, x[:, 0])


def _over_earlier_shards(value, reduce, empty):
    """`reduce` over the shards before this one of each shard's (B,) `value` (`empty` for
    shard 0): an all-gather of one value per row and shard."""
    every = jax.lax.all_gather(value, SEQUENCE_AXIS)  # (shards, B)
    n = every.shape[0]
    earlier = (jnp.arange(n) < jax.lax.axis_index(SEQUENCE_AXIS))[:, None]
    return reduce(jnp.where(earlier, every, empty), axis=0)


def _index_per_shard(segment_ids, previous=None):
    shard = jax.lax.axis_index(SEQUENCE_AXIS)
    before = _before_shard(segment_ids)
    if previous is not None:
        before = jnp.where(shard > 0, before, previous)
    local = jnp.cumsum(document_starts(segment_ids, before), axis=1, dtype=jnp.int32)
    return local + _over_earlier_shards(local[:, -1], jnp.sum, 0)[:, None]


def _positions_per_shard(segment_ids):
    l = segment_ids.shape[1]
    positions = jax.lax.axis_index(SEQUENCE_AXIS) * l + jnp.arange(l, dtype=jnp.int32)
    starts = document_starts(segment_ids, _before_shard(segment_ids))
    last_start = jax.lax.cummax(jnp.where(starts, positions, 0), axis=1)  # global positions
    last_start = jnp.maximum(
        last_start, _over_earlier_shards(last_start[:, -1], jnp.max, 0)[:, None]
    )
    return positions - last_start
