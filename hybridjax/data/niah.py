"""Synthetic needle-in-a-haystack (NIAH) for long-context recall.

Token ids: 0 PAD, 1 NEEDLE, 2 QUERY; every other id in [3, vocab_size) is an ordinary token.
An example of length L (its context length):

  haystack  positions 0 .. L-3: random ordinary tokens (the filler), holding the needle
            NEEDLE key value at start round(depth * (L - 5)): depth 0 is the first position,
            depth 1 ends the needle just before the query; `num_distractors` more needles with
            other keys sit at random places that do not overlap it
  query     positions L-2, L-1: QUERY key

The answer is due at the last position (the query key): target = the needle's value, the only
position with loss_mask 1. Buckets are the grid context_lens x depths; the eval split may have a
grid of its own (`eval_context_lens` x `eval_depths`: train short, test recall at length).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from hybridjax.data._checks import as_tuple, bucket_lengths, check_fraction, check_positive

PAD, NEEDLE, QUERY = 0, 1, 2
FIRST_ORDINARY = 3
NEEDLE_LEN, QUERY_LEN = 3, 2


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
    """NIAH task; `context_lens=None` means the row length given to make_dataset. The eval
    split's grid is eval_context_lens x eval_depths (None = as in training)."""

    vocab_size: int = 256
    context_lens: tuple[int, ...] | None = None
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_context_lens: tuple[int, ...] | None = None
    eval_depths: tuple[float, ...] | None = None
    num_distractors: int = 0
    num_eval_examples: int = 1000

    def __post_init__(self):
        set_ = object.__setattr__
        set_(
            self,
            "context_lens",
            as_tuple("NIAHConfig.context_lens", self.context_lens, int, allow_none=True),
        )
        set_(self, "depths", as_tuple("NIAHConfig.depths", self.depths, float))
        set_(
            self,
            "eval_context_lens",
            as_tuple("NIAHConfig.eval_context_lens", self.eval_context_lens, int, allow_none=True),
        )
        set_(
            self,
            "eval_depths",
            as_tuple("NIAHConfig.eval_depths", self.eval_depths, float, allow_none=True),
        )
        check_positive("NIAHConfig.num_eval_examples", self.num_eval_examples)
        if self.vocab_size < FIRST_ORDINARY + 1 + self.num_distractors:
            raise ValueError(
                f"NIAHConfig.vocab_size: must be >= {FIRST_ORDINARY + 1} + "
                f"num_distractors ({FIRST_ORDINARY} ids are special and every "
                f"needle needs its own key), got {self.vocab_size}"
            )
        if self.num_distractors < 0:
            raise ValueError(
                f"NIAHConfig.num_distractors: must be >= 0, got {self.num_distractors}"
            )
        for field in ("depths", "eval_depths"):
            for depth in getattr(self, field) or ():
                check_fraction(f"NIAHConfig.{field}", depth)
        for field in ("context_lens", "eval_context_lens"):
            for length in getattr(self, field) or ():
                self._check_length(length, field)

    def _check_length(self, length: int, field: str = "context_lens"):
        # Distractors sit on the needle's phase modulo NEEDLE_LEN; the worst phase leaves
        # (length - 7) // 3 places besides the needle's own.
        need = NEEDLE_LEN * self.num_distractors + 7 if self.num_distractors else 5
        if length < need:
            raise ValueError(
                f"NIAHConfig.{field}: {length} is too short for a needle, "
                f"{self.num_distractors} distractors and the query (needs >= {need})"
            )

    def buckets(
        self, seq_len: int | None = None, split: str = "train"
    ) -> tuple[tuple[int, float], ...]:
        """(context length, depth) per bucket of `split`. `seq_len` is the row length: it stands
        in for lengths of None and must hold every example."""
        evaluating = split == "eval" and self.eval_context_lens is not None
        field = "eval_context_lens" if evaluating else "context_lens"
        lengths = getattr(self, field)
        if lengths is None and seq_len is not None:
            self._check_length(seq_len)
        lengths = bucket_lengths(lengths, seq_len, f"NIAHConfig.{field}", "NIAH")
        depths = (
            self.eval_depths if split == "eval" and self.eval_depths is not None else self.depths
        )
        return tuple(itertools.product(lengths, depths))

    @staticmethod
    def bucket_name(bucket: tuple[int, float]) -> str:
        return f"len={bucket[0]},depth={bucket[1]:.2f}"

    def generate(self, rng: np.random.Generator, bucket: tuple[int, float]) -> dict:
        context_len, depth = bucket
        return niah_example(
            rng,
            vocab_size=self.vocab_size,
            context_len=context_len,
            depth=depth,
            num_distractors=self.num_distractors,
        )


def needle_position(context_len: int, depth: float) -> int:
    """Index of the NEEDLE marker for a depth in [0, 1]."""
    return round(depth * (context_len - QUERY_LEN - NEEDLE_LEN))


def niah_example(
    rng: np.random.Generator,
    *,
    vocab_size: int,
    context_len: int,
    depth: float,
    num_distractors: int = 0,
) -> dict:
    """One example: {"tokens", "targets"} int32 (context_len,), "loss_mask" float32."""
    tokens = rng.integers(FIRST_ORDINARY, vocab_size, size=context_len + 1).astype(np.int32)
    num_needles = 1 + num_distractors
    keys = FIRST_ORDINARY + rng.permutation(vocab_size - FIRST_ORDINARY)[:num_needles]
    values = rng.integers(FIRST_ORDINARY, vocab_size, size=num_needles)

    start = needle_position(context_len, depth)
    if num_distractors:
        # Other starts on the needle's phase modulo NEEDLE_LEN never overlap it or each other.
        last = context_len - QUERY_LEN - NEEDLE_LEN
        places = np.arange(start % NEEDLE_LEN, last + 1, NEEDLE_LEN)
        places = places[places != start]
        starts = np.concatenate([[start], rng.choice(places, num_distractors, replace=False)])
    else:
        starts = np.array([start])
    tokens[starts] = NEEDLE
    tokens[starts + 1] = keys
    tokens[starts + 2] = values
    tokens[context_len - 2] = QUERY
    tokens[context_len - 1] = keys[0]

    targets = tokens[1:].copy()
    targets[-1] = values[0]
    loss_mask = np.zeros(context_len, np.float32)
    loss_mask[-1] = 1.0
    return {"tokens": tokens[:-1], "targets": targets, "loss_mask": loss_mask}
