"""Cross-entropy and argmax predictions from hidden states and the output head, chunk by chunk.

The logits of N tokens over a V-word vocabulary are N x V floats: 32 GiB in float32 at 256K tokens
and V = 32K, more than the rest of a train step. These functions form the logits of about
`chunk_size` tokens at a time inside a `lax.map`, and the backward pass recomputes a chunk's
logits rather than keeping them: memory is O(chunk_size x V) in both passes, not O(N x V). The
backward is written out (a custom VJP: softmax minus one-hot, computed in place of the recomputed
logits, then the two matmuls) rather than left to `jax.checkpoint`, whose autodiff of the same
chunk plans about twice the chunk-sized buffers.

Training takes one scalar, `chunked_cross_entropy_sum` (the weighted sum over tokens), whose
gradient is formed in the forward pass: each chunk's logits give its losses and at once softmax
minus one-hot and the two gradient matmuls, so the head's matmul runs once per chunk rather than
again in the backward (3 matmuls of tokens x V x d, not 4). The cost: the gradients wait for
the backward pass, which only scales them: one of h's size and dtype, and the head's, accumulated
over the chunks in float32 (a buffer of the head's size) and kept in the head's dtype.

Training chunks are strided along the sequence, not contiguous: of n chunks, chunk s holds
positions s, s + n, s + 2n, ... of every row. Rows split over a mesh's batch axes stay split
inside every chunk, and each device works on its own tokens at every step. So does a sequence
split over "context" when a device holds one row (the long-context layout); with several rows
per device XLA gathers the sequence first, as a chunk's (rows, positions) are flattened to one
token axis (on that axis XLA computes the softmax gradient in place of the logits, one chunk-sized
buffer fewer). The head's vocab dimension may be split too (over "tensor"); XLA's partitioner
reduces the logsumexp, the target's logit (a gather) and the argmax across the shards.

The head is `(d, V)` (an lm_head kernel) or, with `vocab_major`, `(V, d)` (a tied embedding
table), read in place either way. Logits are a matmul in the hidden states' dtype with float32 (or
float64) accumulation and output: `head_logits`, which the model's own head also uses.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def head_logits(h, head, *, vocab_major: bool = False):
    """h (..., d) through the head -> logits (..., V): the matmul in h's dtype, accumulated and
    returned in >= float32, so bfloat16 logits are never rounded (nor is the rounding left to
    whether XLA fuses a cast into the matmul)."""
    d = h.shape[-1]
    if head.ndim != 2 or head.shape[1 if vocab_major else 0] != d:
        layout = "(V, d)" if vocab_major else "(d, V)"
        raise ValueError(f"head: shape {head.shape} is not {layout} for hidden size d={d}")
    dims = (((h.ndim - 1,), (1 if vocab_major else 0,)), ((), ()))
    return lax.dot_general(
        h,
        head.astype(h.dtype),
        dims,
        preferred_element_type=jnp.promote_types(h.dtype, jnp.float32),
    )


def _chunk_forward(h, head, targets, vocab_major):
    """(cross-entropy, logsumexp, logits) of one chunk: h (..., d), targets (...)."""
    logits = head_logits(h, head, vocab_major=vocab_major)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A gather, not a one-hot select: XLA hoists a select's (m, V) iota and zeros out of the
    # loop as two more chunk-sized buffers.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse, logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunk_loss(h, head, targets, vocab_major):
    return _chunk_forward(h, head, targets, vocab_major)[0]


def _chunk_loss_fwd(h, head, targets, vocab_major):
    loss, lse, _ = _chunk_forward(h, head, targets, vocab_major)
    return loss, (h, head, targets, lse)


def _head_grads(h, head, targets, logits, lse, scale, vocab_major):
    """(d/dh, d/dhead) of sum(scale * cross-entropy) over one chunk's tokens from its logits and
    logsumexp, both in >= float32: scale (softmax - one-hot) in h's dtype through the two matmuls
    with >= float32 accumulation, as the forward's."""
    vocab = jnp.arange(logits.shape[-1])  # 1-D, so no (m, V) iota is hoisted out of the loop
    dlogits = (jnp.exp(logits - lse[..., None]) - (vocab == targets[..., None])) * scale[..., None]
    dlogits = dlogits.astype(h.dtype)
    acc = jnp.promote_types(h.dtype, jnp.float32)
    dh = lax.dot_general(
        dlogits,
        head.astype(h.dtype),
        (((h.ndim - 1,), (0 if vocab_major else 1,)), ((), ())),
        preferred_element_type=acc,
    )
    tokens = tuple(range(h.ndim - 1))
    pair = (dlogits, h) if vocab_major else (h, dlogits)
    dhead = lax.dot_general(*pair, ((tokens, tokens), ((), ())), preferred_element_type=acc)
    return dh, dhead


def _chunk_loss_bwd(vocab_major, residuals, g):
    """The gradient from the recomputed logits."""
    h, head, targets, lse = residuals
    logits = head_logits(h, head, vocab_major=vocab_major)
    dh, dhead = _head_grads(h, head, targets, logits, lse, g, vocab_major)
    return dh.astype(h.dtype), dhead.astype(head.dtype), None


_chunk_loss.defvjp(_chunk_loss_fwd, _chunk_loss_bwd)


def _split(length: int, rows: int, chunk_size: int) -> tuple[int, int]:
    """(chunks, positions per row in a chunk) covering `length` positions of `rows` rows with
    chunks of at most `chunk_size` tokens (but at least one position per row), as even as
    possible so that little or no padding is needed."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    chunks = math.ceil(length / max(chunk_size // rows, 1))
    return chunks, math.ceil(length / chunks)


def _strided_chunks(h, targets, chunk_size, *per_token):
    """h (..., L, d), targets and `per_token` arrays (..., L) laid out as strided chunks, zero
    padded: each (chunks, rows, per_row, ...), position i * chunks + s of a row in chunk s."""
    if h.shape[:-1] != targets.shape or targets.ndim == 0:
        raise ValueError(
            f"targets: shape {targets.shape} does not match hidden states {h.shape} (..., L, d)"
        )
    length, d = h.shape[-2:]
    rows = math.prod(targets.shape[:-1])
    chunks, per_row = _split(length, rows, chunk_size)

    def lay_out(x, *feature):  # (rows, L, *feature): as laid out
        pad = [(0, 0), (0, chunks * per_row - length)] + [(0, 0)] * len(feature)
        x = jnp.pad(x.reshape(rows, length, *feature), pad)
        return jnp.moveaxis(x.reshape(rows, per_row, chunks, *feature), 2, 0)

    return lay_out(h, d), lay_out(targets), *map(lay_out, per_token)


def _chunk_losses(h, head, targets, vocab_major):
    """Cross-entropy of strided chunks: h (chunks, rows, per_row, d), targets (chunks, rows,
    per_row) -> losses (chunks, rows, per_row)."""

    def chunk(x):  # (rows, per_row, d) and (rows, per_row), flattened to one token axis
        h_s, t_s = x
        loss = _chunk_loss(h_s.reshape(-1, h_s.shape[-1]), head, t_s.reshape(-1), vocab_major)
        return loss.reshape(t_s.shape)

    return lax.map(chunk, (h, targets))


def chunked_cross_entropy(h, head, targets, *, chunk_size: int, vocab_major: bool = False):
    """Per-token cross-entropy without the (N, V) logits: h (..., L, d), head (d, V) or (V, d),
    targets (..., L) int -> losses (..., L) in >= float32 (float64 for float64 h).

    A chunk takes about `chunk_size` tokens: `chunk_size // rows` positions (at least one) of
    every row. Differentiable in h and head; the backward pass recomputes each chunk's logits.
    """
    h, t = _strided_chunks(h, targets, chunk_size)
    losses = _chunk_losses(h, head, t, vocab_major)
    length = targets.shape[-1]
    losses = jnp.moveaxis(losses, 0, 2).reshape(losses.shape[1], -1)[:, :length]
    return losses.reshape(targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(h, head, targets, weights, vocab_major):
    """sum(weights * cross-entropy) of strided chunks: h (chunks, rows, per_row, d), targets and
    weights (chunks, rows, per_row), weights in the losses' dtype."""
    return jnp.sum(weights * _chunk_losses(h, head, targets, vocab_major))


def _loss_sum_fwd(h, head, targets, weights, vocab_major):
    """One scan over the chunks: each chunk's logits give its losses and, at once, the
    gradients of the weighted sum; dhead accumulates in >= float32."""

    def chunk(dhead, x):  # (rows, per_row, ...) each, flattened to one token axis
        h_s, t_s, w_s = (y.reshape(-1, *y.shape[2:]) for y in x)
        ce, lse, logits = _chunk_forward(h_s, head, t_s, vocab_major)
        dh_s, dhead_s = _head_grads(h_s, head, t_s, logits, lse, w_s, vocab_major)
        ys = dh_s.astype(h.dtype).reshape(x[0].shape), ce.reshape(x[1].shape)
        return dhead + dhead_s, ys

    acc = jnp.promote_types(h.dtype, jnp.float32)
    dhead, (dh, ce) = lax.scan(chunk, jnp.zeros(head.shape, acc), (h, targets, weights))
    return jnp.sum(weights * ce), (dh, dhead.astype(head.dtype), ce)


def _loss_sum_bwd(vocab_major, residuals, g):
    dh, dhead, ce = residuals
    return (dh * g).astype(dh.dtype), (dhead * g).astype(dhead.dtype), None, ce * g


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def chunked_cross_entropy_sum(
    h, head, targets, weights, *, chunk_size: int, vocab_major: bool = False
):
    """sum(weights * cross-entropy) over tokens, chunk by chunk as `chunked_cross_entropy`: h
    (..., L, d), head (d, V) or (V, d), targets (..., L) int, weights (..., L) -> a scalar in >=
    float32 (float64 for float64 h).

    Differentiable in h, head and weights; the gradients are formed in the forward pass, so each
    chunk's logits are computed once (see the module docstring).
    """
    if weights.shape != targets.shape:
        raise ValueError(
            f"weights: shape {weights.shape} does not match targets {targets.shape} (..., L)"
        )
    acc = jnp.promote_types(h.dtype, jnp.float32)
    h, t, w = _strided_chunks(h, targets, chunk_size, weights.astype(acc))
    return _loss_sum(h, head, t, w, vocab_major)


def chunked_answer_losses(
    h, head, targets, loss_mask, *, chunk_size: int, vocab_major: bool = False
):
    """Cross-entropy and argmax prediction at the answer positions (loss_mask > 0) only, for
    eval: h (B, L, d), targets and loss_mask (B, L) -> (losses, predictions) (B, L), with 0 and
    -1 where loss_mask is 0.

    Each row's answer positions are gathered to its front (stable order) and the chunks that hold
    no row's answers are skipped, so the head runs on about B x (most answers in a row) tokens,
    not B x L, when answers are sparse (recall tasks). Chunks take `chunk_size // B` (at least
    one) positions of every row. Not meant for differentiation.
    """
    if h.ndim != 3 or h.shape[:2] != targets.shape or loss_mask.shape != targets.shape:
        raise ValueError(
            f"chunked_answer_losses: expected h (B, L, d) and targets, loss_mask "
            f"(B, L); got {h.shape}, {targets.shape}, {loss_mask.shape}"
        )
    batch, length = targets.shape
    answer = loss_mask > 0
    chunks, per_row = _split(length, batch, chunk_size)
    order = jnp.argsort(~answer, axis=1, stable=True)  # answers first, in position order
    order = jnp.pad(order, ((0, 0), (0, chunks * per_row - length)))
    order = order.reshape(batch, chunks, per_row).swapaxes(0, 1)  # (chunks, B, per_row)
    rows = jnp.arange(batch)[:, None]
    most_answers = jnp.max(jnp.sum(answer, axis=1))

    def chunk(args):
        s, idx = args

        def compute():
            ce, _, logits = _chunk_forward(h[rows, idx], head, targets[rows, idx], vocab_major)
            return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def skip():
            return (
                jnp.zeros(idx.shape, jnp.promote_types(h.dtype, jnp.float32)),
                jnp.zeros(idx.shape, jnp.int32),
            )

        return lax.cond(s * per_row < most_answers, compute, skip)

    ce, pred = lax.map(chunk, (jnp.arange(chunks), order))  # (chunks, B, per_row), sorted order
    order = order.swapaxes(0, 1).reshape(batch, -1)[:, :length]

    def unsort(x):  # (chunks, B, per_row) in sorted order -> (B, L) at the original positions
        x = x.swapaxes(0, 1).reshape(batch, -1)[:, :length]
        return jnp.zeros_like(x).at[rows, order].set(x)

    return jnp.where(answer, unsort(ce), 0), jnp.where(answer, unsort(pred), -1)
