"""Packing: rows hold every document token once, in order; segment ids and masks per document."""

import json

import grain
import numpy as np
import pytest

from hybridjax.data import pack_documents

PAD = 99


def _docs(seed, n=40, max_len=23):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 90, size=rng.integers(1, max_len)).astype(np.int32) for _ in range(n)]


def _reference(docs, seq_len):
    """Plain python: concatenate, cut into rows of seq_len, number the document pieces per row."""
    stream = [(int(t), d) for d, doc in enumerate(docs) for t in doc]
    rows = []
    for start in range(0, len(stream), seq_len):
        chunk = stream[start : start + seq_len]
        tokens, segments, targets, mask, seg, prev_doc = [], [], [], [], 0, None
        for i, (t, d) in enumerate(chunk):
            if d != prev_doc:
                seg, prev_doc = seg + 1, d
            tokens.append(t)
            segments.append(seg)
            nxt = chunk[i + 1] if i + 1 < len(chunk) else None
            same = nxt is not None and nxt[1] == d
            targets.append(nxt[0] if same else PAD)
            mask.append(1.0 if same else 0.0)
        pad = seq_len - len(chunk)
        rows.append(
            {
                "tokens": tokens + [PAD] * pad,
                "segment_ids": segments + [0] * pad,
                "targets": targets + [PAD] * pad,
                "loss_mask": mask + [0.0] * pad,
            }
        )
    return rows


def _pack(docs, seq_len):
    return pack_documents(grain.MapDataset.source(docs).to_iter_dataset(), seq_len, PAD)


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_packing_matches_reference(seq_len):
    docs = _docs(0)
    rows = list(_pack(docs, seq_len))
    expected = _reference(docs, seq_len)
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert row["tokens"].dtype == np.int32 and row["segment_ids"].dtype == np.int32
        assert row["targets"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
        for key in ref:
            np.testing.assert_array_equal(row[key], ref[key], err_msg=key)
    # No token lost or duplicated: the real positions, in order, are the documents.
    stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(stream, np.concatenate(docs))


def test_targets_never_cross_a_document():
    docs = [np.full(n, i, np.int32) for i, n in enumerate([3, 5, 2, 7, 4], start=1)]
    for row in _pack(docs, 8):
        answered = row["loss_mask"] > 0
        # Docs are constant, so a target from the same document equals its input.
        np.testing.assert_array_equal(row["targets"][answered], row["tokens"][answered])
        last_of_piece = np.append(row["segment_ids"][1:] != row["segment_ids"][:-1], True)
        assert not answered[last_of_piece].any()


def test_state_survives_json_at_every_row():
    """grain 0.2.18's ConcatThenSplit alone drops a document after a JSON round trip."""
    docs = _docs(1, n=15, max_len=9)
    expected = [r["tokens"].tolist() for r in _pack(docs, 6)]
    for n in range(len(expected)):
        it = iter(_pack(docs, 6))
        for _ in range(n):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(_pack(docs, 6))
        fresh.set_state(state)
        assert [r["tokens"].tolist() for r in fresh] == expected[n:], n
