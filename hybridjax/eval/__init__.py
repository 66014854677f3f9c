"""Eval room: recall accuracy per difficulty bucket and language-modelling loss/perplexity.

Pure numpy/jax functions over batches of the data contract (hybridjax.data); no model imports.
"""

from hybridjax.eval.lm import (
    cross_entropy_sums,
    lm_metrics,
    loss_sums,
    masked_mean_cross_entropy,
    perplexity,
    token_cross_entropy,
)
from hybridjax.eval.recall import recall_accuracy, recall_counts, recall_metrics

__all__ = [
    "cross_entropy_sums",
    "lm_metrics",
    "loss_sums",
    "masked_mean_cross_entropy",
    "perplexity",
    "recall_accuracy",
    "recall_counts",
    "recall_metrics",
    "token_cross_entropy",
]
