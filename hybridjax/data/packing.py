"""Sequence packing: documents concatenated into fixed-length rows with segment ids.

Built on grain's own `ConcatThenSplitIterDataset` (documents run on across rows, no padding but
at the very end of a finite stream). From each packed row we derive the batch contract:

  tokens       the row; positions past the end of the stream hold `pad_id`
  segment_ids  1, 2, ... per document piece in the row (restarting every row); 0 on padding
  targets      the next token of the same segment, else `pad_id`
  loss_mask    1 where the target is the next token of the same document, so 0 at the last
               token of every document piece (a target never crosses a document boundary) and on
               padding. A document split across rows loses the one target at its row's end.
"""

from __future__ import annotations

import functools

import grain
import numpy as np


def pack_documents(documents: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
    """1-D int arrays (one per document, BOS/EOS already added) -> rows of the batch contract."""
    rows = _JsonSafeConcatThenSplit(
        documents.map(lambda doc: {"tokens": doc}), length_struct={"tokens": seq_len}
    )
    return rows.map(functools.partial(row_to_example, pad_id=pad_id))


def row_to_example(row: dict, pad_id: int) -> dict:
    """{"tokens", "tokens_segment_ids"} from grain's packer -> tokens/targets/loss_mask/segment_ids."""
    segment_ids = np.asarray(row["tokens_segment_ids"], dtype=np.int32)
    tokens = np.where(segment_ids > 0, row["tokens"], pad_id).astype(np.int32)
    same_doc = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0)
    targets = np.full_like(tokens, pad_id)
    targets[:-1] = np.where(same_doc, tokens[1:], pad_id)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:-1] = same_doc
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
    }


class _JsonSafeConcatThenSplit(grain.experimental.ConcatThenSplitIterDataset):
    """grain 0.2.18's ConcatThenSplit, with a state that survives a JSON round trip.

    Its state holds slices as tuples and tests `slice != (-1, -1)`; grain's orbax handler stores
    states as JSON, which turns the tuples into lists, so a restored iterator sees a phantom
    remainder and silently drops one document. Turning the lists back into tuples mends it.
    """

    def __iter__(self):
        return _TupleSlicesIterator(super().__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})
