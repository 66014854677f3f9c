"""Cross-entropy and argmax predictions from hidden states and the output head, chunk by chunk.

The logits of N tokens over a V-word vocabulary are N x V floats: 32 GiB in float32 at 256K tokens
and V = 32K, more than the rest of a train step. These functions form the logits of about
`chunk_size` tokens at a time inside a `lax.map`, and the backward pass recomputes a chunk's
logits rather than keeping them: memory is O(chunk_size x V) in both passes, not O(N x V). The
backward is written out (a custom VJP: softmax minus one-hot, computed in place of the recomputed
logits, then the two matmuls) rather than left to `jax.checkpoint`, whose autodiff of the same
chunk plans about twice the chunk-sized buffers.

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


def _chunk_loss_bwd(vocab_major, residuals, g):
    """d loss / d logits = g (softmax - one-hot) from the recomputed logits; the matmuls take it
    in h's dtype with >= float32 accumulation, as the forward's."""
    h, head, targets, lse = residuals
    logits = head_logits(h, head, vocab_major=vocab_major)
    vocab = jnp.arange(logits.shape[-1])  # 1-D, so no (m, V) iota is hoisted out of the loop
    dlogits = (jnp.exp(logits - lse[..., None]) - (vocab == targets[..., None])) * g[..., None]
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


def chunked_cross_entropy(h, head, targets, *, chunk_size: int, vocab_major: bool = False):
    """Per-token cross-entropy without the (N, V) logits: h (..., L, d), head (d, V) or (V, d),
    targets (..., L) int -> losses (..., L) in >= float32 (float64 for float64 h).

    A chunk takes about `chunk_size` tokens: `chunk_size // rows` positions (at least one) of
    every row. Differentiable in h and head; the backward pass recomputes each chunk's logits.
    """
    if h.shape[:-1] != targets.shape or targets.ndim == 0:
        raise ValueError(
            f"targets: shape {targets.shape} does not match hidden states {h.shape} (..., L, d)"
        )
    length, d = h.shape[-2:]
    h, t = h.reshape(-1, length, d), targets.reshape(-1, length)  # (rows, L): as laid out
    rows = t.shape[0]
    chunks, per_row = _split(length, rows, chunk_size)
    pad = chunks * per_row - length
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(rows, per_row, chunks, d)
    t = jnp.pad(t, ((0, 0), (0, pad))).reshape(rows, per_row, chunks)
    # Position i * chunks + s of a row goes to chunk s: chunks first for the map.
    xs = jnp.moveaxis(h, 2, 0), jnp.moveaxis(t, 2, 0)

    def chunk(x):  # (rows, per_row, d) and (rows, per_row), flattened to one token axis
        h_s, t_s = x
        return _chunk_loss(h_s.reshape(-1, d), head, t_s.reshape(-1), vocab_major).reshape(
            t_s.shape
        )

    losses = lax.map(chunk, xs)
    losses = jnp.moveaxis(losses, 0, 2).reshape(rows, -1)[:, :length]
    return losses.reshape(targets.shape)


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
