"""A long row through a layer a chunk of tokens at a time (`HybridConfig.layer_chunk_size`), each
chunk rematerialised, so the layer's backward holds one chunk's internals instead of the row's.

Token-local layers (the dense MLP) map over the chunks; recurrent layers (Mamba-2, Mamba-3) scan
over them, carrying their state from one chunk to the next exactly as state passing between
training steps does, zeroed where a chunk starts a new document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import context_shards


def runs_in_chunks(chunk: int, length: int) -> bool:
    """Whether a layer takes a row of `length` tokens `chunk` at a time: when the row is longer
    than a chunk and not split over a "context" mesh axis (there each device holds a stretch of
    the row and the layer runs it whole)."""
    return 0 < chunk < length and context_shards(length) == 1


def token_chunked(fn, x, chunk: int):
    """`fn` (token-local: each output token depends on its own input token) over x (B, L, d) in
    chunks of `chunk` tokens, one after another (lax.map): with a rematerialised `fn` the backward
    holds one chunk's intermediates. L is padded to a multiple of `chunk` and cut back."""
    b, length, d = x.shape
    n = -(-length // chunk)
    xs = jnp.pad(x, ((0, 0), (0, n * chunk - length), (0, 0)))
    ys = jax.lax.map(fn, xs.reshape(b, n, chunk, d).swapaxes(0, 1))
    return ys.swapaxes(0, 1).reshape(b, n * chunk, -1)[:, :length]


def recurrent_chunked(run, x, segment_ids, state, chunk: int):
    """`run(x, segment_ids, state) -> (y, state after x)` over x (B, L, d) `chunk` tokens at a
    time, each chunk rematerialised, the state (a pytree of (B, ...) arrays) carried between
    chunks and zeroed for rows whose chunk starts a new document. segment_ids (B, L) or None.
    -> (y (B, L, d_out), the state after the row). Full chunks go through one lax.scan, a
    shorter last one after it."""
    b, length = x.shape[:2]
    n_full, rest = divmod(length, chunk)
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
    starts = jnp.arange(n_full + (rest > 0)) * chunk
    continues = seg[:, starts] == seg[:, jnp.maximum(starts - 1, 0)]  # (B, chunks)

    @jax.checkpoint
    def step(state, piece):
        x, seg, keep = piece
        zero_new = lambda s: jnp.where(keep.reshape(-1, *(1,) * (s.ndim - 1)), s, 0).astype(s.dtype)
        y, state = run(x, None if segment_ids is None else seg, jax.tree.map(zero_new, state))
        return state, y

    split = lambda t: t[:, : n_full * chunk].reshape(b, n_full, chunk, *t.shape[2:]).swapaxes(0, 1)
    state, ys = jax.lax.scan(step, state, (split(x), split(seg), continues[:, :n_full].T))
    y = ys.swapaxes(0, 1).reshape(b, n_full * chunk, *ys.shape[3:])
    if rest:
        state, y_tail = step(
            state, (x[:, n_full * chunk :], seg[:, n_full * chunk :], continues[:, -1])
        )
        y = jnp.concatenate([y, y_tail], axis=1)
    return y, state
