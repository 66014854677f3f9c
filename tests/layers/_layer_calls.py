"""Jitted entry points and inputs shared by the layer tests (one compile per module structure
and shape instead of one per eager op)."""

import jax
import jax.numpy as jnp
from flax import nnx


@nnx.jit
def prefill(m, x, cache, segment_ids=None):
    return m.prefill(x, cache, segment_ids=segment_ids)


@nnx.jit
def decode(m, x, cache):
    return m.decode(x, cache)


def decode_each(m, x, cache):
    """Decode every position of x (b, l, d) one token at a time from `cache` -> (outputs joined,
    the cache after the last)."""
    outs = []
    for i in range(x.shape[1]):
        y, cache = decode(m, x[:, i : i + 1], cache)
        outs.append(y)
    return jnp.concatenate(outs, 1), cache


def random_x(shape, seed=1, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)
