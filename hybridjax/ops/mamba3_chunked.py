"""The Mamba-3 scan in the SSD chunked matmul form, plain XLA: the training path on every backend
until a Pallas kernel lands.

The trapezoid's shifted term makes the recurrence of `mamba3_reference` an SSD in disguise. Let
w_t = dt_{t+1} (1 - lam_{t+1}) (0 at the last step and before a document start) and carry

    S'_t = S_t + w_t sum_r v_{t,r} k~_{t,r}^T       (the state with the next step's beta term
                                                     already added, short of its alpha)

then S'_t = alpha_t S'_{t-1} + (gamma_t + w_t) sum_r v_{t,r} k~_{t,r}^T and y_{t,r} = q~_{t,r} .
(S'_t - w_t sum v k~^T): an SSD whose input weight is gamma_t + w_t, except on the diagonal
(t = s), where it is gamma_t alone. So, per chunk of L steps (ranks flattened into the chunk, a
(L R) x (L R) block per head, as mamba_ssm's MIMO kernel does):

  1. intra-chunk   y[t, r] = sum_{s <= t, r'} (q~[t, r] . k~[s, r']) W[t, s] v[s, r'],
                   W[t, s] = exp(cs_t - cs_s) (gamma_s + w_s) for s < t, gamma_t for s = t
  2. chunk states  S_c     = sum_s exp(cs_last - cs_s) (gamma_s + w_s) sum_r v[s, r] k~[s, r]^T
  3. across chunks S_in[c] = exp(cs_last[c-1]) S_in[c-1] + S_{c-1}    (`ssd_chunked`'s carry)
  4. state output  y[t, r] += exp(cs_t) q~[t, r] . S_in[c]

cs is the within-chunk cumulative sum of adt. The caller's initial state enters in the same
primed form, S_init + dt_0 (1 - lam_0) sum_r v_prev,r k_prev,r^T, and the final S' is S itself
(w = 0 at the last step). The cumulative angles are a segmented running sum mod 2 pi
(in-block sums and a prefix over blocks), so they stay in [0, 2 pi) at any length instead of growing with it.
Decays, angles, rotations and states in float32 (float64 for float64 inputs); the matmuls take
operands in the input dtype (float32 on the CPU for 16-bit inputs) and accumulate in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybridjax.ops.mamba3_reference import (
    Mamba3State,
    angle_increment,
    heads_with_bias,
    rank_values,
    rotate,
    wrap_angle,
)
from hybridjax.ops.segments import document_starts
from hybridjax.ops.ssd_chunked import HIGHEST, _across_chunks, _masked_exp, _mm

ANGLE_BLOCK = 64  # positions per block of the running angle's in-block sums


def running_angle(theta_BLHS, starts_BL, angle0_BHS, block=ANGLE_BLOCK):
    """phi_t = (phi_{t-1} + theta_t) mod 2 pi, restarting from 0 at each document start; phi_{-1} =
    angle0 (or 0).

    Two levels, so that no pass over the (b, l, h, s) angles is repeated log(l) times: inside
    blocks of `block` positions the sums since the block start (or the last document start) are
    one masked matmul; the angle entering each block is a parallel prefix over the blocks' totals
    with (starts here, sum) pairs, wrapped at every combine, so it stays in [0, 2 pi) at any
    length. An in-block sum stays small (at most `block` steps), so adding it before the final
    wrap costs no precision that matters."""
    if angle0_BHS is not None:  # position 0 never starts a document: fold the start angle in
        theta_BLHS = theta_BLHS.at[:, 0].add(angle0_BHS)
    b, l, h, s = theta_BLHS.shape
    Q = min(block, l)
    pad = -l % Q
    c = (l + pad) // Q
    theta = jnp.pad(theta_BLHS, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, c, Q, h, s)
    starts = jnp.pad(starts_BL, [(0, 0), (0, pad)]).reshape(b, c, Q)
    run = jnp.cumsum(starts, axis=2, dtype=jnp.int32)  # document index inside the block
    t = jnp.arange(Q)
    mask = (t[:, None] >= t[None, :]) & (run[..., :, None] == run[..., None, :])
    within = jnp.einsum(
        "bcts,bcshn->bcthn", mask.astype(theta.dtype), theta, precision=HIGHEST
    )  # (b, c, Q, h, s): the sums since the block or document start
    reach = (run == 0)[..., None, None]  # the entering angle reaches these positions

    def combine(earlier, later):
        f1, a1 = earlier
        f2, a2 = later
        return f1 | f2, jnp.where(f2, a2, wrap_angle(a1 + a2))

    restarted = jnp.broadcast_to(~reach[:, :, -1], within[:, :, -1].shape)
    _, ends = jax.lax.associative_scan(combine, (restarted, within[:, :, -1]), axis=1)
    entering = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)
    phi = within + jnp.where(reach, entering[:, :, None], 0)
    return wrap_angle(phi.reshape(b, c * Q, h, s)[:, :l])


def _intra_chunk(q_BCLRHN, k_BCLRHN, v_BCLRHP, W_BCHLS, mm_dtype, acc_dtype):
    """y_diag (b, c, L, R, h, p): the within-chunk part, every rank pair of steps s <= t."""
    QK = _mm("bclrhn,bcsthn->bchlrst", q_BCLRHN, k_BCLRHN, mm_dtype, acc_dtype)
    M = QK * W_BCHLS[:, :, :, :, None, :, None]
    return _mm("bchlrst,bcsthp->bclrhp", M, v_BCLRHP, mm_dtype, acc_dtype)


class SsdForm(NamedTuple):
    """The per-step pieces of the SSD form (module docstring), in the accumulation dtype: what
    the chunked XLA path here and the Pallas path (`hybridjax.kernels.mamba3`) both scan."""

    phi: jax.Array  # (b, l, h, s) cumulative angles
    q: jax.Array  # (b, l, R, h, n) q~: biased, rotated
    k: jax.Array  # (b, l, R, h, n) k~
    v: jax.Array  # (b, l, R, h, p) v_r
    gamma: jax.Array  # (b, l, h) the diagonal's input weight, lam dt
    # (b, l, h) the next step's beta weight short of alpha (0 at the end and before a start)
    w: jax.Array
    s0: jax.Array | None  # (b, h, p, n) the caller's initial state, primed
    starts: jax.Array  # (b, l) bool, where a document starts


def ssd_form(
    q, k, v, dt, trap, q_bias, k_bias, angles, mimo_x, initial_state, segment_ids, acc, pairing
) -> SsdForm:
    """Angles, rotated q and k, trapezoid weights, values per rank and the primed initial state.
    Shapes as `mamba3_reference`."""
    b, l = q.shape[:2]
    cast = lambda t: t.astype(acc)
    dt = cast(dt)
    starts = jnp.zeros((b, l), bool) if segment_ids is None else document_starts(segment_ids)
    init = None if initial_state is None else Mamba3State(*(cast(t) for t in initial_state))
    phi_BLHS = running_angle(
        angle_increment(cast(angles), dt), starts, None if init is None else init.angle
    )
    q_BLRHN = rotate(heads_with_bias(cast(q), cast(q_bias)), phi_BLHS[:, :, None], pairing)
    k_BLRHN = rotate(heads_with_bias(cast(k), cast(k_bias)), phi_BLHS[:, :, None], pairing)
    lam = jax.nn.sigmoid(cast(trap))
    gamma = lam * dt
    ahead = dt * (1 - lam)  # the beta term's weight, short of alpha; it belongs to step t-1
    ahead = jnp.where(starts[..., None], 0, ahead)  # no step before a document start gets one
    w = jnp.concatenate([ahead[:, 1:], jnp.zeros_like(ahead[:, :1])], 1)
    mimo_x = None if mimo_x is None else cast(mimo_x)
    v_BLRHP = rank_values(cast(v), mimo_x)
    S0 = None
    if init is not None:
        prev = jnp.einsum("brhp,brhn->bhpn", rank_values(init.v, mimo_x), init.k)
        S0 = init.ssm + ahead[:, 0, :, None, None] * prev
    return SsdForm(phi_BLHS, q_BLRHN, k_BLRHN, v_BLRHP, gamma, w, S0, starts)


def mamba3_chunked(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    mimo_x,
    initial_state,
    segment_ids,
    acc,
    pairing,
    chunk_size,
):
    """Returns (y (b, l, R, h, p) in acc without D, z or the output mix, final `Mamba3State`).
    Shapes as `mamba3_reference`."""
    b, l, R = q.shape[:3]
    h, p = v.shape[2:]
    mm_dtype = jnp.float64 if acc == jnp.float64 else v.dtype
    if jax.default_backend() == "cpu" and jnp.dtype(mm_dtype).itemsize < 4:
        mm_dtype = jnp.float32  # XLA:CPU lacks some bf16 x bf16 -> f32 dots
    adt = adt.astype(acc)
    # Per-step pieces: angles, rotated q and k, trapezoid weights, values per rank.
    form = ssd_form(
        q, k, v, dt, trap, q_bias, k_bias, angles, mimo_x, initial_state, segment_ids, acc, pairing
    )
    phi_BLHS, q_BLRHN, k_BLRHN, v_BLRHP, gamma, w, S0, starts = form

    # Chunks of L steps; padded steps have adt = 0 (decay 1) and no input.
    L = min(chunk_size, l)
    c = -(-l // L)
    pad = c * L - l
    pad_t = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    chunks = lambda t: pad_t(t).reshape(b, c, L, *t.shape[2:])
    q_C, k_C, v_C = chunks(q_BLRHN), chunks(k_BLRHN), chunks(v_BLRHP)
    adt_C, gamma_C, scale_C = chunks(adt), chunks(gamma), chunks(gamma + w)  # (b, c, L, h)
    cs_BCHL = jnp.moveaxis(jnp.cumsum(adt_C, axis=2), 2, 3)
    gamma_BCHL, scale_BCHL = jnp.moveaxis(gamma_C, 2, 3), jnp.moveaxis(scale_C, 2, 3)
    # documents started in the chunk up to each step
    doc_BCL = jnp.cumsum(chunks(starts), axis=2, dtype=jnp.int32)
    start_alive_BCL = doc_BCL == 0  # the chunk's entering state reaches t
    to_end_BCL = doc_BCL == doc_BCL[..., -1:]  # step s reaches the chunk's end

    # 1. within chunks (the (L R)^2 blocks are recomputed in the backward pass, not stored)
    eye = jnp.eye(L, dtype=bool)
    earlier = (
        jnp.tril(jnp.ones((L, L), bool), -1)
        & (doc_BCL[..., :, None] == doc_BCL[..., None, :])[:, :, None]
    )
    W_BCHLS = _masked_exp(cs_BCHL[..., :, None] - cs_BCHL[..., None, :], earlier) * (
        scale_BCHL[..., None, :]
    ) + jnp.where(eye, gamma_BCHL[..., :, None], 0)
    y_BCLRHP = jax.checkpoint(_intra_chunk, static_argnums=(4, 5))(
        q_C, k_C, v_C, W_BCHLS, mm_dtype, acc
    )

    # 2. each chunk's own end state (primed)
    to_end_BCHL = _masked_exp(cs_BCHL[..., -1:] - cs_BCHL, to_end_BCL[:, :, None]) * scale_BCHL
    k_end = k_C * jnp.moveaxis(to_end_BCHL, 3, 2)[:, :, :, None, :, None]
    states_BCHPN = _mm("bclrhp,bclrhn->bchpn", v_C, k_end, mm_dtype, acc)

    # 3. across chunks
    log_a_BHC = jnp.moveaxis(cs_BCHL[..., -1], 1, 2)
    alive_BHC = jnp.broadcast_to(start_alive_BCL[:, None, :, -1], (b, h, c))
    S_in_BCHPN, final_BHPN = _across_chunks(log_a_BHC, alive_BHC, states_BCHPN, S0, HIGHEST)

    # 4. the state entering each chunk, read out at every step up to its first document start
    y_off = _mm("bclrhn,bchpn->bclrhp", q_C, S_in_BCHPN, mm_dtype, acc)
    from_start_BCHL = _masked_exp(cs_BCHL, start_alive_BCL[:, :, None])
    y_BCLRHP = y_BCLRHP + y_off * jnp.moveaxis(from_start_BCHL, 3, 2)[:, :, :, None, :, None]

    final = Mamba3State(phi_BLHS[:, -1], final_BHPN, k_BLRHN[:, -1], v[:, -1].astype(acc))
    return y_BCLRHP.reshape(b, c * L, R, h, p)[:, :l], final
