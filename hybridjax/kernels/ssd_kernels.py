"""Pallas (Triton backend) kernels for the chunked SSD scan: the bodies and their pallas_calls.

Every kernel runs one program per (batch, head, superchunk) and walks the superchunk's chunks of
Q positions in a sequential loop, carrying a (p, n) float32 state in registers. Per chunk it does
small matmuls on the tensor cores (C.B^T, the masked-decay product with x, the state in/out
terms), so the per-chunk states never go to device memory. Superchunks make the grid wide enough
to fill the GPU; what crosses superchunk boundaries is a (p, n) state per superchunk, passed in
plain XLA (see ssd.py).

Per-position float32 vectors, computed once in XLA, carry everything about decays and resets:
  dt (the step), cs (cumulative log decay inside the chunk), ind (exp(cs_t), zero once a reset has
  happened inside the chunk at or before t: how much of the chunk's entering state reaches t),
  outd (exp(cs_last - cs_s), zero if a reset follows s inside the chunk: how much of position s
  reaches the chunk's end state). The chunk's own decay is ind at its last position. Inside a
  chunk, the pairs (t, s) are masked by causality and by the document index `doc`.

The same bodies run in Pallas interpret mode on the CPU (tests) and through Triton on the GPU.
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
  return jax.lax.dot_general(a, b, (((0 if ta else 1,), (1 if tb else 0,)), ((), ())),
                             precision=prec, preferred_element_type=F32)


def _dot_state(a, S, cdt, split, ta=False, tb=False):
  """a @ S for a float32 state S: with split, S = hi + lo in cdt (about 16 mantissa bits)."""
  hi = S.astype(cdt)
  out = _dot(a, hi, ta, tb)
  if split and hi.dtype != F32:
    out = out + _dot(a, (S - hi.astype(F32)).astype(cdt), ta, tb)
  return out


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
# superchunk-local state: sum over chunks of U^T diag(w) V, chained by the chunk decays;
# forward (x, B, w = outd*dt) for the state, reverse (dy, C, w = ind) for the adjoint.
# ----------------------------------------------------------------------------------------------
def _state_kernel(*refs, Q, nq, reverse, cdt):
  if reverse:  # weights ind
    u_ref, v_ref, ind_ref, out_ref = refs
  else:  # weights outd * dt
    u_ref, v_ref, outd_ref, dt_ref, ind_ref, out_ref = refs

  def body(i, S):
    j = nq - 1 - i if reverse else i
    ch = _Chunk(j, Q)
    u = u_ref[ch.sl, :]
    w = ind_ref[ch.sl] if reverse else outd_ref[ch.sl] * dt_ref[ch.sl]
    v = (w[:, None] * v_ref[ch.sl, :].astype(F32)).astype(cdt)
    return ind_ref[ch.last] * S + _dot(u, v, ta=True)

  out_ref[...] = jax.lax.fori_loop(0, nq, body, jnp.zeros(out_ref.shape, F32))


# ----------------------------------------------------------------------------------------------
# backward, reverse sweep carrying the adjoint state G (p, n): dx, per-head dB, x.v, dy.x and
# the pieces of d(log decay) (see ssd.py): the exact intra-chunk row and column sums of the pair
# terms, the inter-chunk column sums, and Z = <G, S> at each window end (S from the dc kernel).
# ----------------------------------------------------------------------------------------------
def _bwd_dx_kernel(*refs, Q, nq, wq, has_doc, has_D, cdt, split):
  it = iter(refs)
  dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref, outd_ref = (next(it) for _ in range(8))
  doc_ref = next(it) if has_doc else None
  g_ref, sw_ref = next(it), next(it)
  d_ref = next(it) if has_D else None
  dx_ref, db_ref, xv_ref, dcs_ref, z_ref, dyx_ref, gout_ref = (next(it) for _ in range(7))

  def body(i, carry):
    G, Z = carry
    j = nq - 1 - i
    ch = _Chunk(j, Q)
    # entering a new window (its last chunk): Z = <adjoint, state> at the window's end
    Z = jax.lax.cond(_ends_window(j, wq), lambda: jnp.sum(G * sw_ref[_window(j, wq)]), lambda: Z)
    dy = dy_ref[ch.sl, :]
    x = x_ref[ch.sl, :]
    Bm = b_ref[ch.sl, :]
    Cm = c_ref[ch.sl, :]
    dt = dt_ref[ch.sl]
    cs = cs_ref[ch.sl]
    ind = ind_ref[ch.sl]
    outd = outd_ref[ch.sl]
    doc = doc_ref[ch.sl] if has_doc else None
    cdec = ind_ref[ch.last]
    Lt = _pair_decay(cs, doc, doc, Q, transpose=True)  # [s, t]
    Gc = G.astype(cdt)
    BCL = _dot(Bm, Cm, tb=True) * Lt  # [s, t]
    XdY = _dot(x, dy, tb=True)  # [s, t]
    M = BCL * XdY  # the intra-chunk pair terms without dt_s
    # v_s = G_s B_s: what dx_s is before the dt_s factor.
    V_in = outd[:, None] * _dot_state(Bm, G, cdt, split, tb=True)
    V = _dot(BCL.astype(cdt), dy) + V_in
    xf = x.astype(F32)
    dyf = dy.astype(F32)
    dx = dt[:, None] * V
    if has_D:
      dx = dx + d_ref[0] * dyf
    dx_ref[ch.sl, :] = dx.astype(dx_ref.dtype)
    xv_in = jnp.sum(xf * V_in, axis=1)
    xv_ref[ch.sl] = jnp.sum(M, axis=1) + xv_in
    # row sums (over s <= t) minus column sums (over t >= s, including later chunks)
    dcs_ref[ch.sl] = jnp.sum(M * dt[:, None], axis=0) - dt * (jnp.sum(M, axis=1) + xv_in)
    z_ref[ch.sl] = jnp.full((Q,), Z, F32)
    dyx_ref[ch.sl] = jnp.sum(xf * dyf, axis=1)
    dB = _dot((XdY * Lt).astype(cdt), Cm) + outd[:, None] * _dot(x, Gc)
    db_ref[ch.sl, :] = (dt[:, None] * dB).astype(db_ref.dtype)
    return cdec * G + _dot_state(dy, ind[:, None] * Cm.astype(F32), cdt, split, ta=True), Z

  G, _ = jax.lax.fori_loop(0, nq, body, (g_ref[...], jnp.zeros((), F32)))
  gout_ref[...] = G


# ----------------------------------------------------------------------------------------------
# backward, forward sweep carrying the state S: per-head dC, the inter-chunk row sums
# C_t . dC_t(from the entering state), and the state at each window end
# ----------------------------------------------------------------------------------------------
def _bwd_dc_kernel(*refs, Q, nq, wq, has_doc, cdt, split):
  it = iter(refs)
  dy_ref, x_ref, b_ref, c_ref, dt_ref, cs_ref, ind_ref, outd_ref = (next(it) for _ in range(8))
  doc_ref = next(it) if has_doc else None
  s0_ref = next(it)
  dc_ref, rs_ref, sw_ref = next(it), next(it), next(it)

  def body(j, S):
    ch = _Chunk(j, Q)
    dy = dy_ref[ch.sl, :]
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
    P = (_dot(dy, x, tb=True) * L * dt[None, :]).astype(cdt)
    dC_in = ind[:, None] * _dot_state(dy, S, cdt, split)
    dc_ref[ch.sl, :] = (_dot(P, Bm) + dC_in).astype(dc_ref.dtype)
    rs_ref[ch.sl] = jnp.sum(Cm.astype(F32) * dC_in, axis=1)
    S = cdec * S + _dot_state(x, (outd * dt)[:, None] * Bm.astype(F32), cdt, split, ta=True)

    @pl.when(_ends_window(j, wq))
    def _():
      sw_ref[_window(j, wq)] = S

    return S

  jax.lax.fori_loop(0, nq, body, s0_ref[...])


# ----------------------------------------------------------------------------------------------
# pallas_call builders. Grid (batch, head, superchunk); T = Q * nq positions per superchunk.
# ----------------------------------------------------------------------------------------------
class Specs:
  """BlockSpecs of the array layouts the kernels read and write."""

  def __init__(self, T, hpg, p, n, nw=1):
    self.T = T
    self.win = pl.BlockSpec((_SQ, nw, _SQ, p, n), lambda b, h, k: (b, k, h, 0, 0))
    self.bhlp = pl.BlockSpec((_SQ, T, _SQ, p), lambda b, h, k: (b, k, h, 0))     # x, y, dy, dx
    self.blgn = pl.BlockSpec((_SQ, T, _SQ, n), lambda b, h, k: (b, k, h // hpg, 0))  # B, C
    self.blhn = pl.BlockSpec((_SQ, T, _SQ, n), lambda b, h, k: (b, k, h, 0))     # per-head dB, dC
    self.bhl = pl.BlockSpec((_SQ, _SQ, T), lambda b, h, k: (b, h, k))            # per position
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
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=cfg.interpret,
                          compiler_params=_params(cfg, kind), name=name)
  outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
  ospecs = list(out_specs) if isinstance(out_specs, (list, tuple)) else [out_specs]
  n_in = len(in_specs)

  def dropping(*refs):  # the aliased poison inputs are not read
    return kernel(*refs[:n_in], *refs[n_in + len(outs):])

  call = pl.pallas_call(dropping, grid=grid, in_specs=list(in_specs) + ospecs,
                        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                        compiler_params=_params(cfg, kind), name=name,
                        input_output_aliases={n_in + i: i for i in range(len(outs))})
  poison = [jnp.full(o.shape, jnp.nan, o.dtype) for o in outs]
  return lambda *args: call(*args, *poison)


def fwd_call(cfg, x, B, C, dt, cs, ind, outd, doc, s0, D):
  b, L, h, p = x.shape
  n = B.shape[-1]
  sp = Specs(cfg.T, h // B.shape[2], p, n)
  K = L // cfg.T
  kern = functools.partial(_fwd_kernel, Q=cfg.Q, nq=cfg.T // cfg.Q, has_doc=doc is not None,
                           has_D=D is not None, cdt=cfg.cdt)
  args = [x, B, C, dt, cs, ind, outd] + ([doc] if doc is not None else []) + [s0] + (
      [D] if D is not None else [])
  specs = [sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl, sp.bhl] + (
      [sp.doc] if doc is not None else []) + [sp.state] + ([sp.D] if D is not None else [])
  return _call(kern, cfg, "fwd", (b, h, K), specs, [sp.bhlp, sp.state],
               [jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((b, K, h, p, n), F32)], "ssd_fwd")(*args)


def state_call(cfg, u, v, ind, outd=None, dt=None):
  """Superchunk-local (du, dv) states, (b, K, h, du, dv) float32: the forward state from
  (x, B, outd * dt) when outd is given, else the reverse adjoint from (dy, C, ind)."""
  reverse = outd is None
  b, L, h, du = u.shape
  dv = v.shape[-1]
  K = L // cfg.T
  sp = Specs(cfg.T, h // v.shape[2], du, dv)
  kern = functools.partial(_state_kernel, Q=cfg.Q, nq=cfg.T // cfg.Q, reverse=reverse,
                           cdt=cfg.cdt)
  args = [u, v, ind] if reverse else [u, v, outd, dt, ind]
  return _call(kern, cfg, "state", (b, h, K), [sp.bhlp, sp.blgn] + [sp.bhl] * (len(args) - 2),
               sp.state, jax.ShapeDtypeStruct((b, K, h, du, dv), F32),
               "ssd_state_rev" if reverse else "ssd_state")(*args)


def bwd_dx_call(cfg, dy, x, B, C, dt, cs, ind, outd, doc, g_end, s_win, D, part_dtype):
  b, L, h, p = x.shape
  n = B.shape[-1]
  K = L // cfg.T
  nq = cfg.T // cfg.Q
  sp = Specs(cfg.T, h // B.shape[2], p, n, nq // cfg.wq)
  kern = functools.partial(_bwd_dx_kernel, Q=cfg.Q, nq=nq, wq=cfg.wq,
                           has_doc=doc is not None, has_D=D is not None, cdt=cfg.cdt,
                           split=cfg.split)
  args = [dy, x, B, C, dt, cs, ind, outd] + ([doc] if doc is not None else []) + [
      g_end, s_win] + ([D] if D is not None else [])
  specs = [sp.bhlp, sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl, sp.bhl] + (
      [sp.doc] if doc is not None else []) + [sp.state, sp.win] + ([sp.D] if D is not None else [])
  vec = jax.ShapeDtypeStruct((b, h, L), F32)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((b, L, h, n), part_dtype), vec, vec, vec, vec,
               jax.ShapeDtypeStruct((b, K, h, p, n), F32)]
  return _call(kern, cfg, "dx", (b, h, K), specs,
               [sp.bhlp, sp.blhn, sp.bhl, sp.bhl, sp.bhl, sp.bhl, sp.state],
               out_shape, "ssd_bwd_dx")(*args)


def bwd_dc_call(cfg, dy, x, B, C, dt, cs, ind, outd, doc, s0, part_dtype):
  b, L, h, p = x.shape
  n = B.shape[-1]
  K = L // cfg.T
  nq = cfg.T // cfg.Q
  sp = Specs(cfg.T, h // B.shape[2], p, n, nq // cfg.wq)
  kern = functools.partial(_bwd_dc_kernel, Q=cfg.Q, nq=nq, wq=cfg.wq,
                           has_doc=doc is not None, cdt=cfg.cdt, split=cfg.split)
  args = [dy, x, B, C, dt, cs, ind, outd] + ([doc] if doc is not None else []) + [s0]
  specs = [sp.bhlp, sp.bhlp, sp.blgn, sp.blgn, sp.bhl, sp.bhl, sp.bhl, sp.bhl] + (
      [sp.doc] if doc is not None else []) + [sp.state]
  out_shape = [jax.ShapeDtypeStruct((b, L, h, n), part_dtype),
               jax.ShapeDtypeStruct((b, h, L), F32),
               jax.ShapeDtypeStruct((b, L // (cfg.Q * cfg.wq), h, p, n), F32)]
  return _call(kern, cfg, "dc", (b, h, K), specs, [sp.blhn, sp.bhl, sp.win], out_shape,
               "ssd_bwd_dc")(*args)
