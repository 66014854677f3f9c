"""The scan-path oracle: the SSD recurrence stepped one position at a time with `lax.scan`.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        y_t = C_t . h_t

Slow (one step per token) but obviously right; every other implementation is tested against it.
Shapes: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), initial state (b, h, p, n).
"""

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import document_starts


def heads_from_groups(t_BLGN, n_heads):
    """B or C (b, l, g, n) -> (b, l, h, n): head h reads group h // (h/g)."""
    return jnp.repeat(t_BLGN, n_heads // t_BLGN.shape[2], axis=2)


def ssd_reference(x, dt, A, B, C, initial_state, segment_ids, acc_dtype):
    """Returns (y (b, l, h, p) in acc_dtype without the D term, final state (b, h, p, n))."""
    b, _, h, p = x.shape
    n = B.shape[-1]
    B_BLHN = heads_from_groups(B, h).astype(acc_dtype)
    C_BLHN = heads_from_groups(C, h).astype(acc_dtype)
    dt = dt.astype(acc_dtype)
    decay_BLH = jnp.exp(dt * A.astype(acc_dtype))
    if segment_ids is not None:  # the state is zeroed before each document start
        decay_BLH = jnp.where(document_starts(segment_ids)[..., None], 0, decay_BLH)
    dtx_BLHP = dt[..., None] * x.astype(acc_dtype)
    state0 = (
        jnp.zeros((b, h, p, n), acc_dtype)
        if initial_state is None
        else initial_state.astype(acc_dtype)
    )

    def step(state_BHPN, inputs):
        decay_BH, dtx_BHP, B_BHN, C_BHN = inputs
        state_BHPN = (
            decay_BH[:, :, None, None] * state_BHPN + dtx_BHP[:, :, :, None] * B_BHN[:, :, None, :]
        )
        y_BHP = jnp.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN)
        return state_BHPN, y_BHP

    time_major = lambda t: jnp.moveaxis(t, 1, 0)
    final, y_LBHP = jax.lax.scan(
        step,
        state0,
        (time_major(decay_BLH), time_major(dtx_BLHP), time_major(B_BLHN), time_major(C_BLHN)),
    )
    return jnp.moveaxis(y_LBHP, 0, 1), final
