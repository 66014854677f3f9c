"""Decoding with caches equals the full forward; errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridjax.generate import generate
from hybridjax.model import HybridLM
from tests.tiny import tiny


@pytest.mark.parametrize("pattern", ["M*E-", "MM*-M*E-"])
def test_greedy_generation_is_argmax_of_full_forward(pattern):
    model = HybridLM(tiny(pattern=pattern, rope_theta=10000.0), rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 23)
    np.testing.assert_array_equal(out[:, :11], prompt)
    logits = model(out)  # every generated token must be the argmax given what preceded it
    np.testing.assert_array_equal(out[:, 11:], jnp.argmax(logits[:, 10:-1], axis=-1))


def test_prefill_and_decode_logits_match_forward():
    model = HybridLM(tiny(pattern="M*E-"), rngs=nnx.Rngs(0))
    seq = jax.random.randint(jax.random.key(2), (2, 15), 0, 64)
    full = model(seq)
    cache = model.init_cache(2, 15)
    logits, cache = model.step(seq[:, :9], cache, prefill=True)
    np.testing.assert_allclose(logits, full[:, :9], rtol=1e-8, atol=1e-10)
    for t in range(9, 15):
        logits, cache = model.step(seq[:, t : t + 1], cache, prefill=False)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-8, atol=1e-10)


def test_sampling_is_reproducible_for_a_key():
    model = HybridLM(tiny(pattern="M*"), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((1, 3), jnp.int32)
    a = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    b = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2, "temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 2, "temperature": 0.5}, "rng"),
    ],
)
def test_bad_arguments(kwargs, field):
    model = HybridLM(tiny(pattern="M"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=field):
        generate(model, jnp.zeros((1, 3), jnp.int32), **kwargs)
