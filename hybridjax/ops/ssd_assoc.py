"""SSD as `lax.associative_scan` over the full (b, l, h, p, n) state: a parallel-in-time oracle.

Each step is the affine map h -> a_t * h + u_t with scalar a_t per (batch, head), composed with
`ssm_combine.combine`. Materialises every state, so it is memory-hungry and slow
on long inputs: a cross-check for the reference, not a training path.
"""

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import document_starts
from hybridjax.ops.ssd_reference import heads_from_groups
from hybridjax.ops.ssm_combine import combine


def ssd_assoc(x, dt, A, B, C, initial_state, segment_ids, acc_dtype):
    """Returns (y (b, l, h, p) in acc_dtype without the D term, final state (b, h, p, n))."""
    h = x.shape[2]
    dt = dt.astype(acc_dtype)
    decay_BLH = jnp.exp(dt * A.astype(acc_dtype))
    if segment_ids is not None:  # the state is zeroed before each document start
        decay_BLH = jnp.where(document_starts(segment_ids)[..., None], 0, decay_BLH)
    B_BLHN = heads_from_groups(B, h).astype(acc_dtype)
    C_BLHN = heads_from_groups(C, h).astype(acc_dtype)
    u_BLHPN = jnp.einsum("blhp,blhn->blhpn", dt[..., None] * x.astype(acc_dtype), B_BLHN)
    if initial_state is not None:  # fold h_{-1} into the first step's input
        u_BLHPN = u_BLHPN.at[:, 0].add(
            decay_BLH[:, 0, :, None, None] * initial_state.astype(acc_dtype)
        )
    _, states_BLHPN = jax.lax.associative_scan(combine, (decay_BLH, u_BLHPN), axis=1)
    y_BLHP = jnp.einsum("blhpn,blhn->blhp", states_BLHPN, C_BLHN)
    return y_BLHP, states_BLHPN[:, -1]
