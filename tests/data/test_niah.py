"""Needle in a haystack: the needle sits at the requested depth; the query asks for its value."""

import numpy as np
import pytest

from hybridjax.data import NIAHConfig, bucket_names, make_dataset, niah_example
from hybridjax.data.niah import NEEDLE, QUERY, needle_position


@pytest.mark.parametrize("context_len", [16, 100, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_at_depth(context_len, depth):
    rng = np.random.default_rng(0)
    for _ in range(10):
        ex = niah_example(rng, vocab_size=64, context_len=context_len, depth=depth)
        tokens, targets, mask = ex["tokens"], ex["targets"], ex["loss_mask"]
        assert tokens.shape == (context_len,)
        pos = needle_position(context_len, depth)
        assert pos == round(depth * (context_len - 5))
        assert np.flatnonzero(tokens == NEEDLE).tolist() == [pos]
        assert np.flatnonzero(tokens == QUERY).tolist() == [context_len - 2]
        assert tokens[pos + 1] == tokens[-1], "the query asks for the needle's key"
        assert targets[-1] == tokens[pos + 2], "the answer is the needle's value"
        assert np.flatnonzero(mask).tolist() == [context_len - 1]
        assert tokens.min() >= 1 and tokens.max() < 64
    if depth == 0.0:
        assert pos == 0
    if depth == 1.0:
        assert pos + 3 == context_len - 2, "depth 1 ends the needle right before the query"


def test_distractors_do_not_overlap_and_have_other_keys():
    rng = np.random.default_rng(1)
    for depth in (0.0, 0.5, 1.0):
        for _ in range(20):
            ex = niah_example(rng, vocab_size=256, context_len=40, depth=depth, num_distractors=10)
            tokens = ex["tokens"]
            starts = np.flatnonzero(tokens == NEEDLE)
            assert len(starts) == 11 and np.all(np.diff(starts) >= 3)
            keys = tokens[starts + 1]
            assert len(set(keys.tolist())) == 11
            target = starts[keys == tokens[-1]]
            assert target.tolist() == [needle_position(40, depth)]
            assert ex["targets"][-1] == tokens[target[0] + 2]


def test_grid_buckets_padded_to_row():
    config = NIAHConfig(vocab_size=128, context_lens=(32, 64), depths=(0.0, 1.0))
    names = bucket_names(config, 64)
    assert names == [
        "len=32,depth=0.00",
        "len=32,depth=1.00",
        "len=64,depth=0.00",
        "len=64,depth=1.00",
    ]
    batch = next(iter(make_dataset(config, split="eval", seed=0, batch_size=8, seq_len=64)))
    for row in range(8):
        length, depth = config.buckets(64)[batch["bucket"][row]]
        tokens = batch["tokens"][row]
        assert tokens[needle_position(length, depth)] == NEEDLE
        assert np.flatnonzero(batch["loss_mask"][row]).tolist() == [length - 1]
        np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(64) < length)


def test_context_lens_default_to_the_row():
    assert NIAHConfig(depths=0.5).buckets(4096) == ((4096, 0.5),)


def test_eval_grid_reaches_other_lengths():
    """Train at the row length, evaluate a grid of longer contexts x the same depths."""
    config = NIAHConfig(
        vocab_size=64,
        depths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        eval_context_lens=(16, 64),
        eval_depths=(0.0, 0.5, 1.0),
    )
    assert config.buckets(16) == tuple((16, d) for d in config.depths)
    assert bucket_names(config, 64, split="eval") == [
        "len=16,depth=0.00",
        "len=16,depth=0.50",
        "len=16,depth=1.00",
        "len=64,depth=0.00",
        "len=64,depth=0.50",
        "len=64,depth=1.00",
    ]
    train = next(iter(make_dataset(config, split="train", seed=0, batch_size=4, seq_len=16)))
    assert train["tokens"].shape == (4, 16) and set(train["bucket"]) <= set(range(6))
    batch = next(iter(make_dataset(config, split="eval", seed=0, batch_size=12, seq_len=64)))
    for row in range(12):
        length, depth = config.buckets(64, split="eval")[batch["bucket"][row]]
        assert batch["tokens"][row][needle_position(length, depth)] == NEEDLE
        assert np.flatnonzero(batch["loss_mask"][row]).tolist() == [length - 1]
    assert {int(b) for b in batch["bucket"]} == set(range(6))
    with pytest.raises(
        ValueError,
        match=r"seq_len: 32 is shorter than "
        r"NIAHConfig.eval_context_lens \(64\)",
    ):
        make_dataset(config, split="eval", seed=0, batch_size=4, seq_len=32)
    with pytest.raises(ValueError, match="NIAHConfig.eval_context_lens: 4 is too short"):
        NIAHConfig(eval_context_lens=(4, 64))
    with pytest.raises(ValueError, match=r"NIAHConfig.eval_depths: must be in \[0, 1\]"):
        NIAHConfig(eval_depths=(0.5, 2.0))
    assert NIAHConfig(depths=0.5, eval_depths=(0.0, 1.0)).buckets(32, "eval") == (
        (32, 0.0),
        (32, 1.0),
    )
