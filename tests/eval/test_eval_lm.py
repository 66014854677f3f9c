"""Masked cross-entropy and perplexity against a plain numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np

from hybridjax.eval import (
    cross_entropy_sums,
    lm_metrics,
    masked_mean_cross_entropy,
    perplexity,
    token_cross_entropy,
)


def _reference(logits, targets, mask):
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return (ce * mask).sum() / mask.sum()


def _data(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, 7, 11)) * 4).astype(dtype)
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.4).astype(np.float32)
    return logits, targets, mask


def test_masked_mean_matches_reference():
    logits, targets, mask = _data()
    got = masked_mean_cross_entropy(logits, targets, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _reference(logits, targets, mask), rtol=1e-6)
    jitted = jax.jit(masked_mean_cross_entropy)(logits, targets, mask)
    np.testing.assert_allclose(float(jitted), float(got), rtol=1e-6)


def test_masked_positions_do_not_count():
    logits, targets, mask = _data(1)
    noisy = logits.copy()
    noisy[mask == 0] = 1e4  # huge logits where nothing is counted
    np.testing.assert_allclose(
        float(masked_mean_cross_entropy(noisy, targets, mask)),
        float(masked_mean_cross_entropy(logits, targets, mask)),
        rtol=1e-6,
    )
    assert float(masked_mean_cross_entropy(logits, targets, np.zeros_like(mask))) == 0.0


def test_bfloat16_logits_are_upcast():
    logits, targets, mask = _data(2)
    ce = token_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(
        float(masked_mean_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, mask)),
        _reference(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), targets, mask),
        rtol=1e-5,
    )


def test_sums_and_metrics():
    logits, targets, mask = _data(3)
    loss_sum, weight_sum = cross_entropy_sums(logits, targets, mask)
    assert float(weight_sum) == mask.sum()
    metrics = lm_metrics(loss_sum, weight_sum)
    ref = _reference(logits, targets, mask)
    np.testing.assert_allclose(metrics["loss"], ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(ref), rtol=1e-6)
    np.testing.assert_allclose(metrics["bits_per_token"], ref / np.log(2), rtol=1e-6)
    # Uniform logits: perplexity equals the vocabulary size.
    uniform = cross_entropy_sums(
        np.zeros((2, 3, 11), np.float32), targets[:2, :3], np.ones((2, 3), np.float32)
    )
    np.testing.assert_allclose(lm_metrics(*uniform)["perplexity"], 11.0, rtol=1e-5)
    assert perplexity(1e6) == float("inf") and np.isnan(lm_metrics(0.0, 0.0)["loss"])
