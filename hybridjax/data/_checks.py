"""Field checks shared by the data configs: each error names the field and what is allowed."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from hybridjax.config import _check_choice as check_choice  # noqa: F401  (re-exported)
from hybridjax.config import _check_positive as check_positive  # noqa: F401


def as_tuple(name: str, value, kind: type, *, allow_none: bool = False):
    """A scalar or a sequence (list, tuple, Hydra ListConfig) -> non-empty tuple of `kind`."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: must be given")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values:
        raise ValueError(f"{name}: must hold at least one value")
    allowed = {int: numbers.Integral, float: numbers.Real}.get(kind, kind)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, allowed):
            raise ValueError(f"{name}: expected {kind.__name__} values, got {v!r}")  # noqa: TRY004
    return tuple(kind(v) for v in values)


def check_fraction(name: str, value, *, closed_low=True, closed_high=True):
    ok_low = value >= 0 if closed_low else value > 0
    ok_high = value <= 1 if closed_high else value < 1
    if not (ok_low and ok_high):
        low, high = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ValueError(f"{name}: must be in {low}0, 1{high}, got {value!r}")


def bucket_lengths(lengths, seq_len, field: str, task: str) -> tuple:
    """The example lengths of a task's buckets: `lengths` (field `field`), or, when None, the row
    length `seq_len` alone (examples fill the row); every length must fit in `seq_len`."""
    if seq_len is not None and lengths is not None and max(lengths) > seq_len:
        raise ValueError(f"seq_len: {seq_len} is shorter than {field} ({max(lengths)})")
    if lengths is None:
        if seq_len is None:
            raise ValueError(
                f"seq_len: needed to name {task} buckets when {field} is None "
                "(examples then fill the row)"
            )
        return (seq_len,)
    return tuple(lengths)
