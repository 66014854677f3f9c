"""Autoregressive generation with per-layer decode caches.

Mamba-2 layers carry a constant-size state (conv window + SSM state), attention layers a KV cache;
the prompt goes through one prefill pass, then each new token is one decode step. The whole loop
is a single jitted `lax.scan`, so generation compiles once per (batch, lengths) shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def generate(model, prompt, max_new_tokens: int, temperature: float = 0.0, *, rng=None):
    """Continue `prompt` (B, L) int by `max_new_tokens`; returns (B, L + max_new_tokens).

    temperature 0 is greedy (argmax); otherwise tokens are sampled from softmax(logits / T)
    with `rng` (a jax PRNG key, required then).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt: expected (batch, length) token ids, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("rng: sampling with temperature > 0 needs a PRNG key")
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
    graphdef, state = nnx.split(model)
    new = _generate(graphdef, state, prompt, keys, max_new_tokens, float(temperature))
    return jnp.concatenate([prompt, new], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, prompt, keys, max_new_tokens, temperature):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    logits, cache = model.step(prompt, cache, prefill=True)
    first = _pick(logits[:, -1], keys[0], temperature)

    def decode(carry, key):
        # The parameters ride in the carry: nnx modules must be rebuilt at the loop's trace level.
        token, cache, state = carry
        logits, cache = nnx.merge(graphdef, state).step(token[:, None], cache, prefill=False)
        return (_pick(logits[:, -1], key, temperature), cache, state), token

    (last, _, _), tokens = jax.lax.scan(decode, (first, cache, state), keys[1:])
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def _pick(logits, key, temperature):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
