"""MQAR structure: disjoint key/value halves, answers, loss_mask, power-law gaps, buckets."""

import numpy as np
import pytest

from hybridjax.data import MQARConfig, bucket_names, make_dataset, mqar_example


def _check_example(tokens, targets, loss_mask, vocab_size, num_pairs):
    half = vocab_size // 2
    context = tokens[: 2 * num_pairs]
    keys, values = context[0::2], context[1::2]
    assert np.all((keys >= 1) & (keys < half)), "keys come from [1, V/2)"
    assert np.all((values >= half) & (values < vocab_size)), "values come from [V/2, V)"
    assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
    answers = np.flatnonzero(loss_mask)
    assert set(np.unique(loss_mask)) <= {0.0, 1.0}
    assert len(answers) == num_pairs
    assert np.all(answers >= 2 * num_pairs) and np.all((answers - 2 * num_pairs) % 2 == 0)
    value_of = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(tokens[answers].tolist()) == sorted(keys.tolist()), "each key queried once"
    for pos in answers:
        assert targets[pos] == value_of[int(tokens[pos])]
    # Off the answers, the target is the next input token.
    others = np.setdiff1d(np.arange(len(tokens) - 1), answers)
    np.testing.assert_array_equal(targets[others], tokens[others + 1])
    return answers


@pytest.mark.parametrize(
    "vocab_size,seq_len,num_pairs", [(256, 128, 8), (256, 128, 16), (64, 64, 16), (8192, 256, 32)]
)
def test_structure(vocab_size, seq_len, num_pairs):
    rng = np.random.default_rng(0)
    for _ in range(50):
        ex = mqar_example(rng, vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs)
        assert ex["tokens"].dtype == np.int32 and ex["targets"].dtype == np.int32
        assert ex["loss_mask"].dtype == np.float32 and ex["tokens"].shape == (seq_len,)
        assert ex["tokens"].min() >= 0 and ex["tokens"].max() < vocab_size
        _check_example(ex["tokens"], ex["targets"], ex["loss_mask"], vocab_size, num_pairs)


def test_loss_mask_is_exactly_the_queries_without_random_filler():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ex = mqar_example(rng, vocab_size=128, seq_len=96, num_pairs=6, random_non_queries=False)
        query_region = ex["tokens"][12:]
        np.testing.assert_array_equal(
            np.flatnonzero(query_region) + 12, np.flatnonzero(ex["loss_mask"])
        )


def _gap_fractions_in_first_half(power_a, seq_len=128, num_pairs=8, n=400):
    rng = np.random.default_rng(2)
    space = (seq_len - 2 * num_pairs) // 2
    fractions = []
    for _ in range(n):
        ex = mqar_example(
            rng, vocab_size=256, seq_len=seq_len, num_pairs=num_pairs, power_a=power_a
        )
        gaps = (np.flatnonzero(ex["loss_mask"]) - 2 * num_pairs) // 2
        assert np.all((gaps >= 0) & (gaps < space)) and len(set(gaps)) == num_pairs
        fractions.append(np.mean(gaps < space / 2))
    return float(np.mean(fractions))


def test_power_law_gaps():
    # power_a=1 is uniform: half the queries in the first half of the query region.
    assert abs(_gap_fractions_in_first_half(1.0) - 0.5) < 0.03
    # Zoology's default 0.01 (P ~ gap^-0.99) bunches queries near the pairs.
    assert _gap_fractions_in_first_half(0.01) > 0.65
    # And the smallest gap is far more likely than the largest.
    rng = np.random.default_rng(3)
    counts = np.zeros(56)
    for _ in range(400):
        ex = mqar_example(rng, vocab_size=256, seq_len=128, num_pairs=8)
        counts[(np.flatnonzero(ex["loss_mask"]) - 16) // 2] += 1
    assert counts[:5].sum() > 3 * counts[-5:].sum()


def test_mixed_buckets_in_one_dataset():
    config = MQARConfig(vocab_size=256, num_pairs=(4, 8, 16), seq_lens=(32, 64, 128))
    assert bucket_names(config, 128) == ["pairs=4,len=32", "pairs=8,len=64", "pairs=16,len=128"]
    batch = next(iter(make_dataset(config, split="train", seed=0, batch_size=12, seq_len=128)))
    assert batch["bucket"].tolist() == [0, 1, 2] * 4
    for row in range(12):
        pairs, length = config.buckets(128)[batch["bucket"][row]]
        tokens, targets, mask = (batch[k][row] for k in ("tokens", "targets", "loss_mask"))
        _check_example(tokens[:length], targets[:length], mask[:length], 256, pairs)
        np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(128) < length)
        assert not mask[length:].any() and not tokens[length:].any()


def test_num_pairs_broadcast_against_one_length():
    config = MQARConfig(num_pairs=[4, 8], seq_lens=64)
    assert config.buckets() == ((4, 64), (8, 64))
    assert MQARConfig(num_pairs=8).buckets(128) == ((8, 128),)
