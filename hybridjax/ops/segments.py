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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    return jnp.cumsum(document_starts(segment_ids, previous), axis=1, dtype=jnp.int32)


def document_positions(segment_ids, batch: int, length: int):
    """(B, L) int32 token positions, restarting at 0 at every document start (0..L-1 per row
    without segment_ids)."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return positions
    starts = document_starts(segment_ids)
    return positions - jax.lax.cummax(jnp.where(starts, positions, 0), axis=1)
