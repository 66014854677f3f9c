"""SSD in the Mamba-2 chunked matmul form, plain XLA: the training path until Pallas lands.

The sequence is cut into chunks of L positions. Within a chunk the scan is a masked,
decay-weighted attention-like matmul; across chunks only the (p, n) state per head travels:

  1. intra-chunk  y_diag[l] = sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s
  2. chunk states S_c       = sum_s exp(cs_last - cs_s) dt_s x_s (outer) B_s
  3. across chunks          S_in[c] = exp(cs_last[c-1]) S_in[c-1] + S_{c-1}
                            (a small decay-matrix matmul within blocks of chunks, `lax.scan`
                            over blocks)
  4. state output y_off[l]  = exp(cs_l) C_l . S_in[c]

cs is the within-chunk cumulative sum of dt*A (float32, or float64 for float64 inputs). The
matmuls take inputs in x's dtype and accumulate in float32. Heads share their group's B and C:
h = (g, r) with r = H/G heads per group, and the C.B^T product is formed per group only.
Segment resets (packed documents) mask the intra-chunk matrix to same-document pairs, cut the
state-to-chunk-end decays, and cut the carry across chunks that contain a reset.
"""

import functools

import jax
import jax.numpy as jnp

from hybridjax.ops.segments import document_starts
from hybridjax.ops.ssm_combine import carry

HIGHEST = jax.lax.Precision.HIGHEST
# Chunks per block of the across-chunk recurrence (quadratic within a block, scan over blocks).
CHUNKS_PER_BLOCK = 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _mm(spec, a, b, mm_dtype, acc_dtype):
    """einsum(spec) on operands cast to mm_dtype, accumulating in acc_dtype.

    The backward products also run in mm_dtype (the cotangent is cast down, as mamba_ssm does)
    with acc_dtype accumulation, so bf16 inputs get bf16 tensor-core matmuls both ways; each
    gradient comes back in its operand's dtype.
    """
    return jnp.einsum(
        spec, a.astype(mm_dtype), b.astype(mm_dtype), preferred_element_type=acc_dtype
    )


def _mm_fwd(spec, a, b, mm_dtype, acc_dtype):
    a_mm, b_mm = a.astype(mm_dtype), b.astype(mm_dtype)
    out = jnp.einsum(spec, a_mm, b_mm, preferred_element_type=acc_dtype)
    # keep the operands in mm_dtype; empty arrays remember the dtypes the gradients come back in
    return out, (a_mm, b_mm, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _mm_bwd(spec, mm_dtype, acc_dtype, res, ct):
    a_mm, b_mm, a_like, b_like = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    ct = ct.astype(mm_dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", ct, b_mm, preferred_element_type=acc_dtype)
    db = jnp.einsum(f"{sa},{out}->{sb}", a_mm, ct, preferred_element_type=acc_dtype)
    return da.astype(a_like.dtype), db.astype(b_like.dtype)


_mm.defvjp(_mm_fwd, _mm_bwd)


def _masked_exp(log_decay, mask):
    """exp(log_decay) where mask else 0, with no inf/nan leaking into gradients."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, log_decay, 0)), 0)


def _intra_chunk(x_BCLGRP, dt_BCHL, cs_BCHL, B_BCLGN, C_BCLGN, same_doc_BCLS, mm_dtype, acc_dtype):
    """y_diag (b, c, L, g, r, p) in acc_dtype: the within-chunk, query-by-key part."""
    b, c, L, g, r, _p = x_BCLGRP.shape
    CB_BCGLS = _mm("bclgn,bcsgn->bcgls", C_BCLGN, B_BCLGN, mm_dtype, acc_dtype)
    cs_BCGRL = cs_BCHL.reshape(b, c, g, r, L)
    causal_LS = jnp.tril(jnp.ones((L, L), bool))
    mask = causal_LS if same_doc_BCLS is None else causal_LS & same_doc_BCLS[:, :, None, None]
    decay_BCGRLS = _masked_exp(cs_BCGRL[..., :, None] - cs_BCGRL[..., None, :], mask)
    M_BCGRLS = CB_BCGLS[:, :, :, None] * decay_BCGRLS * dt_BCHL.reshape(b, c, g, r, 1, L)
    return _mm("bcgrls,bcsgrp->bclgrp", M_BCGRLS, x_BCLGRP, mm_dtype, acc_dtype)


def _decay_matrix(log_a_BHC, alive_BHC, with_final):
    """W[z, c'] = prod_{c'<k<z} a_k for c' < z (the weight of block input c' in state z), and the
    weight of the initial state prod_{k<z} a_k. z runs over c (+1 with the final state)."""
    b, h, c = log_a_BHC.shape
    zero = jnp.zeros((b, h, 1), log_a_BHC.dtype)
    cum = jnp.concatenate([zero, jnp.cumsum(log_a_BHC, -1)], -1)  # cum[k] = sum_{j<k} log a_j
    dead = jnp.concatenate(
        [jnp.zeros((b, h, 1), jnp.int32), jnp.cumsum((~alive_BHC).astype(jnp.int32), -1)], -1
    )
    z = c + 1 if with_final else c
    # state entering z gets input c' (c' < z) scaled by prod_{c'<k<z} a_k = exp(cum[z]-cum[c'+1])
    diff = cum[..., :z, None] - cum[..., None, 1:]
    ok = (jnp.arange(z)[:, None] > jnp.arange(c)[None, :]) & (
        dead[..., :z, None] == dead[..., None, 1:]
    )
    W_BHZC = _masked_exp(diff, ok)
    init_BHZ = _masked_exp(cum[..., :z], dead[..., :z] == 0)
    return W_BHZC, init_BHZ


def _across_chunks(log_a_BHC, alive_BHC, states_BCHPN, init_BHPN, precision):
    """States entering each chunk (b, c, h, p, n) and the final state (b, h, p, n).

    S_in[0] = init; S_in[c+1] = a_c S_in[c] + states[c], where a_c = exp(log_a_c) if alive_c else 0.
    """
    b, c, h, p, n = states_BCHPN.shape
    K = CHUNKS_PER_BLOCK
    if c <= K:
        W_BHZC, init_BHZ = _decay_matrix(log_a_BHC, alive_BHC, with_final=True)
        S_BZHPN = jnp.einsum("bhzc,bchpn->bzhpn", W_BHZC, states_BCHPN, precision=precision)
        if init_BHPN is not None:
            S_BZHPN = S_BZHPN + jnp.einsum(
                "bhz,bhpn->bzhpn", init_BHZ, init_BHPN, precision=precision
            )
        return S_BZHPN[:, :c], S_BZHPN[:, c]

    # Blocks of K chunks: quadratic inside each block from a zero start, then a scan over blocks
    # that carries the true state into each block.
    nb = -(-c // K)
    pad = nb * K - c
    log_a = jnp.pad(log_a_BHC, ((0, 0), (0, 0), (0, pad)))
    alive = jnp.pad(alive_BHC, ((0, 0), (0, 0), (0, pad)), constant_values=True)
    states = jnp.pad(states_BCHPN, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    log_a = log_a.reshape(b, h, nb, K).transpose(0, 2, 1, 3).reshape(b * nb, h, K)
    alive = alive.reshape(b, h, nb, K).transpose(0, 2, 1, 3).reshape(b * nb, h, K)
    states = states.reshape(b * nb, K, h, p, n)
    W_XHZK, init_XHZ = _decay_matrix(log_a, alive, with_final=True)
    local_XZHPN = jnp.einsum("xhzk,xkhpn->xzhpn", W_XHZK, states, precision=precision)
    local_BNZHPN = local_XZHPN.reshape(b, nb, K + 1, h, p, n)
    init_BNHZ = init_XHZ.reshape(b, nb, h, K + 1)

    def carry_step(S_BHPN, inp):
        local_end_BHPN, through_BH = inp
        return carry(through_BH, S_BHPN, local_end_BHPN), S_BHPN

    S0 = jnp.zeros((b, h, p, n), states.dtype) if init_BHPN is None else init_BHPN
    final, into_NBHPN = jax.lax.scan(
        carry_step,
        S0,
        (jnp.moveaxis(local_BNZHPN[:, :, K], 1, 0), jnp.moveaxis(init_BNHZ[..., K], 1, 0)),
    )
    S_BNKHPN = local_BNZHPN[:, :, :K] + (
        jnp.moveaxis(init_BNHZ[..., :K], 3, 2)[..., None, None]
        * jnp.moveaxis(into_NBHPN, 0, 1)[:, :, None]
    )
    return S_BNKHPN.reshape(b, nb * K, h, p, n)[:, :c], final


def ssd_chunked(x, dt, A, B, C, initial_state, segment_ids, acc_dtype, chunk_size):
    """Returns (y (b, l, h, p) in acc_dtype without the D term, final state (b, h, p, n))."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    L = min(chunk_size, l)
    c = -(-l // L)
    pad = c * L - l
    mm_dtype = jnp.float64 if acc_dtype == jnp.float64 else x.dtype
    if jax.default_backend() == "cpu" and jnp.dtype(mm_dtype).itemsize < 4:
        mm_dtype = jnp.float32  # XLA:CPU lacks some bf16 x bf16 -> f32 dots (and bf16 matmul units)
    resets = None if segment_ids is None else document_starts(segment_ids)
    if pad:  # padded steps have dt = 0: decay 1 and no input, so the final state is unchanged
        pad_t = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        x, dt, B, C = map(pad_t, (x, dt, B, C))
        resets = None if resets is None else pad_t(resets)

    x_BCLGRP = x.reshape(b, c, L, g, r, p)
    B_BCLGN = B.reshape(b, c, L, g, n)
    C_BCLGN = C.reshape(b, c, L, g, n)
    dt_BCLH = dt.astype(acc_dtype).reshape(b, c, L, h)
    cs_BCLH = jnp.cumsum(dt_BCLH * A.astype(acc_dtype), axis=2)
    cs_BCHL = jnp.moveaxis(cs_BCLH, 2, 3)
    dt_BCHL = jnp.moveaxis(dt_BCLH, 2, 3)

    if resets is None:
        same_doc_BCLS = None
        to_end_BCL = start_alive_BCL = None
    else:
        resets_BCL = resets.reshape(b, c, L)
        doc_BCL = jnp.cumsum(resets_BCL, axis=2)  # documents started inside the chunk up to l
        same_doc_BCLS = doc_BCL[..., :, None] == doc_BCL[..., None, :]
        to_end_BCL = doc_BCL == doc_BCL[..., -1:]  # s reaches the chunk end without a reset
        start_alive_BCL = doc_BCL == 0  # chunk start reaches l without a reset

    # 1. within chunks (recomputed in the backward pass instead of storing (L, L) tensors)
    y_BCLGRP = jax.checkpoint(_intra_chunk, static_argnums=(6, 7))(
        x_BCLGRP, dt_BCHL, cs_BCHL, B_BCLGN, C_BCLGN, same_doc_BCLS, mm_dtype, acc_dtype
    )

    # 2. each chunk's own end state
    to_end_BCLH = _masked_exp(
        cs_BCLH[:, :, -1:] - cs_BCLH, True if to_end_BCL is None else to_end_BCL[..., None]
    )
    xw_BCLGRP = x_BCLGRP * (to_end_BCLH * dt_BCLH).reshape(b, c, L, g, r, 1)
    states_BCGRPN = _mm("bclgrp,bclgn->bcgrpn", xw_BCLGRP, B_BCLGN, mm_dtype, acc_dtype)

    # 3. across chunks
    log_a_BHC = jnp.moveaxis(cs_BCLH[:, :, -1], 1, 2)
    alive_BHC = (
        jnp.ones((b, h, c), bool)
        if start_alive_BCL is None
        else jnp.broadcast_to(start_alive_BCL[:, None, :, -1], (b, h, c))
    )
    init = None if initial_state is None else initial_state.astype(acc_dtype)
    S_in_BCHPN, final_BHPN = _across_chunks(
        log_a_BHC, alive_BHC, states_BCGRPN.reshape(b, c, h, p, n), init, HIGHEST
    )

    # 4. the state entering each chunk, read out at every position
    y_off_BCLGRP = _mm(
        "bclgn,bcgrpn->bclgrp", C_BCLGN, S_in_BCHPN.reshape(b, c, g, r, p, n), mm_dtype, acc_dtype
    )
    from_start_BCLH = _masked_exp(
        cs_BCLH, True if start_alive_BCL is None else start_alive_BCL[..., None]
    )
    y_BCLGRP = y_BCLGRP + y_off_BCLGRP * from_start_BCLH.reshape(b, c, L, g, r, 1)
    return y_BCLGRP.reshape(b, c * L, h, p)[:, :l], final_BHPN
