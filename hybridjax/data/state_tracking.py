"""State tracking: running parity and running sums modulo m (the tasks of Mamba-3's ablations).

An example of length L: symbols x_0 .. x_{L-1} drawn uniformly from [0, m) (m = 2 for parity).
Token ids: 0 PAD, 1 + symbol; targets 1 + state, where the state after position i is
s_i = (x_0 + ... + x_i) mod m. With `answers="all"` every position is an answer (loss_mask 1),
with "last" only the final one (the state of the whole sequence).

Buckets are example lengths: `train_lens` for training (None: the row length) and `eval_lens`
for the held-out split (None: as in training), so a model trained at <= 64 tokens is tested at
64 .. 1024 (`trainer.eval_seq_len` must hold the longest). `eval_answers` sets the held-out
answers separately (None: as `answers`): train on every prefix, test the final state.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hybridjax.data._checks import as_tuple, bucket_lengths, check_choice, check_positive

PAD = 0
TASKS = ("parity", "modular_add")
ANSWERS = ("all", "last")


@dataclasses.dataclass(frozen=True)
class StateTrackingConfig:
    """Running parity (`task="parity"`, modulus 2) or running sum mod `modulus`
    (`task="modular_add"`). `vocab_size` None means the ids the task uses (modulus + 1)."""

    task: str = "parity"
    modulus: int = 2
    vocab_size: int | None = None
    train_lens: tuple[int, ...] | None = None
    eval_lens: tuple[int, ...] | None = None
    answers: str = "all"
    eval_answers: str | None = None
    num_eval_examples: int = 512

    def __post_init__(self):
        set_ = object.__setattr__
        name = "StateTrackingConfig"
        check_choice(f"{name}.task", self.task, TASKS)
        check_choice(f"{name}.answers", self.answers, ANSWERS)
        if self.eval_answers is not None:
            check_choice(f"{name}.eval_answers", self.eval_answers, ANSWERS)
        if isinstance(self.modulus, bool) or not isinstance(self.modulus, int):
            raise ValueError(f"{name}.modulus: must be an int, got {self.modulus!r}")  # noqa: TRY004
        if self.task == "parity" and self.modulus != 2:
            raise ValueError(f"{name}.modulus: parity is a sum modulo 2, got {self.modulus}")
        if self.modulus < 2:
            raise ValueError(f"{name}.modulus: must be >= 2, got {self.modulus}")
        if self.vocab_size is None:
            set_(self, "vocab_size", self.modulus + 1)
        elif self.vocab_size < self.modulus + 1:
            raise ValueError(
                f"{name}.vocab_size: must be >= modulus + 1 = {self.modulus + 1} (id 0 is "
                f"padding, 1 .. modulus the symbols and states), got {self.vocab_size}"
            )
        check_positive(f"{name}.num_eval_examples", self.num_eval_examples)
        for field in ("train_lens", "eval_lens"):
            lengths = as_tuple(f"{name}.{field}", getattr(self, field), int, allow_none=True)
            set_(self, field, lengths)
            for length in lengths or ():
                check_positive(f"{name}.{field}", length)

    def buckets(self, seq_len: int | None = None, split: str = "train") -> tuple:
        """(length, answers) per bucket of `split`. `seq_len` is the row length: it stands in
        for lengths of None and must hold every example."""
        evaluating = split == "eval"
        field = "eval_lens" if evaluating and self.eval_lens is not None else "train_lens"
        lengths = bucket_lengths(
            getattr(self, field), seq_len, f"StateTrackingConfig.{field}", "state-tracking"
        )
        answers = self.eval_answers if evaluating and self.eval_answers else self.answers
        return tuple((length, answers) for length in lengths)

    @staticmethod
    def bucket_name(bucket: tuple[int, str]) -> str:
        return f"len={bucket[0]}"

    def generate(self, rng: np.random.Generator, bucket: tuple[int, str]) -> dict:
        length, answers = bucket
        return state_tracking_example(rng, modulus=self.modulus, length=length, answers=answers)


def state_tracking_example(
    rng: np.random.Generator, *, modulus: int, length: int, answers: str = "all"
) -> dict:
    """One example: {"tokens", "targets"} int32 (length,), "loss_mask" float32 (length,)."""
    symbols = rng.integers(0, modulus, size=length)
    states = np.cumsum(symbols) % modulus
    loss_mask = np.ones(length, np.float32)
    if answers == "last":
        loss_mask[:-1] = 0.0
    return {
        "tokens": (1 + symbols).astype(np.int32),
        "targets": (1 + states).astype(np.int32),
        "loss_mask": loss_mask,
    }
