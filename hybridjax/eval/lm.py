"""Language-modelling loss: masked cross-entropy and perplexity (jit-friendly, float32 or wider).

In an eval loop, sum `cross_entropy_sums` over batches and hand the sums to `lm_metrics`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_cross_entropy(logits, targets):
    """(..., V) logits, (...) int targets -> (...) cross-entropy, computed in >= float32."""
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    target_logit = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def cross_entropy_sums(logits, targets, loss_mask):
    """-> (sum of loss_mask * cross-entropy, sum of loss_mask), both scalars."""
    return loss_sums(token_cross_entropy(logits, targets), loss_mask)


def loss_sums(losses, loss_mask):
    """Per-token losses (e.g. from hybridjax.ops.cross_entropy, without logits) -> (sum of
    loss_mask * losses, sum of loss_mask), both scalars in the losses' dtype."""
    weights = jnp.asarray(loss_mask, losses.dtype)
    return (losses * weights).sum(), weights.sum()


def masked_mean_cross_entropy(logits, targets, loss_mask):
    """Mean cross-entropy over positions with loss_mask > 0 (weighted by it); 0 if there are
    none."""
    loss_sum, weight_sum = cross_entropy_sums(logits, targets, loss_mask)
    return loss_sum / jnp.maximum(weight_sum, 1e-8)


def perplexity(mean_loss) -> float:
    """exp(mean loss); inf past float range."""
    try:
        return math.exp(float(mean_loss))
    except OverflowError:
        return math.inf


def lm_metrics(loss_sum, weight_sum) -> dict:
    """Summed (loss, weight) -> {"loss", "perplexity", "bits_per_token", "tokens"}; NaN loss
    when nothing was counted. With the byte tokenizer, bits_per_token is bits per byte."""
    loss_sum, weight_sum = float(loss_sum), float(weight_sum)
    loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_token": loss / math.log(2),
        "tokens": weight_sum,
    }
