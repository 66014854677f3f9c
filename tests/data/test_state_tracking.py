"""State tracking (running parity, sums mod m): targets recomputed with NumPy, lengths, eval
buckets longer than training, determinism, and config errors that name the field."""

import numpy as np
import pytest

from hybridjax.data import (
    StateTrackingConfig,
    bucket_names,
    config_from_dict,
    make_dataset,
    state_tracking_example,
)


def running_state(tokens, modulus):
    """The reference: tokens are 1 + symbol; the state after each position, as 1 + state."""
    state, out = 0, []
    for t in tokens:
        state = (state + int(t) - 1) % modulus
        out.append(1 + state)
    return np.array(out)


@pytest.mark.parametrize("modulus", [2, 5])
@pytest.mark.parametrize("length", [1, 7, 64, 1024])
def test_example_targets_are_the_running_state(modulus, length):
    rng = np.random.default_rng(modulus * 1000 + length)
    ex = state_tracking_example(rng, modulus=modulus, length=length)
    assert ex["tokens"].shape == ex["targets"].shape == ex["loss_mask"].shape == (length,)
    assert ex["tokens"].dtype == ex["targets"].dtype == np.int32
    assert 1 <= ex["tokens"].min() and ex["tokens"].max() <= modulus
    np.testing.assert_array_equal(ex["targets"], running_state(ex["tokens"], modulus))
    assert (ex["loss_mask"] == 1).all()
    last = state_tracking_example(
        np.random.default_rng(0), modulus=modulus, length=length, answers="last"
    )
    assert np.flatnonzero(last["loss_mask"]).tolist() == [length - 1]


def test_parity_is_the_xor_of_the_bits():
    ex = state_tracking_example(np.random.default_rng(3), modulus=2, length=300)
    bits = ex["tokens"] - 1
    np.testing.assert_array_equal(ex["targets"] - 1, np.bitwise_xor.accumulate(bits))
    assert set(np.unique(bits)) == {0, 1}


def test_pipeline_trains_short_and_evaluates_long_buckets():
    config = StateTrackingConfig(
        task="modular_add",
        modulus=5,
        eval_lens=(16, 64, 128),
        eval_answers="last",
        num_eval_examples=9,
    )
    assert config.vocab_size == 6
    assert bucket_names(config, 32) == ["len=32"]
    assert bucket_names(config, 128, "eval") == ["len=16", "len=64", "len=128"]
    train = next(iter(make_dataset(config, split="train", seed=1, batch_size=4, seq_len=32)))
    assert train["tokens"].shape == (4, 32) and (train["segment_ids"] == 1).all()
    for row in range(4):
        np.testing.assert_array_equal(train["targets"][row], running_state(train["tokens"][row], 5))
    assert (train["loss_mask"] == 1).all()

    batches = list(make_dataset(config, split="eval", seed=1, batch_size=4, seq_len=128))
    assert len(batches) == 3
    rows = [
        (b["tokens"][i], b["targets"][i], b["loss_mask"][i], b["segment_ids"][i], b["bucket"][i])
        for b in batches
        for i in range(4)
    ][:9]
    for i, (tokens, targets, mask, segments, bucket) in enumerate(rows):
        length = (16, 64, 128)[i % 3]
        assert bucket == i % 3 and segments.sum() == length
        assert (tokens[length:] == 0).all() and (mask[length:] == 0).all()
        assert np.flatnonzero(mask).tolist() == [length - 1]
        np.testing.assert_array_equal(targets[:length], running_state(tokens[:length], 5))
    with pytest.raises(ValueError, match="seq_len"):
        make_dataset(config, split="eval", seed=1, batch_size=4, seq_len=64)


def test_deterministic_for_a_seed_and_different_across_seeds_and_splits():
    config = StateTrackingConfig(train_lens=(8, 16))

    def first(seed, split="train"):
        return next(iter(make_dataset(config, split=split, seed=seed, batch_size=4, seq_len=16)))

    a, b, c = first(0), first(0), first(1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert not np.array_equal(a["tokens"], first(0, "eval")["tokens"])
    assert a["segment_ids"].sum(1).tolist() == [8, 16, 8, 16]


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"task": "xor"}, "StateTrackingConfig.task"),
        ({"task": "parity", "modulus": 3}, "StateTrackingConfig.modulus"),
        ({"task": "modular_add", "modulus": 1}, "StateTrackingConfig.modulus"),
        ({"modulus": 2.0}, "StateTrackingConfig.modulus"),
        ({"vocab_size": 2}, "StateTrackingConfig.vocab_size"),
        ({"train_lens": [16, 0]}, "StateTrackingConfig.train_lens"),
        ({"eval_lens": ["64"]}, "StateTrackingConfig.eval_lens"),
        ({"answers": "first"}, "StateTrackingConfig.answers"),
        ({"eval_answers": "some"}, "StateTrackingConfig.eval_answers"),
        ({"num_eval_examples": 0}, "StateTrackingConfig.num_eval_examples"),
    ],
)
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        config_from_dict({"kind": "state_tracking", **fields})
