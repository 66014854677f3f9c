"""`causal_conv1d_silu_pallas`: the Mamba-2 short convolution and its SiLU as Pallas (Triton)
kernels, forward and backward (jax.custom_vjp).

    pre[t] = bias + sum_i w[i] x[t - (K-1) + i] m_i(t)        y[t] = silu(pre[t])

x (B, L, C), w (K, C), bias (C,), all arithmetic in float32 and one rounding to x.dtype at the
end. m_i(t) = [doc[t - (K-1) + i] == doc[t]] with doc (B, L) the document index per position
(`hybridjax.ops.segments.document_index`); without doc every tap counts. The K-1 inputs before
position 0 are `initial_state` (B, K-1, C) (zeros without it) and belong to doc[:, 0]'s document.

Kernels (one program per (row, block of BL positions, block of BC channels); taps streamed, one
shifted (BL, BC) tile loaded at a time, the neighbouring blocks' rows come from the cache):

  forward   y for the block's positions.
  backward  for the block's input rows a, with g = dy silu'(pre) and s = K-1-i:
                dx[a]  = sum_i w[i] G_i[a]        G_i[a] = g[a+s] [doc[a] == doc[a+s]]
                dw[i] += sum_a x[a] G_i[a]        db    += sum_a g[a]
            Each program recomputes pre, and g, for its block's rows and the K-1 after them
            (a tile of T = K-1 rounded up to a power of two) from x, and reads g back shifted
            through a float32 scratch of its own ((BL + T, BC), an output that is dropped,
            written and read by the same program between two barriers, so it stays in cache).
            Saving pre in the forward instead would keep a float32 (B, L, C) residual per conv
            until the backward (twice x's bytes in bfloat16) and write and read it once more;
            the recompute reads only x and dy from memory. Recomputing pre at every shift
            instead of going through the scratch (K^2 tile loads and K sigmoids per element)
            measured 2.2x slower (H100, B4 L4096 C4096: fwd+bwd 1.69 ms against 0.78 ms).
            One program walks `nb` blocks and keeps dw and db as float32 (BL, BC) tiles, summed
            over their rows once at its end; the per-program partials (B, programs, K, C) are
            summed in XLA (deterministic, no atomics).

Loads never start before their array's first row. Pallas interpret mode clamps a slice that
starts below zero (it pads only past the end), so the first block of positions, which reaches
the K-1 inputs before position 0, reads a small XLA-built `head` array, [initial_state or
zeros, x[:, :BL + T]], instead of x; every other block starts at least BL >= K-1 rows into x.
Rows past L and channels past C are masked on every load and store, so lengths and channel
counts need not divide the blocks.

What flows back through the initial state (its gradient, and its rows' part of dw) involves only
the first K-1 outputs: a few (B, C) products in XLA (`_initial_state_grads`).

The same bodies run in Pallas interpret mode on the CPU (tests) and through Triton on the GPU
(interpret mode runs a program's code in order and has no barrier: there the barriers are left
out).

Measured (one H100, `python -m hybridjax.bench conv`, bfloat16, 4 documents per row, K=4;
XLA's path is the shifted-window sum with SiLU, autodiff for the backward;
docs/measurements/h100_conv_kernel_defaults.log):
    B4 L4096 C4096   fwd 0.152 ms (XLA 0.182)   fwd+bwd 0.726 ms (XLA 0.907)
    B4 L4096 C2048   fwd 0.089 ms (XLA 0.103)   fwd+bwd 0.385 ms (XLA 0.489)
The tuning defaults below are the best of a sweep over BL 16..128, BC 64..256, nb 1..16 and
2..8 warps (its log was not kept).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from hybridjax.kernels.ssd import backend_reason

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# Tuning defaults (positions and channels per block, blocks per backward program, launches),
# measured on one H100 (module docstring).
BLOCK_L = 32
BLOCK_C = 128
BLOCKS_PER_PROGRAM = 8
LAUNCH = (("fwd", (4, 2)), ("bwd", (8, 2)))


@dataclasses.dataclass(frozen=True)
class Config:
    BL: int  # positions per block (>= K - 1)
    BC: int  # channels per block
    nb: int  # blocks per backward program
    interpret: bool
    launch: tuple = LAUNCH


def _pow2(v):
    return isinstance(v, int) and v >= 1 and (v & (v - 1)) == 0


def unsupported_reason(x, kernel, *, interpret=False, block_l=None, **unused):
    """None when `causal_conv1d_silu_pallas` takes x (B, L, C) and kernel (K, C) on this backend,
    else a sentence saying why not."""
    del unused
    if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2]:
        return (
            f"x must be (batch, length, channels) and kernel (kernel_size, channels); got "
            f"{x.shape} and {kernel.shape}"
        )
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return (
            f"x dtype {jnp.dtype(x.dtype).name} is not supported by the Pallas conv kernel "
            "(bfloat16, float16 or float32; use impl='xla' for float64)"
        )
    bl = block_l or BLOCK_L
    if kernel.shape[0] < 1 or kernel.shape[0] - 1 > bl:
        return f"kernel_size {kernel.shape[0]} must be in 1..{bl + 1} (block_l + 1)"
    return backend_reason("hybridjax.kernels.causal_conv1d_silu_pallas", interpret)


# ----------------------------------------------------------------------------------------------
# loads of one block's shifted tiles
# ----------------------------------------------------------------------------------------------
class _Block:
    """Tiles of one block of positions [a0, a0 + BL) and channels [c0, c0 + BC).

    `x_ref`/`doc_ref` are x's (L, C) and doc's (L,) or the head's; `base` is the ref row of
    position a0 (a0 in x, K-1 in the head, where a0 = 0). x(d, n) is the float32 tile of the n
    rows from a0 + d (BL by default), zero past L and past C."""

    def __init__(self, x_ref, doc_ref, base, a0, c0, cmask, L, BL, BC):
        self.x_ref, self.doc_ref, self.base = x_ref, doc_ref, base
        self.a0, self.c0, self.cmask, self.L, self.BL, self.BC = a0, c0, cmask, L, BL, BC
        self._doc = {}

    def rows(self, d, n=None):
        return self.a0 + d + jax.lax.broadcasted_iota(jnp.int32, (n or self.BL,), 0)

    def mask(self, d, n=None):
        return (self.rows(d, n) < self.L)[:, None] & self.cmask[None, :]

    def x(self, d, n=None):
        ref = self.x_ref.at[pl.ds(self.base + d, n or self.BL), pl.ds(self.c0, self.BC)]
        return plt.load(ref, mask=self.mask(d, n), other=0).astype(F32)

    def doc(self, d, n=None):
        n = n or self.BL
        if (d, n) not in self._doc:
            ref = self.doc_ref.at[pl.ds(self.base + d, n)]
            self._doc[d, n] = plt.load(ref, mask=self.rows(d, n) < self.L, other=-1)
        return self._doc[d, n]


def _dsilu(pre):
    """(silu(pre), silu'(pre)) in float32."""
    sig = 1.0 / (1.0 + jnp.exp(-pre))
    return pre * sig, sig * (1.0 + pre * (1.0 - sig))


def _pre(blk, w, bias, d0, K, has_doc, n=None):
    """pre at the n rows from a0 + d0: bias + the K taps x[t - (K-1) + i], masked by document."""
    acc = jnp.zeros((n or blk.BL, blk.BC), F32) + bias[None, :]
    doc_t = blk.doc(d0, n) if has_doc else None
    for i in range(K):
        d = d0 - (K - 1) + i
        tap = blk.x(d, n)
        if has_doc and d != d0:
            tap = jnp.where((blk.doc(d, n) == doc_t)[:, None], tap, 0.0)
        acc = acc + w[i][None, :] * tap
    return acc


def _idx(i):
    """A static row index as a traced int32 (interpret mode's masked loads take no Python int)."""
    return jnp.asarray(i, jnp.int32)


def _channels(cb, BC, C):
    c0 = cb * BC
    return c0, c0 + jax.lax.broadcasted_iota(jnp.int32, (BC,), 0) < C


def _weights(w_ref, b_ref, c0, cmask, K, BC):
    w = [plt.load(w_ref.at[_idx(i), pl.ds(c0, BC)], mask=cmask, other=0.0) for i in range(K)]
    if b_ref is None:
        return w, jnp.zeros((BC,), F32)
    return w, plt.load(b_ref.at[pl.ds(c0, BC)], mask=cmask, other=0.0)


# ----------------------------------------------------------------------------------------------
# forward: y = silu(pre), one block per program
# ----------------------------------------------------------------------------------------------
def _fwd_kernel(*refs, K, L, C, BL, BC, has_doc, has_bias):
    it = iter(refs)
    x_ref, hx_ref, w_ref = next(it), next(it), next(it)
    b_ref = next(it) if has_bias else None
    doc_ref, hdoc_ref = (next(it), next(it)) if has_doc else (None, None)
    y_ref = next(it)

    j = pl.program_id(1)
    a0 = j * BL
    c0, cmask = _channels(pl.program_id(2), BC, C)
    w, bias = _weights(w_ref, b_ref, c0, cmask, K, BC)

    def block(src_x, src_doc, base):
        blk = _Block(src_x, src_doc, base, a0, c0, cmask, L, BL, BC)
        y, _ = _dsilu(_pre(blk, w, bias, 0, K, has_doc))
        plt.store(y_ref.at[pl.ds(a0, BL), pl.ds(c0, BC)], y.astype(y_ref.dtype), mask=blk.mask(0))

    pl.when(j == 0)(lambda: block(hx_ref, hdoc_ref, a0 + (K - 1)))  # a0 = 0: the head
    pl.when(j > 0)(lambda: block(x_ref, doc_ref, a0))


# ----------------------------------------------------------------------------------------------
# backward: dx per block; dw, db summed over the program's nb blocks
# ----------------------------------------------------------------------------------------------
def _bwd_kernel(*refs, K, L, C, BL, BC, T, nb, has_doc, has_bias, interpret):
    it = iter(refs)
    x_ref, hx_ref, dy_ref, w_ref = next(it), next(it), next(it), next(it)
    b_ref = next(it) if has_bias else None
    doc_ref, hdoc_ref = (next(it), next(it)) if has_doc else (None, None)
    dx_ref, dw_ref = next(it), next(it)
    db_ref = next(it) if has_bias else None
    g_ref = next(it)  # (BL + T, BC) float32: this program's g, read back shifted

    c0, cmask = _channels(pl.program_id(2), BC, C)
    w, bias = _weights(w_ref, b_ref, c0, cmask, K, BC)
    # Between the threads of a program that write g and those that read it back shifted (and
    # the next block's writes). Interpret mode runs a program's code in order and has no barrier.
    barrier = (lambda: None) if interpret else plt.debug_barrier

    def g_rows(blk, a0, d, n):
        """g = dy silu'(pre) at the n rows from a0 + d (zero past L)."""
        pre = _pre(blk, w, bias, d, K, has_doc, n)
        dy = plt.load(
            dy_ref.at[pl.ds(a0 + d, n), pl.ds(c0, BC)], mask=blk.mask(d, n), other=0
        ).astype(F32)
        return dy * _dsilu(pre)[1]

    def block(src_x, src_doc, base, a0, acc):
        dw, db = acc
        blk = _Block(src_x, src_doc, base, a0, c0, cmask, L, BL, BC)
        g = g_rows(blk, a0, 0, BL)
        g_tail = g_rows(blk, a0, BL, T)  # the K-1 (of T) rows after the block
        db = db + g
        barrier()  # the previous block's shifted reads are done
        g_ref[pl.ds(0, BL), :] = g
        g_ref[pl.ds(BL, T), :] = g_tail
        barrier()
        x0 = blk.x(0)
        dx = w[K - 1][None, :] * g
        dw = list(dw)
        dw[K - 1] = dw[K - 1] + x0 * g
        for s in range(1, K):  # g at the rows a + s meets tap i = K-1-s
            gs = g_ref[pl.ds(s, BL), :]
            if has_doc:
                gs = jnp.where((blk.doc(0) == blk.doc(s))[:, None], gs, 0.0)
            i = K - 1 - s
            dx = dx + w[i][None, :] * gs
            dw[i] = dw[i] + x0 * gs
        plt.store(
            dx_ref.at[pl.ds(a0, BL), pl.ds(c0, BC)], dx.astype(dx_ref.dtype), mask=blk.mask(0)
        )
        return tuple(dw), db

    first = pl.program_id(1) * nb  # (program ids are read outside the loop: interpret mode)

    def body(r, acc):
        q = first + r
        a0 = q * BL
        return jax.lax.cond(
            q == 0,
            lambda acc: block(hx_ref, hdoc_ref, a0 + (K - 1), a0, acc),  # a0 = 0: the head
            lambda acc: block(x_ref, doc_ref, a0, a0, acc),
            acc,
        )

    # dw and db summed over the blocks as (BL, BC) tiles, over their rows once at the end
    zero = jnp.zeros((BL, BC), F32)
    dw, db = jax.lax.fori_loop(0, nb, body, (tuple(zero for _ in range(K)), zero))
    for i in range(K):
        plt.store(dw_ref.at[_idx(i), pl.ds(c0, BC)], jnp.sum(dw[i], axis=0), mask=cmask)
    if has_bias:
        plt.store(db_ref.at[pl.ds(c0, BC)], jnp.sum(db, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# pallas_calls
# ----------------------------------------------------------------------------------------------
def _params(cfg, kind):
    warps, stages = dict(cfg.launch)[kind]
    return plt.CompilerParams(num_warps=warps, num_stages=stages)


def _whole(*dims, batch=1):
    """A BlockSpec of the whole trailing `dims`: per row (batch=1), per row and program along the
    sequence (batch=2, the partials) or one block for every program (batch=0)."""
    lead = {0: lambda b, j: (), 1: lambda b, j: (b,), 2: lambda b, j: (b, j)}[batch]
    return pl.BlockSpec((_SQ,) * batch + dims, lambda b, j, c: lead(b, j) + (0,) * len(dims))


def _tail(K):
    """Rows of g past a block that its dx reads (K-1), rounded up to a power of two."""
    return pl.next_power_of_2(max(K - 1, 1))


def _head(x, doc, init, K, rows):
    """The first block's inputs: [initial_state or zeros, x[:, :rows]] and their documents (the
    initial state's rows are doc[:, 0]'s)."""
    b, L, c = x.shape
    n = min(L, rows)
    init = jnp.zeros((b, K - 1, c), x.dtype) if init is None else init
    hx = jnp.concatenate([init, x[:, :n]], axis=1)
    if doc is None:
        return hx, None
    hdoc = jnp.concatenate([jnp.broadcast_to(doc[:, :1], (b, K - 1)), doc[:, :n]], axis=1)
    return hx, hdoc


def _fwd_call(cfg, x, w, bias, doc, init):
    b, L, C = x.shape
    K = w.shape[0]
    hx, hdoc = _head(x, doc, init, K, cfg.BL)
    kern = functools.partial(
        _fwd_kernel,
        K=K,
        L=L,
        C=C,
        BL=cfg.BL,
        BC=cfg.BC,
        has_doc=doc is not None,
        has_bias=bias is not None,
    )
    args = (
        [x, hx, w] + ([bias] if bias is not None else []) + ([doc, hdoc] if doc is not None else [])
    )
    specs = [_whole(L, C), _whole(hx.shape[1], C), _whole(K, C, batch=0)]
    specs += [_whole(C, batch=0)] if bias is not None else []
    specs += [_whole(L), _whole(hx.shape[1])] if doc is not None else []
    return pl.pallas_call(
        kern,
        grid=(b, pl.cdiv(L, cfg.BL), pl.cdiv(C, cfg.BC)),
        in_specs=specs,
        out_specs=_whole(L, C),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=cfg.interpret,
        compiler_params=_params(cfg, "fwd"),
        name="conv1d_silu_fwd",
    )(*args)


def _bwd_call(cfg, x, w, bias, doc, init, dy):
    """dx (B, L, C) in x.dtype and the float32 partials dw (B, P, K, C), db (B, P, C) | None over
    the P programs along the sequence (the initial state's rows not included)."""
    b, L, C = x.shape
    K = w.shape[0]
    nl = pl.cdiv(L, cfg.BL)
    nb = min(cfg.nb, nl)
    n_prog = pl.cdiv(nl, nb)
    T = _tail(K)
    hx, hdoc = _head(x, doc, init, K, cfg.BL + T)
    kern = functools.partial(
        _bwd_kernel,
        K=K,
        L=L,
        C=C,
        BL=cfg.BL,
        BC=cfg.BC,
        T=T,
        nb=nb,
        has_doc=doc is not None,
        has_bias=bias is not None,
        interpret=cfg.interpret,
    )
    args = [x, hx, dy, w] + ([bias] if bias is not None else [])
    args += [doc, hdoc] if doc is not None else []
    specs = [_whole(L, C), _whole(hx.shape[1], C), _whole(L, C), _whole(K, C, batch=0)]
    specs += [_whole(C, batch=0)] if bias is not None else []
    specs += [_whole(L), _whole(hx.shape[1])] if doc is not None else []
    out_specs = [_whole(L, C), _whole(K, C, batch=2)]
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((b, n_prog, K, C), F32),
    ]
    if bias is not None:
        out_specs.append(_whole(C, batch=2))
        out_shape.append(jax.ShapeDtypeStruct((b, n_prog, C), F32))
    nc = pl.cdiv(C, cfg.BC)  # and each program's g (dropped)
    out_specs.append(
        pl.BlockSpec((_SQ,) * 3 + (cfg.BL + T, cfg.BC), lambda b, j, c: (b, j, c, 0, 0))
    )
    out_shape.append(jax.ShapeDtypeStruct((b, n_prog, nc, cfg.BL + T, cfg.BC), F32))
    outs = pl.pallas_call(
        kern,
        grid=(b, n_prog, nc),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=_params(cfg, "bwd"),
        name="conv1d_silu_bwd",
    )(*args)
    return outs[0], outs[1], outs[2] if bias is not None else None


def _initial_state_grads(x, w, bias, doc, init, dy):
    """(d initial_state (B, K-1, C) float32, its rows' part of dw (K, C)): the outputs t < K-1
    are the only ones that read the initial state (row j of it is position j - (K-1))."""
    b, L, C = x.shape
    K = w.shape[0]
    if K == 1:
        return jnp.zeros((b, 0, C), F32), jnp.zeros((1, C), F32)
    hx, hdoc = _head(x, doc, init, K, 2 * (K - 1))  # positions -(K-1) .. min(L, 2(K-1)) - 1
    hx = hx.astype(F32)
    n0 = min(K - 1, L)
    same = lambda u, v: 1.0 if doc is None else (hdoc[:, u] == hdoc[:, v])[:, None].astype(F32)
    g = []
    for t in range(n0):  # head row t + i is tap i of output t
        pre = sum(w[i] * hx[:, t + i] * same(t + i, t + K - 1) for i in range(K))
        pre = pre + (0.0 if bias is None else bias)
        g.append(dy[:, t].astype(F32) * _dsilu(pre)[1])
    d_init = []
    dw = [jnp.zeros((C,), F32) for _ in range(K)]
    for j in range(K - 1):
        acc = jnp.zeros((b, C), F32)
        for i in range(min(j + 1, K)):
            t = j - i
            if t >= n0:
                continue
            G = g[t] * same(j, t + K - 1)
            acc = acc + w[i] * G
            dw[i] = dw[i] + jnp.sum(hx[:, j] * G, axis=0)
        d_init.append(acc)
    return jnp.stack(d_init, axis=1), jnp.stack(dw)


# ----------------------------------------------------------------------------------------------
# the custom_vjp
# ----------------------------------------------------------------------------------------------
def _core_fwd(cfg, x, w, bias, doc, init):
    return _fwd_call(cfg, x, w, bias, doc, init), (x, w, bias, doc, init)


def _core_bwd(cfg, res, dy):
    x, w, bias, doc, init = res
    dy = dy.astype(x.dtype)
    dx, dw, db = _bwd_call(cfg, x, w, bias, doc, init, dy)
    dw = jnp.sum(dw, axis=(0, 1))
    d_init = None
    if init is not None:
        d_init, dw_init = _initial_state_grads(x, w, bias, doc, init, dy)
        dw = dw + dw_init
        d_init = d_init.astype(init.dtype)
    db = None if bias is None else jnp.sum(db, axis=(0, 1)).astype(bias.dtype)
    return dx, dw.astype(w.dtype), db, None, d_init


# y = silu(conv(x)) on x (B, L, C), w (K, C) and bias (C,) float32, doc (B, L) int32 | None,
# init (B, K-1, C) in x.dtype | None.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, x, w, bias, doc, init):
    return _fwd_call(cfg, x, w, bias, doc, init)


_core.defvjp(_core_fwd, _core_bwd)


def causal_conv1d_silu_pallas(
    x,
    kernel,
    bias=None,
    *,
    doc=None,
    initial_state=None,
    interpret=False,
    block_l=None,
    block_c=None,
    blocks_per_program=None,
    launch=None,
):
    """silu(causal depthwise conv1d) through the Pallas kernels (module docstring).

    x (B, L, C) bfloat16, float16 or float32; kernel (K, C) and bias (C,) | None in any float
    dtype (their gradients come in it); doc (B, L) int | None, the document index per position;
    initial_state (B, K-1, C) | None, the K-1 inputs before position 0 (oldest first), rounded to
    x.dtype as the XLA path does. Returns y (B, L, C) in x.dtype, differentiable in x, kernel,
    bias and initial_state. interpret=True runs the same kernels in Pallas interpret mode (CPU).
    Tuning (tests, benchmarks): block_l, block_c (powers of two), blocks_per_program (of the
    backward) and launch ((kernel, (num_warps, num_stages)) pairs for "fwd" and "bwd").
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    reason = unsupported_reason(x, kernel, interpret=interpret, block_l=block_l)
    if reason is not None:
        raise ValueError(f"causal_conv1d_silu_pallas: {reason}")
    for name, v in (
        ("block_l", block_l),
        ("block_c", block_c),
        ("blocks_per_program", blocks_per_program),
    ):
        if v is not None and not _pow2(v):
            raise ValueError(f"causal_conv1d_silu_pallas: {name}={v!r} must be a power of two")
    b, L, C = x.shape
    K = kernel.shape[0]
    if bias is not None and jnp.shape(bias) != (C,):
        raise ValueError(
            f"causal_conv1d_silu_pallas: bias has shape {jnp.shape(bias)}, expected ({C},)"
        )
    if doc is not None and jnp.shape(doc) != (b, L):
        raise ValueError(
            f"causal_conv1d_silu_pallas: doc has shape {jnp.shape(doc)}, expected ({b}, {L})"
        )
    if initial_state is not None and jnp.shape(initial_state) != (b, K - 1, C):
        raise ValueError(
            f"causal_conv1d_silu_pallas: initial_state has shape {jnp.shape(initial_state)}, "
            f"expected ({b}, {K - 1}, {C}) = (batch, kernel_size - 1, channels)"
        )
    block_c = block_c or min(BLOCK_C, max(16, pl.next_power_of_2(C)))
    cfg = Config(
        BL=block_l or BLOCK_L,
        BC=block_c,
        nb=blocks_per_program or BLOCKS_PER_PROGRAM,
        interpret=bool(interpret),
        launch=tuple(sorted({**dict(LAUNCH), **dict(launch or ())}.items())),
    )
    w = kernel.astype(F32)
    bias = None if bias is None else jnp.asarray(bias).astype(F32)
    doc = None if doc is None else jnp.asarray(doc).astype(jnp.int32)
    init = None if initial_state is None else jnp.asarray(initial_state).astype(x.dtype)
    return _core(cfg, x, w, bias, doc, init)
