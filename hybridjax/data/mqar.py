"""Multi-query associative recall (MQAR) in the form of Zoology (Arora et al. 2023).

An example of length L with p pairs (Zoology's `multiquery_ar`):

  positions 0 .. 2p-1   k1 v1 k2 v2 ... kp vp      keys from [1, V/2), values from [V/2, V),
                                                   distinct within the example
  positions 2p .. L-1   query region: each key reappears once, at 2p + 2*gap, where the p gaps
                        are drawn without replacement from [0, (L-2p)/2) with P(gap) ~
                        (gap+1)^(power_a-1) (small power_a: queries bunch up near the pairs);
                        the other positions hold random tokens from [0, V)
                        (`random_non_queries`, else 0)

The answer is due at each query key: target = the value that followed that key in the pairs, and
loss_mask is 1 exactly there. Elsewhere the target is the next input token (loss_mask 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hybridjax.data._checks import as_tuple, bucket_lengths, check_positive


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """MQAR task. Difficulty buckets: `num_pairs` zipped with `seq_lens` (one value broadcasts);
    `seq_lens=None` means the row length given to make_dataset."""

    vocab_size: int = 256
    num_pairs: tuple[int, ...] = (8, 16)
    seq_lens: tuple[int, ...] | None = None
    power_a: float = 0.01
    random_non_queries: bool = True
    num_eval_examples: int = 1024

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "num_pairs", as_tuple("MQARConfig.num_pairs", self.num_pairs, int))
        set_(self, "seq_lens", as_tuple("MQARConfig.seq_lens", self.seq_lens, int, allow_none=True))
        for name in ("vocab_size", "power_a", "num_eval_examples"):
            check_positive(f"MQARConfig.{name}", getattr(self, name))
        for p in self.num_pairs:
            check_positive("MQARConfig.num_pairs", p)
            if p > self.vocab_size // 2 - 1:
                raise ValueError(
                    f"MQARConfig.num_pairs: {p} pairs need {p} distinct keys but "
                    f"vocab_size={self.vocab_size} gives only "
                    f"{self.vocab_size // 2 - 1} (keys come from [1, vocab_size/2))"
                )
        if self.seq_lens is not None:
            for length in self.seq_lens:
                check_positive("MQARConfig.seq_lens", length)
            self.buckets(max(self.seq_lens))  # checks the zip and that every bucket fits its pairs

    def buckets(self, seq_len: int | None = None) -> tuple[tuple[int, int], ...]:
        """(num_pairs, example length) per bucket. `seq_len` is the row length: it stands in for
        `seq_lens=None` and must hold every example."""
        lengths = bucket_lengths(self.seq_lens, seq_len, "MQARConfig.seq_lens", "MQAR")
        pairs = self.num_pairs
        if len(pairs) != len(lengths) and 1 not in (len(pairs), len(lengths)):
            raise ValueError(
                f"MQARConfig.seq_lens: {len(lengths)} lengths cannot be zipped with "
                f"{len(pairs)} num_pairs; give one value or as many as num_pairs"
            )
        n = max(len(pairs), len(lengths))
        buckets = tuple(
            zip(
                pairs * n if len(pairs) == 1 else pairs,
                lengths * n if len(lengths) == 1 else lengths,
            )
        )
        for p, length in buckets:
            if 4 * p > length:
                raise ValueError(
                    f"MQARConfig.num_pairs: {p} pairs need a length >= 4 * {p} = "
                    f"{4 * p}, got length {length}"
                )
        return buckets

    @staticmethod
    def bucket_name(bucket: tuple[int, int]) -> str:
        return f"pairs={bucket[0]},len={bucket[1]}"

    def generate(self, rng: np.random.Generator, bucket: tuple[int, int]) -> dict:
        num_pairs, seq_len = bucket
        return mqar_example(
            rng,
            vocab_size=self.vocab_size,
            seq_len=seq_len,
            num_pairs=num_pairs,
            power_a=self.power_a,
            random_non_queries=self.random_non_queries,
        )


def mqar_example(
    rng: np.random.Generator,
    *,
    vocab_size: int,
    seq_len: int,
    num_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> dict:
    """One example: {"tokens", "targets"} int32 (seq_len,), "loss_mask" float32 (seq_len,)."""
    half = vocab_size // 2
    keys = 1 + rng.permutation(half - 1)[:num_pairs]
    values = half + rng.permutation(vocab_size - half)[:num_pairs]
    context = 2 * num_pairs
    space = (seq_len - context) // 2
    # Power-law gaps without replacement: the top-p of log-weights + Gumbel noise is a draw of p
    # distinct items with P ~ weight (the same law as numpy's choice(replace=False, p=...)).
    scores = (power_a - 1.0) * np.log(np.arange(1, space + 1)) + rng.gumbel(size=space)
    gaps = np.argpartition(scores, space - num_pairs)[space - num_pairs :]
    query_pos = context + 2 * gaps

    seq = np.zeros(seq_len + 1, np.int32)  # one longer: the last target is its final token
    seq[0:context:2] = keys
    seq[1:context:2] = values
    seq[query_pos] = keys
    if random_non_queries:
        filler = np.flatnonzero(seq == 0)
        seq[filler] = rng.integers(0, vocab_size, size=filler.size)
    tokens = seq[:-1]
    targets = seq[1:].copy()
    targets[query_pos] = values
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[query_pos] = 1.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
