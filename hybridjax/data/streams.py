"""Chunked document streams: batches for state passing between steps (truncated BPTT).

Each of a batch's B rows is a stream of its own, an endless run of documents one after another,
and the row of batch t is the seq_len tokens after the row of batch t-1: a document longer than
a row continues in the same row of the next batch, where the trainer hands the model the
recurrent state the previous chunk ended with (`trainer.state_passing`). Row r of a stream reads
documents r, r + B, r + 2B, ... of the (shuffled, repeated) document sequence.

A batch has the keys of the pipeline's contract (`hybridjax.data.pipeline`) and one more:

  tokens, targets   (B, L) int32: targets are the documents' own, so a row's last target is the
                    next token of its document even when that token opens the next batch's row
  loss_mask         (B, L) float32: the documents' own (0 at every document's last token)
  segment_ids       (B, L) int32: 1, 2, ... per document piece in the row; never 0 (no padding)
  continues         (B,) int32: 1 where the row's first token continues the document the row's
                    previous chunk ended in (its state carries over), 0 where a document starts
                    there (the state starts from zero)

Everything is a function of the documents and of each row's position (document, offset), the
JSON-able iterator state, so a stream resumed from `get_state()` continues exactly.

A token file (memmap data) has no documents to deal out: `SpanStreams` gives each row a
contiguous span of it instead, read window after window from a seeded starting window and
wrapping around at the span's end (a new document there); with an `eos_id` a window that
follows an EOS starts a new document.
"""

from __future__ import annotations

import grain
import numpy as np

FIELDS = ("tokens", "targets", "loss_mask")
DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32}


class ChunkedStreams(grain.IterDataset):
    """`batch_size` row streams over `documents` (a random-access grain MapDataset of dicts with
    FIELDS, 1-D arrays of one length; None or empty documents are skipped), cut into rows of
    `seq_len` tokens (module docstring)."""

    def __init__(self, documents: grain.MapDataset, batch_size: int, seq_len: int):
        super().__init__()
        self.documents, self.batch_size, self.seq_len = documents, batch_size, seq_len

    def __iter__(self) -> StreamIterator:
        return StreamIterator(self)


class StreamIterator(grain.DatasetIterator):
    def __init__(self, streams: ChunkedStreams):
        super().__init__()
        b = streams.batch_size
        self.rows = [streams.documents[r::b] for r in range(b)]
        self.seq_len = streams.seq_len
        self.positions = [(0, 0)] * b  # per row: (its document index, token offset in it)
        self.current = [None] * b  # per row: (document index, document) last read

    def __next__(self) -> dict:
        rows = [self._row(r) for r in range(len(self.rows))]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def get_state(self) -> dict:
        return {"rows": [list(p) for p in self.positions]}

    def set_state(self, state: dict) -> None:
        positions = [tuple(int(v) for v in p) for p in state["rows"]]
        if len(positions) != len(self.rows):
            raise ValueError(
                f"streams: the state holds {len(positions)} row positions, this stream has "
                f"{len(self.rows)} rows; resume with the batch size it was saved with"
            )
        self.positions = positions
        self.current = [None] * len(self.rows)

    def _document(self, row: int, index: int):
        if self.current[row] is None or self.current[row][0] != index:
            self.current[row] = (index, self.rows[row][index])
        return self.current[row][1]

    def _row(self, row: int) -> dict:
        index, offset = self.positions[row]
        out = {"continues": np.int32(offset > 0)}
        pieces = {key: [] for key in (*FIELDS, "segment_ids")}
        need, segment = self.seq_len, 1
        while need:
            doc = self._document(row, index)
            n = 0 if doc is None else len(doc["tokens"])
            take = min(need, n - offset)
            if take > 0:
                for key in FIELDS:
                    pieces[key].append(np.asarray(doc[key][offset : offset + take]))
                pieces["segment_ids"].append(np.full(take, segment, np.int32))
                need, offset = need - take, offset + take
            if offset >= n:  # the document ends here: the next one is a new segment
                index, offset, segment = index + 1, 0, segment + (take > 0)
        self.positions[row] = (index, offset)
        for key, parts in pieces.items():
            out[key] = np.concatenate(parts).astype(DTYPES.get(key, np.int32))
        return out


class SpanStreams(grain.IterDataset):
    """Row streams over a token file: global row g of `row_count` (this shard's rows are
    `first_row`, ... + batch_size - 1) reads span g of `windows`' range, a `TokenWindows`
    factory `windows(start, stop)` (module docstring)."""

    def __init__(self, windows, start, stop, *, first_row, row_count, batch_size, seed):
        super().__init__()
        span = (stop - start) // row_count
        self.rows = [
            windows(start + g * span, start + (g + 1) * span)
            for g in range(first_row, first_row + batch_size)
        ]
        if not len(self.rows[0]):
            raise ValueError(
                f"streams: {row_count} rows leave each row a span of {span} tokens, shorter "
                f"than one row of seq_len + 1 = {self.rows[0].seq_len + 1}"
            )
        rng = np.random.default_rng(seed)
        self.offsets = [int(rng.integers(len(w))) for w in self.rows]

    def __iter__(self) -> SpanIterator:
        return SpanIterator(self)


class SpanIterator(grain.DatasetIterator):
    def __init__(self, streams: SpanStreams):
        super().__init__()
        self.rows, self.offsets, self.step = streams.rows, streams.offsets, 0

    def __next__(self) -> dict:
        rows = []
        for windows, offset in zip(self.rows, self.offsets):
            index = (offset + self.step) % len(windows)
            row = windows[index]
            continues = self.step > 0 and index > 0
            if continues and windows.eos_id is not None:  # did the previous window end one?
                continues = windows.token(index * windows.seq_len - 1) != windows.eos_id
            rows.append({**row, "continues": np.int32(continues)})
        self.step += 1
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def text_document(tokens: np.ndarray, pad_id: int) -> dict:
    """A tokenized document ([BOS] ... [EOS]) as stream fields: each token's target is the next
    one of the document; the last has none (pad_id, loss_mask 0)."""
    tokens = np.asarray(tokens, np.int32)
    targets = np.append(tokens[1:], np.int32(pad_id)).astype(np.int32)
    loss_mask = np.ones(tokens.shape, np.float32)
    loss_mask[-1:] = 0.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
