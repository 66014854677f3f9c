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

Mamba-3 (`spread`): B and C are the group's k and q, and every kernel turns its tile per head
(bias added, channel pairs rotated by the head's cumulative angles, `_turning`), so per-head
operands never go to device memory; the per-chunk backward kernels turn dB and dC back before
summing them over their heads and write the angles' and biases' gradients. Without it the
kernels are exactly Mamba-2's.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None


class Rotation(NamedTuple):
    """Mamba-3 in the kernels: B and C are the group's k and q, turned per head (`_turning`)."""

    spread: int  # the turned pair slots' stride; angles.shape[-1] * spread = n / 2
    angles: jax.Array  # (b, L, h, s) float32, cumulative
    q_bias: jax.Array  # (h, n) float32
    k_bias: jax.Array  # (h, n) float32
    d_diagonal: jax.Array | None = None  # backward: the gradient of C_t . B_t, (b, h, L)


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


def _interleave(a, b):
    """(..., m), (..., m) -> (..., 2m): a_0, b_0, a_1, b_1, ..."""
    return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], -1)


def _turning(phi, spread):
    """cos and sin (..., n) of the rotation by per-pair angles phi (..., s), n = 2 s spread: pair
    slot i spread (channels 2 i spread, 2 i spread + 1) turns by phi[..., i], the slots between
    do not (cos 1, sin 0). Transcendentals on the angles only, and only the stack, unstack and
    reshape that Triton lowers."""
    cos, sin = jnp.cos(phi), jnp.sin(phi)
    while spread > 1:
        cos, sin = _interleave(cos, jnp.ones_like(cos)), _interleave(sin, jnp.zeros_like(sin))
        spread //= 2
    return _interleave(cos, cos), _interleave(sin, sin)


def _turn(x, cos, sin):
    """x (..., n) float32, channel pairs (2i, 2i+1) = (a, b) -> (a cos - b sin, a sin + b cos)."""
    a, b = jnp.unstack(x.reshape(*x.shape[:-1], -1, 2), axis=-1)
    return x * cos + _interleave(-b, a) * sin


def _turned(tile, bias, cos, sin, cdt):
    """A group's q or k tile plus one head's bias, turned, in the operand dtype."""
    return _turn(tile.astype(F32) + bias[None, :], cos, sin).astype(cdt)


def _turn_back(g, cos, sin):
    """The transpose of `_turn`: g turned by the opposite angles."""
    return _turn(g, cos, -sin)


def _angle_grad(g, y, spread):
    """d/d angles (..., s) of sum(g * y) for y = _turn(x) (float32, (..., n)): per turned pair
    (a, b) of y, g_a (-b) + g_b a; the slots between (`_turning`) are dropped."""
    pair = lambda t: jnp.unstack(t.reshape(*t.shape[:-1], -1, 2), axis=-1)
    (ga, gb), (a, b) = pair(g), pair(y)
    per_pair = gb * a - ga * b
    while spread > 1:
        per_pair = pair(per_pair)[0]
        spread //= 2
    return per_pair


class _Rotor:
    """Mamba-3's per-head rotation of the group's q or k tile inside a kernel: (tile + the head's
    bias) turned by the head's cumulative angles of the chunk's positions, in the operand dtype."""

    def __init__(self, phi_ref, spread, cdt):
        self.phi_ref, self.spread, self.cdt = phi_ref, spread, cdt

    def __call__(self, tile, bias, sl):
        return _turned(tile, bias, *_turning(self.phi_ref[sl, :], self.spread), self.cdt)


class _Chunk:
    """Loads of one chunk's slices from the superchunk refs."""

    def __init__(self, j, Q):
        self.start = pl.multiple_of(j * Q, Q)
        self.sl = pl.ds(self.start, Q)
        self.last = j * Q + (Q - 1)


# ----------------------------------------------------------------------------------------------
# forward: y = intra-chunk (masked C.B^T decay product) + inter-chunk (C . state) + D x
# ----------------------------------------------------------------------------------------------
def _fwd_kernel(*refs, Q, nq, has_doc, has_D, cdt, spread=None):
    """spread: Mamba-3, B and C are the group's k and q, turned here per head (`_Rotor`); the
    kernel also writes the diagonal C_t . B_t of the operands it multiplied."""
    it = iter(refs)
    x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref, outd_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    s0_ref = next(it)
    d_ref = next(it) if has_D else None
    if spread:
        rotor = _Rotor(next(it), spread, cdt)
        qb, kb = next(it)[...], next(it)[...]
    y_ref, sout_ref = next(it), next(it)
    qk_ref = next(it) if spread else None

    def body(j, S):
        ch = _Chunk(j, Q)
        x = x_ref[ch.sl, :]
        Bm = b_ref[ch.sl, :]
        Cm = c_ref[ch.sl, :]
        if spread:
            Bm, Cm = rotor(Bm, kb, ch.sl), rotor(Cm, qb, ch.sl)
            qk_ref[ch.sl] = jnp.sum(Cm.astype(F32) * Bm.astype(F32), axis=1)
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
def _state_kernel(*refs, Q, nq, wq, reverse, chunks, cdt, spread=None):
    """spread: v is Mamba-3's group k (forward) or q (reverse), turned here per head."""
    it = iter(refs)
    u_ref, v_ref = next(it), next(it)
    w_refs = [next(it)] if reverse else [next(it), next(it)]  # ind | outd, dt
    ind_ref = w_refs[0] if reverse else next(it)
    if spread:
        rotor = _Rotor(next(it), spread, cdt)
        bias = next(it)[...]
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
        v = v_ref[ch.sl, :] if not spread else rotor(v_ref[ch.sl, :], bias, ch.sl)
        v = (w[:, None] * v.astype(F32)).astype(cdt)
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
class _PerHead:
    """Mamba-3 in the per-chunk backward kernels: the refs of the angles (Q, hb, s), both biases
    (hb, n) and the diagonal's gradient (hb, Q); turns the group's tiles for head i and turns a
    gradient back, writing the angles' and the bias's share."""

    def __init__(self, it, spread, cdt):
        self.phi_ref, self.qb_ref, self.kb_ref, self.dqk_ref = (next(it) for _ in range(4))
        self.spread, self.cdt = spread, cdt

    def __call__(self, i, Bg, Cg):
        """(B, C) of head i in the operand dtype, and the cos and sin that turned them."""
        cos, sin = _turning(self.phi_ref[:, i, :], self.spread)
        B = _turned(Bg, self.kb_ref[i], cos, sin, self.cdt)
        return B, _turned(Cg, self.qb_ref[i], cos, sin, self.cdt), cos, sin

    def back(self, i, d, mine, other, cos, sin, dphi_ref, dbias_ref):
        """d (Q, n) float32, the gradient of this head's turned operand `mine`, plus the
        diagonal's share (the other operand times d(C_t . B_t)), turned back; writes the angles'
        and the bias's parts."""
        d = d + self.dqk_ref[i, :][:, None] * other.astype(F32)
        dphi_ref[:, i, :] = _angle_grad(d, mine.astype(F32), self.spread)
        d = _turn_back(d, cos, sin)
        dbias_ref[i, :] = jnp.sum(d, axis=0)
        return d


def _bwd_dx_kernel(*refs, Q, hb, has_doc, has_D, cdt, spread=None):
    """Given the adjoint G at the chunk's end (operand dtype): dx, the block's dB, x_s . v_s (the
    column sums of the pair terms over dt_s, see ssd.py) and dy . x for dD. spread (Mamba-3): B
    and C are the group's k and q, turned per head here (`_PerHead`); dB also takes the
    diagonal's share and is turned back before the block's sum; the kernel also writes the
    angles' gradient (k's part) and the k bias's gradient summed over the chunk."""
    it = iter(refs)
    dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, outd_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    g_ref = next(it)
    d_ref = next(it) if has_D else None
    turned = _PerHead(it, spread, cdt) if spread else None
    dx_ref, db_ref, xv_ref, dyx_ref = (next(it) for _ in range(4))
    if spread:
        dphi_ref, dbias_ref = next(it), next(it)

    Bg, Cg = b_ref[...], c_ref[...]
    doc = doc_ref[...] if has_doc else None
    if not spread:  # the group's B.C^T, shared by the block's heads
        BC_shared = _dot(Bg, Cg, tb=True)  # [s, t]

    def head(i, dB):
        dy, x, G = dy_ref[:, i, :], x_ref[:, i, :], g_ref[i]
        if spread:
            Bm, Cm, cos, sin = turned(i, Bg, Cg)
            BC = _dot(Bm, Cm, tb=True)
        else:
            Bm, Cm, BC = Bg, Cg, BC_shared
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
        dB_h = dt[:, None] * (_dot((XdY * Lt).astype(cdt), Cm) + outd[:, None] * _dot(x, G))
        if spread:
            dB_h = turned.back(i, dB_h, Bm, Cm, cos, sin, dphi_ref, dbias_ref)
        return dB + dB_h

    db_ref[...] = jax.lax.fori_loop(0, hb, head, jnp.zeros(Bg.shape, F32))


def _bwd_dc_kernel(*refs, Q, hb, has_doc, cdt, spread=None):
    """Given the state S entering the chunk (operand dtype): the block's dC and the row sums of
    the pair terms, C_t . dC_t (intra-chunk from the float32 pair terms). spread: as the dx
    kernel's, for C (q's part of the angles' gradient, the q bias's gradient)."""
    it = iter(refs)
    dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    s_ref = next(it)
    turned = _PerHead(it, spread, cdt) if spread else None
    dc_ref, rs_ref = next(it), next(it)
    if spread:
        dphi_ref, dbias_ref = next(it), next(it)

    Bg, Cg = b_ref[...], c_ref[...]
    doc = doc_ref[...] if has_doc else None
    if not spread:  # the group's C.B^T, shared by the block's heads
        CB_shared, Cf_shared = _dot(Cg, Bg, tb=True), Cg.astype(F32)  # [t, s]

    def head(i, dC):
        dy, x, S = dy_ref[:, i, :], x_ref[:, i, :], s_ref[i]
        if spread:
            Bm, Cm, cos, sin = turned(i, Bg, Cg)
            CB = _dot(Cm, Bm, tb=True)
        else:
            Bm, Cm, CB = Bg, Cg, CB_shared
        Cf = Cm.astype(F32) if spread else Cf_shared
        dt, cs, ind = dt_ref[i, :], cs_ref[i, :], ind_ref[i, :]
        L = _pair_decay(cs, doc, doc, Q, transpose=False)
        P = _dot(dy, x, tb=True) * L * dt[None, :]  # [t, s]
        dC_in = ind[:, None] * _dot(dy, S)
        rs_ref[i, :] = jnp.sum(P * CB, axis=1) + jnp.sum(Cf * dC_in, axis=1)
        dC_h = _dot(P.astype(cdt), Bm) + dC_in
        if spread:
            dC_h = turned.back(i, dC_h, Cm, Bm, cos, sin, dphi_ref, dbias_ref)
        return dC + dC_h

    dc_ref[...] = jax.lax.fori_loop(0, hb, head, jnp.zeros(Cg.shape, F32))


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


def _rotation_inputs(angles, biases, T):
    """Kernel inputs and specs of Mamba-3's rotation, grid (batch, head, superchunk): the
    per-head angles (b, L, h, s) and biases (h, n) float32."""
    phi_spec = pl.BlockSpec((_SQ, T, _SQ, angles.shape[-1]), lambda b, h, k: (b, k, h, 0))
    bias_spec = pl.BlockSpec((_SQ, biases[0].shape[-1]), lambda b, h, k: (h, 0))
    return [angles, *biases], [phi_spec] + [bias_spec] * len(biases)


def fwd_call(cfg, x, B, C, dt, cs, ind, outd, doc, s0, D, rot=None):
    """y and each superchunk's end state; with a `Rotation` (Mamba-3) also the diagonal
    C_t . B_t (b, h, L) of the turned operands."""
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
        spread=rot and rot.spread,
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
    out_specs = [sp.bhlp, sp.state]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, K, h, p, n), F32)]
    if rot:
        extra, extra_specs = _rotation_inputs(rot.angles, [rot.q_bias, rot.k_bias], sp.T)
        args, specs = args + extra, specs + extra_specs
        out_specs.append(sp.bhl)
        out_shape.append(jax.ShapeDtypeStruct((b, h, L), F32))
    return _call(kern, cfg, "fwd", (b, h, K), specs, out_specs, out_shape, "ssd_fwd")(*args)


def state_call(cfg, u, v, ind, outd=None, dt=None, s0=None, s_win=None, rot=None):
    """State sweeps over each superchunk, the forward state from (x, B, outd * dt) when outd is
    given, else the reverse adjoint from (dy, C, ind). Without s0: the superchunk-local end states
    (b, K, h, du, dv) float32, from zero. With s0 (b, K, h, du, dv), the states entering the
    superchunks (forward) or at their ends (reverse): (end states, the state at each chunk
    boundary (b, L // Q, h, du, dv) in u's dtype, and per window: forward the float32 state at its
    end (b, L // W, h, du, dv), reverse Z = <adjoint, s_win> at its end (b, h, L // W)). With a
    `Rotation`, v is Mamba-3's group k (forward) or q (reverse), turned per head."""
    reverse = outd is None
    chunks = s0 is not None
    b, L, h, du = u.shape
    dv = v.shape[-1]
    K = L // cfg.T
    nq = cfg.T // cfg.Q
    nw = nq // cfg.wq
    sp = Specs(cfg.T, h // v.shape[2], du, dv, nw)
    kern = functools.partial(
        _state_kernel,
        Q=cfg.Q,
        nq=nq,
        wq=cfg.wq,
        reverse=reverse,
        chunks=chunks,
        cdt=cfg.cdt,
        spread=rot and rot.spread,
    )
    args = [u, v, ind] if reverse else [u, v, outd, dt, ind]
    specs = [sp.bhlp, sp.blgn] + [sp.bhl] * (len(args) - 2)
    if rot:
        bias = rot.q_bias if reverse else rot.k_bias
        extra, extra_specs = _rotation_inputs(rot.angles, [bias], sp.T)
        args, specs = args + extra, specs + extra_specs
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


def _per_head_rotation(rot, cfg, x_shape, n, args, specs, out_specs, out_shape):
    """(args, specs, out_specs, out_shape) of a per-chunk backward kernel, grid (batch, block of
    hb heads, chunk), with Mamba-3's added for a `Rotation` (with d_diagonal): its outputs gain
    the angles' part (b, L, h, s) and the bias's gradient summed over each chunk
    (b, L // Q, h, n)."""
    if not rot:
        return args, specs, out_specs, out_shape
    _, phi, q_bias, k_bias, dqk = rot
    b, L, h, _ = x_shape
    Q, hb, s = cfg.Q, cfg.hb, phi.shape[-1]
    phi_spec = pl.BlockSpec((_SQ, Q, hb, s), lambda b, k, c: (b, c, k, 0))
    bias_spec = pl.BlockSpec((hb, n), lambda b, k, c: (k, 0))
    dqk_spec = pl.BlockSpec((_SQ, hb, Q), lambda b, k, c: (b, k, c))
    bias_sums = pl.BlockSpec((_SQ, _SQ, hb, n), lambda b, k, c: (b, c, k, 0))
    return (
        args + [phi, q_bias, k_bias, dqk],
        specs + [phi_spec, bias_spec, bias_spec, dqk_spec],
        out_specs + [phi_spec, bias_sums],
        out_shape
        + [
            jax.ShapeDtypeStruct((b, L, h, s), F32),
            jax.ShapeDtypeStruct((b, L // Q, h, n), F32),
        ],
    )


def bwd_dx_call(cfg, dy, x, B, C, dt, cs, outd, doc, g_chunks, D, rot=None):
    """dx, dB summed over each block of cfg.hb heads (b, L, h // hb, n) float32, x.v, dy.x; with
    a `Rotation` dB is the group's k's, followed by the angles' k part and the k bias's chunk
    sums."""
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
        spread=rot and rot.spread,
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
        jax.ShapeDtypeStruct((b, L, h // cfg.hb, n), F32),
        vec,
        vec,
    ]
    io = _per_head_rotation(
        rot, cfg, x.shape, n, args, specs, [sp.bhlp, sp.part, sp.bhl, sp.bhl], out_shape
    )
    return _call(kern, cfg, "dx", (b, h // cfg.hb, L // cfg.Q), *io[1:], "ssd_bwd_dx")(*io[0])


def bwd_dc_call(cfg, dy, x, B, C, dt, cs, ind, doc, s_chunks, rot=None):
    """dC summed over each block of cfg.hb heads (b, L, h // hb, n) float32, and the row sums;
    with rot as `bwd_dx_call`'s, for q (dC the group's q's, the angles' q part, the q bias's)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    sp = ChunkSpecs(cfg.Q, cfg.hb, h // B.shape[2], p, n)
    kern = functools.partial(
        _bwd_dc_kernel,
        Q=cfg.Q,
        hb=cfg.hb,
        has_doc=doc is not None,
        cdt=cfg.cdt,
        spread=rot and rot.spread,
    )
    args = [dy, x, B, C, dt, cs, ind] + ([doc] if doc is not None else []) + [s_chunks]
    specs = (
        [sp.bhlp, sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl]
        + ([sp.doc] if doc is not None else [])
        + [sp.state]
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, L, h // cfg.hb, n), F32),
        jax.ShapeDtypeStruct((b, h, L), F32),
    ]
    io = _per_head_rotation(rot, cfg, x.shape, n, args, specs, [sp.part, sp.bhl], out_shape)
    return _call(kern, cfg, "dc", (b, h // cfg.hb, L // cfg.Q), *io[1:], "ssd_bwd_dc")(*io[0])
