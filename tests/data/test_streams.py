"""Chunked row streams (trainer.state_passing): each row's windows are exactly consecutive
windows of its documents, the flags say where a document continues, and the state resumes
exactly."""

import json

import grain
import numpy as np
import pytest

from hybridjax.data import MemmapConfig, NIAHConfig, TextConfig, make_dataset
from hybridjax.data.streams import ChunkedStreams

LENGTHS = [5, 12, 0, 3, 8, 20, 7, 1, 16, 9, 4, 11]  # an empty document (skipped) among them


def document(i):
    n = LENGTHS[i % len(LENGTHS)]
    tokens = 1000 * i + np.arange(n, dtype=np.int32)
    loss_mask = np.ones(n, np.float32)
    loss_mask[-1:] = 0
    return {"tokens": tokens, "targets": tokens + 1, "loss_mask": loss_mask}


def documents():
    return grain.MapDataset.range(10_000).map(document)


def test_rows_are_consecutive_windows_of_their_documents():
    """Row r of batches 0, 1, 2, ... laid end to end is documents r, r + B, ... laid end to end;
    segment ids restart per document piece, `continues` is 1 exactly where a row's first token
    is inside a document; targets run on across window edges."""
    b, seq_len, steps = 3, 8, 12
    it = iter(ChunkedStreams(documents(), b, seq_len))
    batches = [next(it) for _ in range(steps)]
    for batch in batches:
        assert batch["tokens"].shape == batch["segment_ids"].shape == (b, seq_len)
        assert batch["continues"].shape == (b,) and batch["continues"].dtype == np.int32
        assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    for r in range(b):
        row = {
            k: np.concatenate([x[k][r] for x in batches])
            for k in ("tokens", "targets", "loss_mask")
        }
        docs = [document(i) for i in range(r, 10_000, b)]
        want = {k: np.concatenate([d[k] for d in docs]) for k in ("tokens", "targets", "loss_mask")}
        for key, value in want.items():
            np.testing.assert_array_equal(row[key], value[: steps * seq_len], err_msg=key)
        doc_of = row["tokens"] // 1000
        for t, batch in enumerate(batches):
            chunk = doc_of[t * seq_len : (t + 1) * seq_len]
            starts = np.concatenate([[0], np.flatnonzero(np.diff(chunk)) + 1])
            segments = np.repeat(np.arange(1, len(starts) + 1), np.diff([*starts, seq_len]))
            np.testing.assert_array_equal(batch["segment_ids"][r], segments)
            continues = t > 0 and doc_of[t * seq_len - 1] == doc_of[t * seq_len]
            assert batch["continues"][r] == continues, (r, t)
    flags = np.stack([x["continues"] for x in batches])
    assert flags[1:].any() and not flags[1:].all()  # both cases occur
    assert not flags[0].any()


def text_config(tmp_path):
    words = ["alpha", "beta gamma", "delta", "epsilon zeta eta theta iota", "kappa", "lambda mu"]
    text = "\n\n".join(f"{w} {i} " * (1 + i % 7) for i, w in enumerate(words * 6))
    (tmp_path / "c.txt").write_text(text)
    return TextConfig(paths=(str(tmp_path / "c.txt"),), doc_separator="\n\n")


@pytest.mark.parametrize("kind", ["text", "niah"])
def test_state_resumes_exactly(tmp_path, kind):
    """A stream restored from a JSON round trip of its state goes on as the original does."""
    config = (
        text_config(tmp_path)
        if kind == "text"
        else NIAHConfig(vocab_size=32, context_lens=(20, 40), depths=(0.0, 1.0))
    )
    ds = make_dataset(config, split="train", seed=3, batch_size=2, seq_len=16, streams=True)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    other = iter(
        make_dataset(config, split="train", seed=3, batch_size=2, seq_len=16, streams=True)
    )
    other.set_state(state)
    for a, b in zip(want, [next(other) for _ in range(4)], strict=True):
        assert a.keys() == b.keys() == {*want[0]}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(batch["continues"].any() for batch in want)


def test_niah_documents_may_be_longer_than_a_row():
    """A needle example of 40 tokens spans several 16-token rows: its one answer comes in the
    row where the example ends."""
    config = NIAHConfig(vocab_size=32, context_lens=(40,), depths=(0.5,))
    it = iter(make_dataset(config, split="train", seed=0, batch_size=1, seq_len=16, streams=True))
    rows = [next(it) for _ in range(5)]  # 80 tokens: two examples
    mask = np.concatenate([r["loss_mask"][0] for r in rows])
    np.testing.assert_array_equal(np.flatnonzero(mask), [39, 79])
    assert [int(r["continues"][0]) for r in rows] == [0, 1, 1, 1, 1]


def test_streams_refuse_what_they_cannot_stream(tmp_path):
    config = NIAHConfig(vocab_size=32)
    with pytest.raises(ValueError, match="streams: only the train split"):
        make_dataset(config, split="eval", seed=0, batch_size=2, seq_len=16, streams=True)
    it = iter(make_dataset(config, split="train", seed=0, batch_size=2, seq_len=16, streams=True))
    with pytest.raises(ValueError, match="streams: the state holds 3 row positions"):
        it.set_state({"rows": [[0, 0]] * 3})


def test_token_file_rows_read_their_spans_window_after_window(tmp_path):
    """Memmap data: row g reads span g of the training range from a seeded window on, wrapping
    at its end; `continues` is 0 at the first window, at a wrap and after a window ending in
    EOS; a restored state goes on the same."""
    eos = 1
    tokens = (np.arange(1000) % 7 + 2).astype(np.int32)
    tokens[::13] = eos
    np.save(tmp_path / "t.npy", tokens)
    config = MemmapConfig(path=str(tmp_path / "t.npy"), vocab_size=16, eos_id=eos)

    def make():
        return make_dataset(config, split="train", seed=1, batch_size=2, seq_len=8, streams=True)

    ds = make()
    it = iter(ds)
    batches = [next(it) for _ in range(70)]
    span = round(1000 * 0.99) // 2  # the train range (eval_fraction 0.01) in two spans
    windows = (span - 1) // 8
    for g, offset in enumerate(ds.offsets):
        for t, batch in enumerate(batches):
            w = (offset + t) % windows
            lo = g * span + 8 * w
            np.testing.assert_array_equal(batch["tokens"][g], tokens[lo : lo + 8])
            np.testing.assert_array_equal(batch["targets"][g], tokens[lo + 1 : lo + 9])
            want = t > 0 and w > 0 and tokens[lo - 1] != eos
            assert batch["continues"][g] == want, (g, t)
    flags = np.stack([b["continues"] for b in batches])
    assert flags.any() and not flags[1:].all()
    assert (np.array(ds.offsets) + 69 >= windows).any()  # a wrap happened
    state = json.loads(json.dumps(it.get_state()))
    other = iter(make())
    other.set_state(state)
    for _ in range(3):
        a, b = next(it), next(other)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
