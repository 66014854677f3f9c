"""Pallas (Triton backend) kernels for the chunked SSD scan: the bodies and their pallas_calls.

The forward kernel and the state sweeps run one program per (batch, head, superchunk) and walk
the superchunk's chunks of Q positions in a sequential loop, carrying a (p, n) float32 state in
registers. Per chunk they do small matmuls on the tensor cores (C.B^T, the masked-decay product
with x, the state in/out terms), so the forward's per-chunk states never go to device memory.
Superchunks make the grid wide enough to fill the GPU; what crosses superchunk boundaries is a
(p, n) state per superchunk, passed in plain XLA (see ssd.py). The backward's dx and dc kernels
run one program per chunk and block of heads, from the chunk-boundary states that the sweeps
store.

Per-position float32 vectors, computed once in XLA, carry everything about decays and resets:
  dt (the step), cs (cumulative log decay inside the chunk), ind (exp(cs_t), zero once a reset has
  happened inside the chunk at or before t: how much of the chunk's entering state reaches t),
  outd (exp(cs_last - cs_s), zero if a reset follows s inside the chunk: how much of position s
  reaches the chunk's end state). The chunk's own decay is ind at its last position. Inside a
  chunk, the pairs (t, s) are masked by causality and by the document index `doc`.

The same bodies run in Pallas interpret mode on the CPU (tests) and through Triton on the GPU.

Why Pallas's Triton backend and not Mosaic GPU (plgpu), although jax 0.11 deprecates it:
  - it reaches the target (H200: forward 0.54-0.67x, forward+backward 0.38-0.48x mamba_ssm's
    Triton kernels, README), with kernels written as array code: chains of 64x64..64x128
    matmuls with per-position decay masks between them, which Triton keeps in registers;
  - the kernels the GPU runs are the ones the CPU suite tests: these bodies use only generic
    Pallas (refs, dot, fori_loop), so interpret mode runs them unchanged. A Mosaic GPU kernel
    is written with its own primitives (shared-memory buffers, TMA copies, barriers, warpgroup
    matmuls with their operand layouts) and would be a second program next to the tested one;
  - the code lowers unchanged on jax 0.10.2 and 0.11.2, where plgpu's API still moves.
  Leaving it means porting four bodies; `python -m hybridjax.kernels.check` and the tests are
  the harness a port is measured with.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None


def _dot(a, b, ta=False, tb=False):
    """a @ b with float32 accumulation; ta/tb contract over a's rows / b's columns. Float32
    operands get full float32 products (Triton would use TF32 at the default precision)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return jax.lax.dot_general(
        a,
        b,
        (((0 if ta else 1,), (1 if tb else 0,)), ((), ())),
        precision=prec,
        preferred_element_type=F32,
    )


# lax.rem/div, not % and //: jnp's versions are nested jits whose Triton lowering mixes i32 and i1.
def _window(j, wq):
    return jax.lax.div(j, jnp.asarray(wq, j.dtype))


def _ends_window(j, wq):
    return jax.lax.rem(j, jnp.asarray(wq, j.dtype)) == wq - 1


def _pair_decay(cs, doc_row, doc_col, Q, transpose):
    """(Q, Q) exp(cs_t - cs_s) for s <= t in one document, else 0; [t, s], or [s, t] if transpose."""
    r = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    c = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    if transpose:  # rows s, columns t
        mask = c >= r
        diff = cs[None, :] - cs[:, None]
    else:  # rows t, columns s
        mask = r >= c
        diff = cs[:, None] - cs[None, :]
    if doc_row is not None:
        mask = mask & (doc_row[:, None] == doc_col[None, :])
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


class _Chunk:
    """Loads of one chunk's slices from the superchunk refs."""

    def __init__(self, j, Q):
        self.start = pl.multiple_of(j * Q, Q)
        self.sl = pl.ds(self.start, Q)
        self.last = j * Q + (Q - 1)


# ----------------------------------------------------------------------------------------------
# forward: y = intra-chunk (masked C.B^T decay product) + inter-chunk (C . state) + D x
# ----------------------------------------------------------------------------------------------
def _fwd_kernel(*refs, Q, nq, has_doc, has_D, cdt):
    it = iter(refs)
    x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref, outd_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    s0_ref = next(it)
    d_ref = next(it) if has_D else None
    y_ref, sout_ref = next(it), next(it)

    def body(j, S):
        ch = _Chunk(j, Q)
        x = x_ref[ch.sl, :]
        Bm = b_ref[ch.sl, :]
        Cm = c_ref[ch.sl, :]
        dt = dt_ref[ch.sl]
        cs = cs_ref[ch.sl]
        ind = ind_ref[ch.sl]
        outd = outd_ref[ch.sl]
        doc = doc_ref[ch.sl] if has_doc else None
        cdec = ind_ref[ch.last]
        L = _pair_decay(cs, doc, doc, Q, transpose=False)
        W = (_dot(Cm, Bm, tb=True) * L * dt[None, :]).astype(cdt)
        y = _dot(W, x) + ind[:, None] * _dot(Cm, S.astype(cdt), tb=True)
        if has_D:
            y = y + d_ref[0] * x.astype(F32)
        y_ref[ch.sl, :] = y.astype(y_ref.dtype)
        Bw = ((outd * dt)[:, None] * Bm.astype(F32)).astype(cdt)
        return cdec * S + _dot(x, Bw, ta=True)

    sout_ref[...] = jax.lax.fori_loop(0, nq, body, s0_ref[...])


# ----------------------------------------------------------------------------------------------
# state sweeps: chains of U^T diag(w) V over the chunks. Forward (x, B, w = outd*dt) for the
# state, reverse (dy, C, w = ind) for the adjoint. From zero, only the superchunk's own end state
# (for the passing); from the passed states, also the state at every chunk boundary in the
# operand dtype (what the backward's per-chunk kernels multiply with) and the float32 states at
# the window ends: stored going forward, met with the adjoint going in reverse (Z = <G, S>).
# ----------------------------------------------------------------------------------------------
def _state_kernel(*refs, Q, nq, wq, reverse, chunks, cdt):
    it = iter(refs)
    u_ref, v_ref = next(it), next(it)
    w_refs = [next(it)] if reverse else [next(it), next(it)]  # ind | outd, dt
    ind_ref = w_refs[0] if reverse else next(it)
    if chunks:
        s0_ref = next(it)
        sw_in = next(it) if reverse else None
    out_ref = next(it)
    if chunks:
        st_ref = next(it)
        win_ref = next(it)  # forward: the window-end states; reverse: Z per window

    def body(i, S):
        j = nq - 1 - i if reverse else i
        ch = _Chunk(j, Q)
        if chunks and reverse:
            st_ref[j] = S.astype(st_ref.dtype)  # the adjoint at the chunk's end

            @pl.when(_ends_window(j, wq))
            def _():
                win_ref[_window(j, wq)] = jnp.sum(S * sw_in[_window(j, wq)])
        elif chunks:
            st_ref[j] = S.astype(st_ref.dtype)  # the state entering the chunk
        w = ind_ref[ch.sl] if reverse else w_refs[0][ch.sl] * w_refs[1][ch.sl]
        v = (w[:, None] * v_ref[ch.sl, :].astype(F32)).astype(cdt)
        S = ind_ref[ch.last] * S + _dot(u_ref[ch.sl, :], v, ta=True)
        if chunks and not reverse:

            @pl.when(_ends_window(j, wq))
            def _():
                win_ref[_window(j, wq)] = S

        return S

    s0 = s0_ref[...] if chunks else jnp.zeros(out_ref.shape, F32)
    out_ref[...] = jax.lax.fori_loop(0, nq, body, s0)


# ----------------------------------------------------------------------------------------------
# backward per chunk, one program per (batch, chunk, block of hb heads of one group). Each head's
# outputs are its own; dB and dC sum over the block's heads in float32 registers (the product of
# the group's B and C is shared by its heads), so only one partial per block leaves the kernel.
# ----------------------------------------------------------------------------------------------
def _bwd_dx_kernel(*refs, Q, hb, has_doc, has_D, cdt):
    """Given the adjoint G at the chunk's end (operand dtype): dx, the block's dB, x_s . v_s (the
    column sums of the pair terms over dt_s, see ssd.py) and dy . x for dD."""
    it = iter(refs)
    dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, outd_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    g_ref = next(it)
    d_ref = next(it) if has_D else None
    dx_ref, db_ref, xv_ref, dyx_ref = (next(it) for _ in range(4))

    Bm, Cm = b_ref[...], c_ref[...]
    doc = doc_ref[...] if has_doc else None
    BC = _dot(Bm, Cm, tb=True)  # [s, t]

    def head(i, dB):
        dy, x, G = dy_ref[:, i, :], x_ref[:, i, :], g_ref[i]
        dt, cs, outd = dt_ref[i, :], cs_ref[i, :], outd_ref[i, :]
        Lt = _pair_decay(cs, doc, doc, Q, transpose=True)  # [s, t]
        BCL = BC * Lt
        XdY = _dot(x, dy, tb=True)  # [s, t]
        # v_s = G_s B_s: what dx_s is before the dt_s factor.
        V_in = outd[:, None] * _dot(Bm, G, tb=True)
        V = _dot(BCL.astype(cdt), dy) + V_in
        xf = x.astype(F32)
        dyf = dy.astype(F32)
        dx = dt[:, None] * V
        if has_D:
            dx = dx + d_ref[i] * dyf
        dx_ref[:, i, :] = dx.astype(dx_ref.dtype)
        # the intra-chunk part from the float32 pair terms (the dc kernel's rows use the same products)
        xv_ref[i, :] = jnp.sum(BCL * XdY, axis=1) + jnp.sum(xf * V_in, axis=1)
        dyx_ref[i, :] = jnp.sum(xf * dyf, axis=1)
        return dB + dt[:, None] * (_dot((XdY * Lt).astype(cdt), Cm) + outd[:, None] * _dot(x, G))

    db_ref[...] = jax.lax.fori_loop(0, hb, head, jnp.zeros(b_ref.shape, F32)).astype(db_ref.dtype)


def _bwd_dc_kernel(*refs, Q, hb, has_doc, cdt):
    """Given the state S entering the chunk (operand dtype): the block's dC and the row sums of
    the pair terms, C_t . dC_t (intra-chunk from the float32 pair terms)."""
    it = iter(refs)
    dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    s_ref = next(it)
    dc_ref, rs_ref = next(it), next(it)

    Bm, Cm = b_ref[...], c_ref[...]
    Cf = Cm.astype(F32)
    doc = doc_ref[...] if has_doc else None
    CB = _dot(Cm, Bm, tb=True)  # [t, s]

    def head(i, dC):
        dy, x, S = dy_ref[:, i, :], x_ref[:, i, :], s_ref[i]
        dt, cs, ind = dt_ref[i, :], cs_ref[i, :], ind_ref[i, :]
        L = _pair_decay(cs, doc, doc, Q, transpose=False)
        P = _dot(dy, x, tb=True) * L * dt[None, :]  # [t, s]
        dC_in = ind[:, None] * _dot(dy, S)
        rs_ref[i, :] = jnp.sum(P * CB, axis=1) + jnp.sum(Cf * dC_in, axis=1)
        return dC + _dot(P.astype(cdt), Bm) + dC_in

    dc_ref[...] = jax.lax.fori_loop(0, hb, head, jnp.zeros(c_ref.shape, F32)).astype(dc_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call builders. Grid (batch, head, superchunk); T = Q * nq positions per superchunk.
# ----------------------------------------------------------------------------------------------
class Specs:
    """BlockSpecs of the array layouts the kernels read and write."""

    def __init__(self, T, hpg, p, n, nw=1):
        self.T = T
        self.win = pl.BlockSpec((_SQ, nw, _SQ, p, n), lambda b, h, k: (b, k, h, 0, 0))
        self.bhlp = pl.BlockSpec((_SQ, T, _SQ, p), lambda b, h, k: (b, k, h, 0))  # x, y, dy, dx
        self.blgn = pl.BlockSpec((_SQ, T, _SQ, n), lambda b, h, k: (b, k, h // hpg, 0))  # B, C
        self.bhl = pl.BlockSpec((_SQ, _SQ, T), lambda b, h, k: (b, h, k))  # per position
        self.doc = pl.BlockSpec((_SQ, T), lambda b, h, k: (b, k))
        self.state = pl.BlockSpec((_SQ, _SQ, _SQ, p, n), lambda b, h, k: (b, k, h, 0, 0))
        self.D = pl.BlockSpec((1,), lambda b, h, k: (h,))


def _params(cfg, kind):
    warps, stages = dict(cfg.launch)[kind]
    return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _call(kernel, cfg, kind, grid, in_specs, out_specs, out_shape, name):
    """The pallas_call; with cfg.poison every output starts as NaN (aliased NaN-filled inputs),
    so an element the kernel fails to write shows up in the checks."""
    if not cfg.poison:
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            interpret=cfg.interpret,
            compiler_params=_params(cfg, kind),
            name=name,
        )
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    ospecs = list(out_specs) if isinstance(out_specs, (list, tuple)) else [out_specs]
    n_in = len(in_specs)

    def dropping(*refs):  # the aliased poison inputs are not read
        return kernel(*refs[:n_in], *refs[n_in + len(outs) :])

    call = pl.pallas_call(
        dropping,
        grid=grid,
        in_specs=list(in_specs) + ospecs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=_params(cfg, kind),
        name=name,
        input_output_aliases={n_in + i: i for i in range(len(outs))},
    )
    poison = [jnp.full(o.shape, jnp.nan, o.dtype) for o in outs]
    return lambda *args: call(*args, *poison)


def fwd_call(cfg, x, B, C, dt, cs, ind, outd, doc, s0, D):
    b, L, h, p = x.shape
    n = B.shape[-1]
    sp = Specs(cfg.T, h // B.shape[2], p, n)
    K = L // cfg.T
    kern = functools.partial(
        _fwd_kernel,
        Q=cfg.Q,
        nq=cfg.T // cfg.Q,
        has_doc=doc is not None,
        has_D=D is not None,
        cdt=cfg.cdt,
    )
    args = (
        [x, B, C, dt, cs, ind, outd]
        + ([doc] if doc is not None else [])
        + [s0]
        + ([D] if D is not None else [])
    )
    specs = (
        [sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl, sp.bhl]
        + ([sp.doc] if doc is not None else [])
        + [sp.state]
        + ([sp.D] if D is not None else [])
    )
    return _call(
        kern,
        cfg,
        "fwd",
        (b, h, K),
        specs,
        [sp.bhlp, sp.state],
        [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, K, h, p, n), F32)],
        "ssd_fwd",
    )(*args)


def state_call(cfg, u, v, ind, outd=None, dt=None, s0=None, s_win=None):
    """State sweeps over each superchunk, the forward state from (x, B, outd * dt) when outd is
    given, else the reverse adjoint from (dy, C, ind). Without s0: the superchunk-local end states
    (b, K, h, du, dv) float32, from zero. With s0 (b, K, h, du, dv), the states entering the
    superchunks (forward) or at their ends (reverse): (end states, the state at each chunk
    boundary (b, L // Q, h, du, dv) in u's dtype, and per window: forward the float32 state at its
    end (b, L // W, h, du, dv), reverse Z = <adjoint, s_win> at its end (b, h, L // W))."""
    reverse = outd is None
    chunks = s0 is not None
    b, L, h, du = u.shape
    dv = v.shape[-1]
    K = L // cfg.T
    nq = cfg.T // cfg.Q
    nw = nq // cfg.wq
    sp = Specs(cfg.T, h // v.shape[2], du, dv, nw)
    kern = functools.partial(
        _state_kernel, Q=cfg.Q, nq=nq, wq=cfg.wq, reverse=reverse, chunks=chunks, cdt=cfg.cdt
    )
    args = [u, v, ind] if reverse else [u, v, outd, dt, ind]
    specs = [sp.bhlp, sp.blgn] + [sp.bhl] * (len(args) - 2)
    out_specs = [sp.state]
    out_shape = [jax.ShapeDtypeStruct((b, K, h, du, dv), F32)]
    if chunks:
        args += [s0] + ([s_win] if reverse else [])
        specs += [sp.state] + ([sp.win] if reverse else [])
        out_specs += [
            pl.BlockSpec((_SQ, nq, _SQ, du, dv), lambda b, h, k: (b, k, h, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, nw), lambda b, h, k: (b, h, k)) if reverse else sp.win,
        ]
        out_shape += [
            jax.ShapeDtypeStruct((b, L // cfg.Q, h, du, dv), u.dtype),
            jax.ShapeDtypeStruct((b, h, K * nw), F32)
            if reverse
            else jax.ShapeDtypeStruct((b, K * nw, h, du, dv), F32),
        ]
    name = (
        ("ssd_sweep_rev" if reverse else "ssd_sweep")
        if chunks
        else ("ssd_state_rev" if reverse else "ssd_state")
    )
    outs = _call(kern, cfg, "state", (b, h, K), specs, out_specs, out_shape, name)(*args)
    return tuple(outs) if chunks else outs[0]


class ChunkSpecs:
    """BlockSpecs of the per-chunk backward kernels: grid (batch, block of hb heads, chunk); the
    hpg // hb blocks of a group share its B and C."""

    def __init__(self, Q, hb, hpg, p, n):
        nhb = hpg // hb
        self.bhlp = pl.BlockSpec((_SQ, Q, hb, p), lambda b, k, c: (b, c, k, 0))
        self.blgn = pl.BlockSpec((_SQ, Q, _SQ, n), lambda b, k, c: (b, c, k // nhb, 0))
        self.part = pl.BlockSpec((_SQ, Q, _SQ, n), lambda b, k, c: (b, c, k, 0))  # per block
        self.bhl = pl.BlockSpec((_SQ, hb, Q), lambda b, k, c: (b, k, c))
        self.doc = pl.BlockSpec((_SQ, Q), lambda b, k, c: (b, c))
        self.state = pl.BlockSpec((_SQ, _SQ, hb, p, n), lambda b, k, c: (b, c, k, 0, 0))
        self.D = pl.BlockSpec((hb,), lambda b, k, c: (k,))


def bwd_dx_call(cfg, dy, x, B, C, dt, cs, outd, doc, g_chunks, D):
    """dx, dB summed over each block of cfg.hb heads (b, L, h // hb, n) (`partial_dtype`), x.v,
    dy.x."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    sp = ChunkSpecs(cfg.Q, cfg.hb, h // B.shape[2], p, n)
    kern = functools.partial(
        _bwd_dx_kernel,
        Q=cfg.Q,
        hb=cfg.hb,
        has_doc=doc is not None,
        has_D=D is not None,
        cdt=cfg.cdt,
    )
    args = (
        [dy, x, B, C, dt, cs, outd]
        + ([doc] if doc is not None else [])
        + [g_chunks]
        + ([D] if D is not None else [])
    )
    specs = (
        [sp.bhlp, sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl]
        + ([sp.doc] if doc is not None else [])
        + [sp.state]
        + ([sp.D] if D is not None else [])
    )
    vec = jax.ShapeDtypeStruct((b, h, L), F32)
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((b, L, h // cfg.hb, n), partial_dtype(cfg, h, B)),
        vec,
        vec,
    ]
    return _call(
        kern,
        cfg,
        "dx",
        (b, h // cfg.hb, L // cfg.Q),
        specs,
        [sp.bhlp, sp.part, sp.bhl, sp.bhl],
        out_shape,
        "ssd_bwd_dx",
    )(*args)


def partial_dtype(cfg, h, B):
    """The dtype of the per-block dB and dC: B's where a group has one block of heads (nothing is
    summed after the kernel, and the gradient leaves in B's dtype: half the bytes in bfloat16),
    else float32 for the sum over the group's blocks."""
    return B.dtype if h // cfg.hb == B.shape[2] else F32


def bwd_dc_call(cfg, dy, x, B, C, dt, cs, ind, doc, s_chunks):
    """dC summed over each block of cfg.hb heads (b, L, h // hb, n) (`partial_dtype`), and the row
    sums."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    sp = ChunkSpecs(cfg.Q, cfg.hb, h // B.shape[2], p, n)
    kern = functools.partial(
        _bwd_dc_kernel, Q=cfg.Q, hb=cfg.hb, has_doc=doc is not None, cdt=cfg.cdt
    )
    args = [dy, x, B, C, dt, cs, ind] + ([doc] if doc is not None else []) + [s_chunks]
    specs = (
        [sp.bhlp, sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl]
        + ([sp.doc] if doc is not None else [])
        + [sp.state]
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, L, h // cfg.hb, n), partial_dtype(cfg, h, B)),
        jax.ShapeDtypeStruct((b, h, L), F32),
    ]
    return _call(
        kern,
        cfg,
        "dc",
        (b, h // cfg.hb, L // cfg.Q),
        specs,
        [sp.part, sp.bhl],
        out_shape,
        "ssd_bwd_dc",
    )(*args)
