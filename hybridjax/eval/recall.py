"""Recall accuracy over answer positions (loss_mask > 0), overall and per difficulty bucket.

An answer is correct when the prediction (argmax of the logits) equals the target; accuracy is
per answer token. `recall_counts` also runs inside jit (jax arrays in, jax arrays out); sum its
counts over eval batches and hand the sums to `recall_metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def recall_counts(logits_or_predictions, batch, num_buckets: int = 1):
    """-> (correct, total): int arrays (num_buckets,) of right answers and answers per bucket.

    logits_or_predictions: (B, L, V) logits or (B, L) predicted ids. batch: "targets",
    "loss_mask" (B, L) and optionally "bucket" (B,) (absent: all in bucket 0).
    """
    targets, loss_mask = batch["targets"], batch["loss_mask"]
    bucket = batch.get("bucket")
    xp = (
        jnp
        if any(
            isinstance(a, jax.Array) for a in (logits_or_predictions, targets, loss_mask, bucket)
        )
        else np
    )
    predictions = _predictions(xp, logits_or_predictions, targets)
    answer = xp.asarray(loss_mask) > 0
    right = (predictions == xp.asarray(targets)) & answer
    right_per_row = right.reshape(right.shape[0], -1).sum(1)
    answers_per_row = answer.reshape(answer.shape[0], -1).sum(1)
    if bucket is None:
        bucket = xp.zeros(right.shape[0], np.int32)
    bucket = xp.asarray(bucket)
    if xp is np and bucket.size and (bucket.min() < 0 or bucket.max() >= num_buckets):
        raise ValueError(
            f"num_buckets: bucket ids run to {bucket.max()}, so num_buckets must be "
            f"> {bucket.max()}, got {num_buckets}"
        )
    in_bucket = bucket[:, None] == xp.arange(num_buckets)[None, :]
    correct = (in_bucket * right_per_row[:, None]).sum(0)
    total = (in_bucket * answers_per_row[:, None]).sum(0)
    return correct, total


def recall_metrics(correct, total, bucket_names=None) -> dict:
    """Summed counts -> {"accuracy", "answers", "accuracy/<bucket>", "answers/<bucket>"}.

    Buckets are named by `bucket_names` (else by id); buckets without answers are left out;
    "accuracy" is NaN when there is no answer at all.
    """
    correct = np.asarray(correct, np.int64).reshape(-1)
    total = np.asarray(total, np.int64).reshape(-1)
    names = list(bucket_names) if bucket_names is not None else [str(i) for i in range(len(total))]
    if len(names) != len(total):
        raise ValueError(f"bucket_names: {len(names)} names for {len(total)} buckets")
    answers = int(total.sum())
    metrics = {"accuracy": correct.sum() / answers if answers else float("nan"), "answers": answers}
    for name, c, t in zip(names, correct, total):
        if t:
            metrics[f"accuracy/{name}"] = float(c / t)
            metrics[f"answers/{name}"] = int(t)
    metrics["accuracy"] = float(metrics["accuracy"])
    return metrics


def recall_accuracy(logits_or_predictions, batch, bucket_names=None) -> dict:
    """One batch -> recall_metrics (see there). Without bucket_names, buckets are numbered up
    to the largest id in the batch."""
    if bucket_names is not None:
        num_buckets = len(bucket_names)
    elif batch.get("bucket") is not None and np.size(batch["bucket"]):
        num_buckets = int(np.max(np.asarray(batch["bucket"]))) + 1
    else:
        num_buckets = 1
    correct, total = recall_counts(logits_or_predictions, batch, num_buckets)
    return recall_metrics(correct, total, bucket_names)


def _predictions(xp, logits_or_predictions, targets):
    x = xp.asarray(logits_or_predictions)
    if x.ndim == np.ndim(targets) + 1:
        return x.argmax(-1)
    if x.ndim == np.ndim(targets):
        return x
    raise ValueError(
        f"logits_or_predictions: shape {x.shape} is neither logits (B, L, V) nor "
        f"predictions (B, L) for targets of shape {np.shape(targets)}"
    )
