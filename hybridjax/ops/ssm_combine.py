"""The SSM's associative operator, one implementation for every place a state is carried.

A stretch of the recurrence h_t = a_t h_{t-1} + u_t summarises as (a, h): its total decay a
(per batch and head) and the state it ends in when started from zero. Two stretches in a row
compose as

    (a1, h1) o (a2, h2) = (a1 a2, a2 h1 + h2)

which is associative, so stretches may be combined in any grouping: step by step (the
reference), chunk to chunk (`ssd_chunked`), position by position in parallel (`ssd_assoc`) or
device to device (`ssd_sharded`, context parallelism). Decays a (..., h); states (..., h, p, n).
"""


def carry(a, h_in, h_own):
    """The state after a stretch of total decay a entered in h_in, whose own end state is
    h_own: a h_in + h_own."""
    return a[..., None, None] * h_in + h_own


def combine(earlier, later):
    """(a1, h1) o (a2, h2) = (a1 a2, a2 h1 + h2)."""
    a1, h1 = earlier
    a2, h2 = later
    return a1 * a2, carry(a2, h1, h2)
