"""`ssd_pallas`: the SSD scan through Pallas kernels, forward and backward (jax.custom_vjp).

Same contract as `hybridjax.ops.ssd` (see its docstring): x (b, l, h, p), dt (b, l, h) > 0,
A (h,) < 0, B/C (b, l, g, n), optional D (h,), initial_state (b, h, p, n) and segment_ids (b, l);
returns y (b, l, h, p) in x.dtype [and the final state (b, h, p, n) in float32].

The kernels never tie the input weight to the decay: they take the weight per position (called
dt in ssd_kernels.py) and the decays as per-position vectors built from the cumulative log decay.
So the core (`weighted_ssd_pallas`) takes them as two inputs, h_t = exp(log_decay_t) h_{t-1} +
weight_t x_t B_t^T, and returns their gradients separately: d weight is the column sums' x.v,
d log_decay the windowed sums below. Mamba-2 is weight dt, log decay dt A (`ssd_pallas`, whose
d dt = d weight + A d log_decay and dA = sum dt d log_decay follow by autodiff of that product);
Mamba-3 is the same core with weight gamma + w (`hybridjax.kernels.mamba3`).

Structure (kernels in ssd_kernels.py; everything here is cheap XLA over (b, h, l) vectors or
(b, K, h, p, n) superchunk states):
  forward   [state kernel: each superchunk's own end state]  (only when K > 1)
            passing: one small batched matmul chains the K superchunk states
            fwd kernel: y and each superchunk's end state
  backward  forward sweep (from the superchunks' entering states): the state entering every
              chunk (operand dtype) and the float32 state at every window end
            [reverse state kernel: each superchunk's own start adjoint]  (only when K > 1)
            passing of the adjoints (the same matrix, transposed)
            reverse sweep: the adjoint at every chunk end and Z = <G, S> at every window end
            dc kernel, one program per (chunk, block of heads): dC, row sums
            dx kernel, one program per (chunk, block of heads): dx, dB, x.v_t (column sums), dy.x
            XLA: dB/dC summed over the blocks of a group; d(log decay) by reverse cumsums
            inside windows; d(weight) and dD from (b, h, l) vectors.
  The backward's heavy kernels carry no state: as sequential walks carrying a (p, n) float32
  state next to the per-chunk products they were slower (H200, b1 l65536 h64 p64 n128 g1, bf16:
  the backward 7.1 -> 6.0 ms). Each of their programs then takes a block of heads of one group
  (shared C.B^T, dB/dC summed in registers, the next head's tiles prefetched): 6.0 -> 4.7 ms.

The decay gradient needs no extra pass. With the pair terms
P(t', s) = (dy_t' . x_s)(C_t' . B_s) dt_s exp(cs_t' - cs_s) (masked by resets; dt the weight),
the gradient with respect to the log decay a_t (dt_t A for Mamba-2) is the sum of P over the pairs that straddle t,
s < t <= t'. For t inside a window of W positions ending at e this is
    sum_{t'=t..e} (row_t' - col_t')  +  Z_e,
row_t' = sum_s P(t', s), col_s = sum_t' P(t', s), Z_e = <G_e, S_e> (the pairs straddling e: the
adjoint and the state at e). The dc kernel forms the row sums (C_t . dC_t), the dx kernel the
column sums (col_s = dt_s x_s . v_s), the reverse sweep <G_e, S_e>; inside a chunk both from the
float32 pair terms (products of the same float32 matmul results), so those parts cancel to
float32 rounding, not to bfloat16's. Keeping the sums inside a window (256 positions) keeps
rounding from accumulating over the sequence: one global reverse cumsum of row - col is exact
in exact arithmetic but drifts by O(sqrt(l) * eps) in floating point (measured: dA off by 17x
at l = 64K in bfloat16).
"""

import dataclasses

import jax
import jax.numpy as jnp

from hybridjax.kernels import ssd_kernels as K_
from hybridjax.ops.segments import document_starts

F32 = jnp.float32
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

# Tuning defaults, measured on one H200 (the README's performance section has the numbers).
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_Q_BWD = 64  # the backward's chunk length (its kernels do more per position)
FILL_PROGRAMS = 200  # b*h at or above this: one superchunk per (b, h)
TARGET_PROGRAMS = 512  # else about this many programs
WINDOW = 256  # positions per window of the decay-gradient sums
HEADS_PER_PROGRAM = 32  # heads of one group per program of the dc/dx kernels (dB/dC summed)
LAUNCH = (("fwd", (4, 2)), ("state", (4, 2)), ("dx", (4, 2)), ("dc", (4, 2)))
# float32 states above 64x128 take twice the registers: 8 warps (H200, p128 n128: its check
# case takes 22 s instead of 49 s, mostly compiling; docs/measurements/h200_f32_p128n128.log)
LAUNCH_F32_LARGE = tuple((k, (8, 2)) for k, _ in LAUNCH)


@dataclasses.dataclass(frozen=True)
class Config:
    Q: int  # positions per chunk (the matmul tile)
    Qb: int  # positions per chunk in the backward (divides Q * wq)
    T: int  # positions per superchunk (one program's sequential walk)
    wq: int  # chunks per window of the decay-gradient sums (divides T // Q)
    hb: int  # heads per program of the dc/dx kernels (divides heads per group)
    cdt: object  # matmul operand dtype
    interpret: bool
    launch: tuple = LAUNCH
    poison: bool = False  # outputs start as NaN (checks that every element is written)


def _pow2(v):
    return v >= 1 and (v & (v - 1)) == 0


def pallas_unsupported_reason(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=256,
    D=None,
    initial_state=None,
    segment_ids=None,
    return_final_state=False,
    interpret=False,
    **unused,
):
    """None when the Pallas kernels support this call, else a sentence saying why not."""
    del dt, A, C, D, initial_state, segment_ids, return_final_state, unused
    if x.ndim != 4 or B.ndim != 4:
        return f"x must be (b, l, h, p) and B (b, l, g, n); got {x.shape} and {B.shape}"
    return limits_reason("x", x.dtype, x.shape[-1], B.shape[-1], chunk_size) or backend_reason(
        "hybridjax.kernels.ssd_pallas", interpret
    )


def limits_reason(name, dtype, p, n, chunk_size):
    """None when the kernels take operands of this dtype (the array called `name`), head_dim p,
    d_state n and chunk_size, else why not."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return (
            f"{name} dtype {jnp.dtype(dtype).name} is not supported by the Pallas kernel "
            "(bfloat16, float16 or float32; use impl='reference' for float64)"
        )
    for what, v in (("head_dim p", p), ("d_state n", n)):
        if not (_pow2(v) and 16 <= v <= 256):
            return f"{what}={v} is not supported by the Pallas kernel (a power of two in 16..256)"
    if p * n > 128 * 128:
        return f"head_dim*d_state={p}*{n} exceeds the kernel's register budget (at most 128*128)"
    if not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size must be a positive int, got {chunk_size!r}"
    return None


def backend_reason(fn, interpret):
    """None on a GPU backend or in interpret mode, else why not (fn: what runs it on the CPU)."""
    if not interpret and jax.default_backend() != "gpu":
        return (
            f"the Pallas kernel needs a GPU backend (default backend is "
            f"{jax.default_backend()!r}); {fn}(..., interpret=True) runs it on the CPU"
        )
    return None


# ----------------------------------------------------------------------------------------------
# per-position decay vectors and the superchunk passing matrix
# ----------------------------------------------------------------------------------------------
def _decays(weight, log_decay, resets, Q):
    """weight, log_decay (b, L, h) float32, resets (b, L) bool | None -> per-position (b, h, L)
    vectors and chunk data: the input weight, cs (the log decay's cumsum inside each chunk), ind,
    outd, the document index, each chunk's total log decay and whether a reset falls inside it."""
    b, L, h = weight.shape
    nc = L // Q
    wT = jnp.transpose(weight, (0, 2, 1))
    cs = jnp.cumsum(jnp.transpose(log_decay, (0, 2, 1)).reshape(b, h, nc, Q), axis=-1)
    ind = jnp.exp(cs)
    outd = jnp.exp(cs[..., -1:] - cs)
    doc = creset = None
    if resets is not None:
        doc = jnp.cumsum(resets.astype(jnp.int32), axis=1)  # document index per position
        prev = jnp.concatenate([doc[:, :1], doc[:, :-1]], axis=1).reshape(b, nc, Q)[..., 0]
        docc = doc.reshape(b, nc, Q)
        ind = jnp.where((docc == prev[..., None])[:, None], ind, 0.0)
        outd = jnp.where((docc == docc[..., -1:])[:, None], outd, 0.0)
        creset = docc[..., -1] != prev  # (b, nc): a reset inside the chunk
    flat = lambda t: t.reshape(b, h, L)
    return wT, flat(cs), flat(ind), flat(outd), doc, cs[..., -1], creset


def _passing_matrix(chunk_logdec, creset, K):
    """(b, h, K+1, K+1) W[k, m] = prod_{i=m}^{k-1} (decay of superchunk i), 0 for m > k."""
    b, h, nc = chunk_logdec.shape
    lD = chunk_logdec.reshape(b, h, K, nc // K).sum(-1)
    i = jnp.arange(K)[:, None]
    m = jnp.arange(K + 1)[None, :]
    below = lambda v: jnp.where(i >= m, v[..., :, None], 0)  # (.., K, K+1): v_i where i >= m
    pad = lambda t: jnp.concatenate([jnp.zeros_like(t[..., :1, :]), t], axis=-2)
    logw = pad(jnp.cumsum(below(lD), axis=-2))  # row k: sum_{i=m}^{k-1} lD_i
    valid = jnp.arange(K + 1)[:, None] >= m
    if creset is not None:
        zK = creset.reshape(b, K, nc // K).any(-1).astype(jnp.int32)[:, None]  # (b, 1, K)
        valid = valid & (pad(jnp.cumsum(below(zK), axis=-2)) == 0)
    return jnp.where(valid, jnp.exp(jnp.where(valid, logw, 0.0)), 0.0)


def _hi(eq, *ops):
    return jnp.einsum(eq, *ops, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# forward and backward on padded inputs (L a multiple of T)
# ----------------------------------------------------------------------------------------------
def _forward(cfg, x, weight, log_decay, B, C, D, s_init, resets):
    b, L, h, p = x.shape
    n = B.shape[-1]
    K = L // cfg.T
    wT, cs, ind, outd, doc, clog, creset = _decays(weight, log_decay, resets, cfg.Q)
    s0 = jnp.zeros((b, h, p, n), F32) if s_init is None else s_init.astype(F32)
    if K == 1:
        s_in = s0[:, None]
        y, s_out = K_.fwd_call(cfg, x, B, C, wT, cs, ind, outd, doc, s_in, D)
        return y, s_out[:, 0], s_in
    local = K_.state_call(cfg, x, B, ind, outd=outd, dt=wT)
    W = _passing_matrix(clog, creset, K)
    s_all = _hi("bhkm,bmhpn->bkhpn", W, jnp.concatenate([s0[:, None], local], axis=1))
    s_in = s_all[:, :K]
    y, _ = K_.fwd_call(cfg, x, B, C, wT, cs, ind, outd, doc, s_in, D)
    return y, s_all[:, K], s_in


def _backward(cfg, x, weight, log_decay, B, C, D, resets, s_in, dy, dfinal):
    """The gradients (dx, d weight, d log decay, dB, dC, dD, d initial state); the kernels call
    the input weight dt (it is dt for Mamba-2)."""
    cfg = dataclasses.replace(cfg, Q=cfg.Qb, wq=cfg.Q * cfg.wq // cfg.Qb)
    b, L, h, _ = x.shape
    g, n = B.shape[2:]
    K = L // cfg.T
    wT, cs, ind, outd, doc, clog, creset = _decays(weight, log_decay, resets, cfg.Q)
    dy = dy.astype(x.dtype)
    dfinal = dfinal.astype(F32)
    _, s_chunks, s_win = K_.state_call(cfg, x, B, ind, outd=outd, dt=wT, s0=s_in)
    if K == 1:
        g_end = dfinal[:, None]
    else:
        local = K_.state_call(cfg, dy, C, ind)
        W = _passing_matrix(clog, creset, K)
        f_all = _hi("bhkm,bkhpn->bmhpn", W, jnp.concatenate([local, dfinal[:, None]], axis=1))
        g_end = f_all[:, 1:]
    g_start, g_chunks, z = K_.state_call(cfg, dy, C, ind, s0=g_end, s_win=s_win)
    dCk, rows = K_.bwd_dc_call(cfg, dy, x, B, C, wT, cs, ind, doc, s_chunks)
    dx, dBk, xv, dyx = K_.bwd_dx_call(cfg, dy, x, B, C, wT, cs, outd, doc, g_chunks, D)
    d_init = g_start[:, 0] if K == 1 else f_all[:, 0]
    # d(log decay) at t: the pair terms (s < t <= t') = reverse cumsum inside t's window of
    # (row sum - column sum) + Z, all pairs straddling the window's end (see the module docstring).
    W_ = cfg.Q * cfg.wq
    tot = (rows - wT * xv).reshape(b, h, L // W_, W_)
    dda = (jnp.flip(jnp.cumsum(jnp.flip(tot, -1), axis=-1), -1) + z[..., None]).reshape(b, h, L)
    to_blh = lambda t: jnp.transpose(t, (0, 2, 1))
    dD = None if D is None else jnp.sum(dyx, axis=(0, 2))
    group_sum = lambda t: t.reshape(b, L, g, -1, n).sum(3)  # over the head blocks of a group
    return dx, to_blh(xv), to_blh(dda), group_sum(dBk), group_sum(dCk), dD, d_init


def _core_impl(cfg, x, weight, log_decay, B, C, D, s_init, resets):
    y, final, _ = _forward(cfg, x, weight, log_decay, B, C, D, s_init, resets)
    return y, final


def _core_fwd(cfg, x, weight, log_decay, B, C, D, s_init, resets):
    y, final, s_in = _forward(cfg, x, weight, log_decay, B, C, D, s_init, resets)
    return (y, final), (x, weight, log_decay, B, C, D, s_init, resets, s_in)


def _core_bwd(cfg, res, cts):
    x, weight, log_decay, B, C, D, s_init, resets, s_in = res
    dy, dfinal = cts
    dx, dw, dld, dB, dC, dD, d_init = _backward(
        cfg, x, weight, log_decay, B, C, D, resets, s_in, dy, dfinal
    )
    cast = lambda g, ref: None if ref is None else g.astype(ref.dtype)
    return (
        dx.astype(x.dtype),
        cast(dw, weight),
        cast(dld, log_decay),
        cast(dB, B),
        cast(dC, C),
        cast(dD, D),
        cast(d_init, s_init),
        None,
    )


# The kernels' scan, y_t = C_t . h_t (+ D x_t) with h_t = exp(log_decay_t) h_{t-1} + weight_t
# x_t B_t^T, on inputs padded to whole superchunks; weight and log_decay (b, L, h) float32.
_core = jax.custom_vjp(_core_impl, nondiff_argnums=(0,))
_core.defvjp(_core_fwd, _core_bwd)


def plan(b, l, h, chunk_size, block_q=None, superchunks=None, window=None, block_q_bwd=None):
    """(Q, Qb, K, T, wq): forward and backward chunk lengths, superchunk count and length, and
    forward chunks per gradient window."""
    Q = block_q or max(16, min(DEFAULT_BLOCK_Q, 1 << (chunk_size.bit_length() - 1)))
    nc = -(-l // Q)
    if superchunks is None:  # one superchunk per (b, h) when that already fills the GPU
        superchunks = 1 if b * h >= FILL_PROGRAMS else -(-TARGET_PROGRAMS // (b * h))
    K = max(1, min(superchunks, nc))
    nq = -(-nc // K)
    wq = min(max(1, (window or WINDOW) // Q), nq)
    nq = -(-nq // wq) * wq
    T = Q * nq
    K = -(-l // T)  # drop superchunks that would be all padding
    Qb = min(block_q_bwd or DEFAULT_BLOCK_Q_BWD, Q)
    if (Q * wq) % Qb:  # the backward's chunks must tile a window
        Qb = Q
    return Q, Qb, K, T, wq


def prepare(
    x,
    dt,
    B,
    C,
    *,
    chunk_size=256,
    segment_ids=None,
    interpret=False,
    block_q=None,
    superchunks=None,
    launch=None,
    poison=False,
    window=None,
    block_q_bwd=None,
    heads_per_program=None,
):
    """The kernels' Config and the inputs padded to whole superchunks: (cfg, x, dt, B, C, resets).
    B and C come in x's dtype; resets (b, L) marks where a new segment starts, or is None."""
    for name, v, lo in (
        ("block_q", block_q, 16),
        ("block_q_bwd", block_q_bwd, 16),
        ("heads_per_program", heads_per_program, 1),
    ):
        if v is not None and not (_pow2(v) and v >= lo):
            raise ValueError(f"ssd_pallas: {name}={v} must be a power of two >= {lo}")
    b, l, h, p = x.shape
    hpg = h // B.shape[2]
    hb = min(heads_per_program or HEADS_PER_PROGRAM, hpg & -hpg)  # a power of two dividing hpg
    Q, Qb, K, T, wq = plan(b, l, h, chunk_size, block_q, superchunks, window, block_q_bwd)
    cdt = jnp.dtype(x.dtype)
    padl = lambda t: jnp.pad(t, [(0, 0), (0, K * T - l)] + [(0, 0)] * (t.ndim - 2))
    resets = None if segment_ids is None else padl(document_starts(jnp.asarray(segment_ids)))
    base = LAUNCH_F32_LARGE if cdt == jnp.dtype(F32) and p * B.shape[-1] > 64 * 128 else LAUNCH
    cfg = Config(
        Q=Q,
        Qb=Qb,
        T=T,
        wq=wq,
        hb=hb,
        cdt=cdt,
        interpret=bool(interpret),
        launch=tuple(sorted({**dict(base), **dict(launch or ())}.items())),
        poison=bool(poison),
    )
    return cfg, padl(x), padl(dt), padl(B.astype(cdt)), padl(C.astype(cdt)), resets


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    chunk_size=256,
    initial_state=None,
    segment_ids=None,
    return_final_state=False,
    interpret=False,
    **tuning,
):
    """The SSD scan through the Pallas kernels; see `hybridjax.ops.ssd` for the contract.

    chunk_size caps the kernel's chunk length Q (the result does not depend on it beyond
    rounding). `tuning` overrides the tuned choices (tests, benchmarks): block_q and block_q_bwd
    (forward / backward chunk lengths), superchunks, window (positions per decay-gradient window),
    heads_per_program (of the backward's dc/dx kernels), launch ((kernel, (num_warps,
    num_stages)) pairs), and poison=True, which starts every kernel output as NaN. interpret=True
    runs the same kernels in Pallas interpret mode (CPU).

    Mamba-2's step is the weighted scan's with input weight dt and log decay dt A (formed here
    in float32, so d dt = d weight + A d(log decay) and dA = sum dt d(log decay) come from
    autodiff of that product, outside the kernels).
    """
    reason = pallas_unsupported_reason(x, dt, A, B, C, chunk_size=chunk_size, interpret=interpret)
    if reason is not None:
        raise ValueError(f"ssd(impl='pallas'): {reason}")
    dt = jnp.asarray(dt).astype(F32)
    out = weighted_ssd_pallas(
        x,
        dt,
        dt * jnp.asarray(A).astype(F32),
        B,
        C,
        D=D,
        chunk_size=chunk_size,
        initial_state=initial_state,
        segment_ids=segment_ids,
        interpret=interpret,
        **tuning,
    )
    return out if return_final_state else out[0]


def weighted_ssd_pallas(
    x,
    weight,
    log_decay,
    B,
    C,
    *,
    D=None,
    chunk_size=256,
    initial_state=None,
    segment_ids=None,
    interpret=False,
    **tuning,
):
    """The kernels' scan with the input weight and the log decay as separate inputs:

        h_t = exp(log_decay_t) h_{t-1} + weight_t x_t B_t^T      y_t = C_t . h_t + D x_t

    x (b, l, h, p), weight and log_decay (b, l, h) (float32; log_decay <= 0), B, C (b, l, g, n),
    D (h,), initial_state (b, h, p, n), segment_ids (b, l) as `ssd_pallas`. Returns (y (b, l, h, p)
    in x.dtype, final state (b, h, p, n) float32), differentiable in every float input. Mamba-2
    (`ssd_pallas`: weight dt, log decay dt A) and Mamba-3 (`hybridjax.kernels.mamba3`: weight
    gamma + w, log decay A dt) both run through it. The caller checks support
    (`pallas_unsupported_reason`).
    """
    cfg, xp, wp, Bp, Cp, resets = prepare(
        x,
        jnp.asarray(weight).astype(F32),
        B,
        C,
        chunk_size=chunk_size,
        segment_ids=segment_ids,
        interpret=interpret,
        **tuning,
    )
    pad = xp.shape[1] - x.shape[1]
    ldp = jnp.pad(jnp.asarray(log_decay).astype(F32), [(0, 0), (0, pad), (0, 0)])
    Df = None if D is None else jnp.asarray(D).astype(F32)
    y, final = _core(cfg, xp, wp, ldp, Bp, Cp, Df, initial_state, resets)
    return y[:, : x.shape[1]], final
