"""The Mamba-3 scan oracle: the recurrence stepped one position at a time with `lax.scan`.

Per head h, at step t (q and k read their head's group and get the head's bias; v_r = v *
mimo_x[r] for each of the R ranks, R = 1 and v_r = v for SISO):

    phi_t   = (phi_{t-1} + pi tanh(angles_t) dt_t) mod 2 pi        (s angles per head)
    q~, k~  = q_t, k_t rotated by phi_t                           (`rotate`)
    lam_t   = sigmoid(trap_t)   alpha_t = exp(adt_t)
    beta_t  = (1 - lam_t) dt_t alpha_t                            gamma_t = lam_t dt_t
    S_t     = alpha_t S_{t-1} + beta_t sum_r v_{t-1,r} k~_{t-1,r}^T + gamma_t sum_r v_{t,r} k~_{t,r}^T
    y_{t,r} = S_t q~_{t,r}

(the exponential-trapezoidal rule of Mamba-3: the input enters through both ends of the step).
A document start (the segment id changes) zeroes the whole carry before its step: the angle, S
and the last rotated k and v. D, the z gate and the MIMO output mix are applied by the
dispatcher (`hybridjax.ops.mamba3`), not here.

Slow (one step per token) but plainly the recurrence: every other implementation is tested
against it. Shapes (the dispatcher's internal layout, R ranks always present):
q, k (b, l, R, g, n); v (b, l, h, p); adt, dt, trap (b, l, h); q_bias, k_bias (h, R, n);
angles (b, l, h, s); mimo_x (h, R, p) or None; state `Mamba3State` with k (b, R, h, n).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import document_starts

TWO_PI = 2 * math.pi
# How rotation angle i pairs state channels: (2i, 2i+1) in the SISO kernels, (i, i + n/2) in the
# MIMO kernels (mamba_ssm's Triton SISO and TileLang MIMO code; its MIMO decode step agrees).
PAIRINGS = ("adjacent", "halves")


class Mamba3State(NamedTuple):
    """The state a Mamba-3 scan carries between calls (float32, float64 for float64 inputs)."""

    angle: jax.Array  # (b, h, s) cumulative rotation angles, in [0, 2 pi)
    ssm: jax.Array  # (b, h, p, n) S after the last step
    k: jax.Array  # rotated, biased k of the last step: (b, h, n) SISO, (b, R, h, n) MIMO
    v: jax.Array  # (b, h, p) v of the last step (before the MIMO up-projection)


def wrap_angle(a):
    """a mod 2 pi in [0, 2 pi); its gradient is 1 (floor has none)."""
    return a - TWO_PI * jnp.floor(a / TWO_PI)


def angle_increment(angles, dt):
    """pi tanh(angles) dt: (b, l, h, s) raw angles and (b, l, h) dt -> per-step rotation."""
    return math.pi * jnp.tanh(angles) * dt[..., None]


def rotate(x, phi, pairing: str):
    """x (..., n) rotated by angles phi (..., s), s <= n/2, phi broadcasting against x[..., :1].

    Pair i is channels (2i, 2i+1) ("adjacent") or (i, i + n/2) ("halves"); (a, b) becomes
    (a cos - b sin, a sin + b cos); pairs i >= s are left as they are.
    """
    n, s = x.shape[-1], phi.shape[-1]
    cos, sin = jnp.cos(phi), jnp.sin(phi)
    if pairing == "adjacent":
        pairs = x[..., : 2 * s].reshape(*x.shape[:-1], s, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        turned = jnp.stack([a * cos - b * sin, a * sin + b * cos], -1)
        return jnp.concatenate([turned.reshape(*x.shape[:-1], 2 * s), x[..., 2 * s :]], -1)
    half = n // 2
    a, b = x[..., :s], x[..., half : half + s]
    return jnp.concatenate(
        [a * cos - b * sin, x[..., s:half], a * sin + b * cos, x[..., half + s :]], -1
    )


def heads_with_bias(t_BLRGN, bias_HRN):
    """q or k (b, l, R, g, n) -> (b, l, R, h, n): head h reads group h // (h/g), plus its bias."""
    h = bias_HRN.shape[0]
    heads = jnp.repeat(t_BLRGN, h // t_BLRGN.shape[3], axis=3)
    return heads + jnp.swapaxes(bias_HRN, 0, 1)


def rank_values(v_BLHP, mimo_x):
    """v (..., h, p) -> v_r (..., R, h, p): v * mimo_x[r] (mimo_x (h, R, p)), or v itself as the
    one rank when mimo_x is None (SISO)."""
    if mimo_x is None:
        return v_BLHP[..., None, :, :]
    return v_BLHP[..., None, :, :] * jnp.swapaxes(mimo_x, 0, 1).astype(v_BLHP.dtype)


def zero_state(b, R, h, p, n, s, dtype) -> Mamba3State:
    return Mamba3State(
        angle=jnp.zeros((b, h, s), dtype),
        ssm=jnp.zeros((b, h, p, n), dtype),
        k=jnp.zeros((b, R, h, n), dtype),
        v=jnp.zeros((b, h, p), dtype),
    )


def mamba3_reference(
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, initial_state, segment_ids, acc, pairing
):
    """Returns (y (b, l, R, h, p) in acc without D, z or the output mix, final `Mamba3State`)."""
    b, _, R, _, n = q.shape
    h, p = v.shape[2:]
    s = angles.shape[-1]
    cast = lambda t: t.astype(acc)
    q_BLRHN = heads_with_bias(cast(q), cast(q_bias))
    k_BLRHN = heads_with_bias(cast(k), cast(k_bias))
    mimo_x = None if mimo_x is None else cast(mimo_x)
    dt = cast(dt)
    starts = jnp.zeros(dt.shape[:2], bool) if segment_ids is None else document_starts(segment_ids)
    state0 = (
        zero_state(b, R, h, p, n, s, acc)
        if initial_state is None
        else Mamba3State(*(cast(t) for t in initial_state))
    )

    def step(state, inputs):
        start_B, q_BRHN, k_BRHN, v_BHP, adt_BH, dt_BH, trap_BH, theta_BHS = inputs
        keep = lambda t: jnp.where(start_B.reshape((-1,) + (1,) * (t.ndim - 1)), 0, t)
        angle, S, k_prev, v_prev = (keep(t) for t in state)
        angle = wrap_angle(angle + theta_BHS)
        q_rot = rotate(q_BRHN, angle[:, None], pairing)
        k_rot = rotate(k_BRHN, angle[:, None], pairing)
        lam = jax.nn.sigmoid(trap_BH)
        alpha = jnp.exp(adt_BH)
        beta = (1 - lam) * dt_BH * alpha
        gamma = lam * dt_BH
        outer = lambda v_, k_: jnp.einsum("brhp,brhn->bhpn", rank_values(v_, mimo_x), k_)
        S = (
            alpha[..., None, None] * S
            + beta[..., None, None] * outer(v_prev, k_prev)
            + gamma[..., None, None] * outer(v_BHP, k_rot)
        )
        y_BRHP = jnp.einsum("bhpn,brhn->brhp", S, q_rot)
        return Mamba3State(angle, S, k_rot, v_BHP), y_BRHP

    time_major = lambda t: jnp.moveaxis(t, 1, 0)
    inputs = (
        starts,
        q_BLRHN,
        k_BLRHN,
        cast(v),
        cast(adt),
        dt,
        cast(trap),
        angle_increment(cast(angles), dt),
    )
    final, y_LBRHP = jax.lax.scan(step, state0, tuple(map(time_major, inputs)))
    return jnp.moveaxis(y_LBRHP, 0, 1), final
