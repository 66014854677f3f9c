"""recall_accuracy on hand-made logits: per answer token, per bucket, numpy and jit alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.eval import recall_accuracy, recall_counts, recall_metrics

V = 5


def _hand_made():
    # 3 rows, 4 positions. Answers (loss_mask 1) marked; predictions chosen per position.
    targets = np.array([[1, 2, 3, 4], [0, 1, 2, 3], [4, 4, 4, 4]], np.int32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], np.float32)
    preds = np.array(
        [
            [0, 2, 0, 4],  # answers at 1 (right), 2 (wrong): 1/2
            [0, 1, 0, 3],  # answers 0 right, 1 right, 2 wrong, 3 right: 3/4
            [0, 0, 0, 4],
        ],  # answer 3 right; wrong non-answers do not count: 1/1
        np.int32,
    )
    logits = np.full((3, 4, V), -1.0, np.float32)
    np.put_along_axis(logits, preds[..., None], 2.0, axis=-1)
    batch = {"targets": targets, "loss_mask": mask, "bucket": np.array([1, 0, 1], np.int32)}
    return logits, preds, batch


def test_hand_made_logits():
    logits, _, batch = _hand_made()
    metrics = recall_accuracy(logits, batch, bucket_names=["easy", "hard"])
    assert metrics == {
        "accuracy": 5 / 7,
        "answers": 7,
        "accuracy/easy": 3 / 4,
        "answers/easy": 4,
        "accuracy/hard": 2 / 3,
        "answers/hard": 3,
    }


def test_predictions_equal_logits_and_ids_name_unnamed_buckets():
    logits, preds, batch = _hand_made()
    assert recall_accuracy(preds, batch) == recall_accuracy(logits, batch, bucket_names=["0", "1"])
    no_bucket = {k: v for k, v in batch.items() if k != "bucket"}
    assert recall_accuracy(preds, no_bucket) == {
        "accuracy": 5 / 7,
        "answers": 7,
        "accuracy/0": 5 / 7,
        "answers/0": 7,
    }


def test_counts_under_jit_match_numpy():
    logits, _, batch = _hand_made()
    counts = jax.jit(recall_counts, static_argnums=2)(
        jnp.asarray(logits), jax.tree.map(jnp.asarray, batch), 3
    )
    np.testing.assert_array_equal(counts[0], [3, 2, 0])
    np.testing.assert_array_equal(counts[1], [4, 3, 0])
    # Summed over batches, then turned into metrics; an empty bucket is left out.
    metrics = recall_metrics(2 * counts[0], 2 * counts[1], ["a", "b", "c"])
    assert metrics["answers"] == 14 and "accuracy/c" not in metrics


def test_errors_and_empty():
    _, preds, batch = _hand_made()
    with pytest.raises(ValueError, match="num_buckets"):
        recall_counts(preds, batch, 1)
    with pytest.raises(ValueError, match="logits_or_predictions"):
        recall_counts(preds[0], batch)
    with pytest.raises(ValueError, match="bucket_names"):
        recall_metrics(np.zeros(2), np.zeros(2), ["one"])
    empty = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    metrics = recall_accuracy(preds, empty)
    assert np.isnan(metrics["accuracy"]) and metrics["answers"] == 0
