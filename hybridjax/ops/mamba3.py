"""`mamba3_siso` and `mamba3_mimo`: the Mamba-3 scan, one signature over several implementations.

    mamba3_siso(q, k, v, adt, dt, trap, q_bias, k_bias, angles, *, D=None, z=None,
                chunk_size=64, initial_state=None, segment_ids=None,
                return_final_state=False, impl="auto")
      q, k (b, l, g, n)      v, z (b, l, h, p)      adt, dt, trap (b, l, h)
      q_bias, k_bias (h, n)  angles (b, l, h, s), s <= n/2      D (h,)
      -> y (b, l, h, p) [, Mamba3State(angle (b, h, s), ssm (b, h, p, n), k (b, h, n), v (b, h, p))]

      y_t = (S_t q~_t + D v_t) * silu(z_t)

    mamba3_mimo(q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, *, ...)
      q, k (b, l, R, g, n)   q_bias, k_bias (h, R, n)   mimo_x, mimo_z, mimo_o (h, R, p)
      (mimo_z may be None when z is), the rest as SISO; the state's k is (b, R, h, n).

      v_r = v * mimo_x[r]     y_t = sum_r mimo_o[r] * (S_t q~_{t,r} + D v_{t,r}) * silu(z_t * mimo_z[r])

S_t is the exponential-trapezoidal recurrence written out in `mamba3_reference`: adt = A dt (A
negative and per step), dt > 0, trap the raw logit of lam = sigmoid(trap), angles the raw
rotation rates (each step turns by pi tanh(angles) dt); q~, k~ are q + q_bias and k + k_bias
of the head rotated by the cumulative angle. Head h reads group h // (h/g) of q and k. SISO
rotates channel pairs (2i, 2i+1), MIMO pairs (i, i + n/2), as mamba_ssm's SISO (Triton) and
MIMO (TileLang) kernels do; channels past the s pairs are not rotated. The MIMO scan with R = 1
and mimo_x = mimo_z = mimo_o = 1 is the SISO scan with its state channels in that other order.

Semantics are those of mamba_ssm 2.3.2.post1 (`mamba3_siso_combined`, `mamba3_mimo` and their
step references), also where a simpler reading of the paper would differ: the MIMO state's k
is (b, R, h, n), D multiplies each rank's v_r before the output mix (so it is mixed by mimo_o
too), and adt, dt and trap are (b, l, h) here (mamba_ssm: (b, h, l)). Beyond the
reference: `initial_state` for MIMO (the official MIMO kernel only returns states) and
`segment_ids` (packed documents; mamba_ssm takes cu_seqlens instead): wherever the id changes
the whole carry (angle, S, last k and v) is zeroed, so a document starts as a fresh sequence.
`initial_state` is the state before position 0 and feeds the first document only.

Implementations (`impl=`):
  "reference"  `lax.scan` over time, one step per token: the oracle.
  "chunked"    the SSD-style chunked matmul form in XLA (`mamba3_chunked`), any length.
  "pallas"     SISO only: the GPU path of `hybridjax.kernels.mamba3` (the same SSD form through
               the Pallas SSD kernels, forward and backward; imported only when asked for). It
               runs per device under a mesh and refuses a mesh that splits the sequence, float64
               and sizes the kernels lack (`mamba3_pallas_unsupported_reason` says which). MIMO
               has no Pallas path: its ranks fold into the chunk, which those kernels do not
               express, so it stays on "chunked".
  "auto"       `_auto_impl`: SISO on a GPU backend "pallas" when it supports the call, else
               (and MIMO always) "chunked".
Decays, angles and states in float32 (float64 for float64 inputs); y in v.dtype, the state in
float32 (float64). Under a mesh the XLA paths leave the sequence to XLA: no per-shard state
passing yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybridjax.ops.mamba3_chunked import mamba3_chunked
from hybridjax.ops.mamba3_reference import Mamba3State, mamba3_reference, rank_values
from hybridjax.ops.ssd import accumulation_dtype

IMPLS = ("auto", "reference", "chunked", "pallas")

__all__ = ["IMPLS", "Mamba3State", "mamba3_mimo", "mamba3_siso"]


def _auto_impl(fn, q, v, chunk_size) -> str:
    """What impl="auto" runs: "pallas" for SISO on a GPU backend where the kernels support the
    call (dtype, sizes, a mesh that keeps sequences whole), else "chunked"."""
    if fn != "mamba3_siso" or jax.default_backend() != "gpu":
        return "chunked"
    try:
        from hybridjax.kernels import mamba3_pallas_unsupported_reason
    except ImportError:  # a jax without Pallas's Triton backend
        return "chunked"
    return (
        "pallas"
        if mamba3_pallas_unsupported_reason(q, v, chunk_size=chunk_size) is None
        else "chunked"
    )


class _Checker:
    """Shape checks whose errors name the function and the argument."""

    def __init__(self, fn: str):
        self.fn = fn

    def fail(self, message):
        raise ValueError(f"{self.fn}: {message}")

    def shape(self, name, array, want: tuple, meaning: str):
        if array is not None and tuple(array.shape) != want:
            self.fail(f"{name} has shape {tuple(array.shape)}, expected {want} = {meaning}")


def _check(fn, q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo, D, z, state, seg, chunk):
    """Raises a ValueError naming the first bad argument (q, k carry a rank axis for MIMO only)."""
    c = _Checker(fn)
    mimo_op = fn == "mamba3_mimo"
    if v.ndim != 4:
        c.fail(f"v has shape {tuple(v.shape)}, expected (batch, length, heads, head_dim)")
    b, l, h, p = v.shape
    q_dims = (
        "(batch, length, rank, groups, d_state)" if mimo_op else "(batch, length, groups, d_state)"
    )
    if q.ndim != (5 if mimo_op else 4) or q.shape[:2] != (b, l):
        c.fail(f"q has shape {tuple(q.shape)}, expected {q_dims} with v's (batch, length) {(b, l)}")
    if l == 0:
        c.fail("v has length 0; the scan needs at least one step")
    rank = q.shape[2:3] if mimo_op else ()
    g, n = q.shape[-2:]
    if g == 0 or h % g:
        c.fail(f"q has {g} groups, which must divide the {h} heads of v")
    if n % 2:
        c.fail(f"q has d_state {n}; it must be even (channels rotate in pairs)")
    c.shape("k", k, tuple(q.shape), "the shape of q")
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        c.shape(name, t, (b, l, h), "(batch, length, heads)")
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        c.shape(name, t, (h, *rank, n), "(heads, " + ("rank, " if rank else "") + "d_state)")
    if angles.ndim != 4 or angles.shape[:3] != (b, l, h):
        c.fail(
            f"angles has shape {tuple(angles.shape)}, expected ({b}, {l}, {h}, s), s <= {n // 2}"
        )
    s = angles.shape[3]
    if s > n // 2:
        c.fail(f"angles has {s} angles per head; at most d_state / 2 = {n // 2} (one per pair)")
    for name, t in mimo.items():
        c.shape(name, t, (h, *rank, p), "(heads, rank, head_dim)")
    c.shape("D", D, (h,), "(heads,)")
    c.shape("z", z, (b, l, h, p), "the shape of v")
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 4:
            c.fail("initial_state must be a Mamba3State (angle, ssm, k, v)")
        want = Mamba3State((b, h, s), (b, h, p, n), (b, *rank, h, n), (b, h, p))
        for name, t, w in zip(Mamba3State._fields, state, want):
            c.shape(f"initial_state.{name}", t, w, "(" + ", ".join(map(str, w)) + ")")
    if seg is not None:
        c.shape("segment_ids", seg, (b, l), "(batch, length)")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            c.fail(f"segment_ids must be integers, got dtype {seg.dtype}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        c.fail(f"chunk_size must be a positive int, got {chunk!r}")


def _arrays(*ts):
    return [None if t is None else jnp.asarray(t) for t in ts]


def _state(state):
    return None if state is None else Mamba3State(*_arrays(*state))


def mamba3_siso(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    *,
    D=None,
    z=None,
    chunk_size=64,
    initial_state=None,
    segment_ids=None,
    return_final_state=False,
    impl="auto",
):
    """The single-input single-output Mamba-3 scan; see the module docstring. Returns y or
    (y, Mamba3State)."""
    _check_impl("mamba3_siso", impl)
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, segment_ids = _arrays(
        q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, segment_ids
    )
    initial_state = _state(initial_state)
    _check(
        "mamba3_siso",
        q,
        k,
        v,
        adt,
        dt,
        trap,
        q_bias,
        k_bias,
        angles,
        {},
        D,
        z,
        initial_state,
        segment_ids,
        chunk_size,
    )
    impl = _auto_impl("mamba3_siso", q, v, chunk_size) if impl == "auto" else impl
    if impl == "pallas":
        from hybridjax.kernels import mamba3_siso_pallas

        return mamba3_siso_pallas(
            q,
            k,
            v,
            adt,
            dt,
            trap,
            q_bias,
            k_bias,
            angles,
            D=D,
            z=z,
            chunk_size=chunk_size,
            initial_state=initial_state,
            segment_ids=segment_ids,
            return_final_state=return_final_state,
        )
    if initial_state is not None:  # the internal layout has a rank axis
        initial_state = initial_state._replace(k=initial_state.k[:, None])
    out = _mamba3_xla(
        q[:, :, None],
        k[:, :, None],
        v,
        adt,
        dt,
        trap,
        q_bias[:, None],
        k_bias[:, None],
        angles,
        None,
        None,
        None,
        D,
        z,
        initial_state,
        segment_ids,
        chunk_size=chunk_size,
        return_final_state=return_final_state,
        impl=impl,
        pairing="adjacent",
    )
    if not return_final_state:
        return out
    y, final = out
    return y, final._replace(k=final.k[:, 0])


def mamba3_mimo(
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
    mimo_z,
    mimo_o,
    *,
    D=None,
    z=None,
    chunk_size=64,
    initial_state=None,
    segment_ids=None,
    return_final_state=False,
    impl="auto",
):
    """The multi-input multi-output (rank R) Mamba-3 scan; see the module docstring. Returns y or
    (y, Mamba3State) with the state's k (b, R, h, n)."""
    _check_impl("mamba3_mimo", impl)
    arrays = _arrays(
        q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, segment_ids
    )
    q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, segment_ids = (
        arrays
    )
    if mimo_x is None or mimo_o is None:
        raise ValueError("mamba3_mimo: mimo_x and mimo_o are required (heads, rank, head_dim)")
    if z is not None and mimo_z is None:
        raise ValueError("mamba3_mimo: z needs mimo_z (heads, rank, head_dim)")
    mimo = {"mimo_x": mimo_x, "mimo_z": mimo_z, "mimo_o": mimo_o}
    initial_state = _state(initial_state)
    _check(
        "mamba3_mimo",
        q,
        k,
        v,
        adt,
        dt,
        trap,
        q_bias,
        k_bias,
        angles,
        mimo,
        D,
        z,
        initial_state,
        segment_ids,
        chunk_size,
    )
    if impl == "pallas":
        raise ValueError(
            "mamba3_mimo: impl='pallas' is SISO only (MIMO's ranks fold into the chunk, which "
            "the Pallas SSD kernels do not express); use impl='chunked' or 'auto'"
        )
    impl = _auto_impl("mamba3_mimo", q, v, chunk_size) if impl == "auto" else impl
    return _mamba3_xla(
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
        mimo_z,
        mimo_o,
        D,
        z,
        initial_state,
        segment_ids,
        chunk_size=chunk_size,
        return_final_state=return_final_state,
        impl=impl,
        pairing="halves",
    )


def _check_impl(fn, impl):
    if impl not in IMPLS:
        raise ValueError(f"{fn}: unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_final_state", "impl", "pairing"))
def _mamba3_xla(
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
    mimo_z,
    mimo_o,
    D,
    z,
    initial_state,
    segment_ids,
    *,
    chunk_size,
    return_final_state,
    impl,
    pairing,
):
    """q, k (b, l, R, g, n), biases (h, R, n), state k (b, R, h, n): y (b, l, h, p) in v.dtype
    [, final state in the accumulation dtype]."""
    acc = accumulation_dtype(q, k, v, adt, dt)
    args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, mimo_x, initial_state, segment_ids)
    if impl == "reference":
        y_BLRHP, final = mamba3_reference(*args, acc, pairing)
    else:
        y_BLRHP, final = mamba3_chunked(*args, acc, pairing, chunk_size)
    v_BLRHP = rank_values(v.astype(acc), None if mimo_x is None else mimo_x.astype(acc))
    if D is not None:
        y_BLRHP = y_BLRHP + D.astype(acc)[:, None] * v_BLRHP
    if z is not None:
        gate = rank_values(z.astype(acc), None if mimo_z is None else mimo_z.astype(acc))
        y_BLRHP = y_BLRHP * jax.nn.silu(gate)
    if mimo_o is None:
        y = y_BLRHP[:, :, 0]
    else:
        y = jnp.einsum("blrhp,hrp->blhp", y_BLRHP, mimo_o.astype(acc))
    y = y.astype(v.dtype)
    return (y, Mamba3State(*(t.astype(acc) for t in final))) if return_final_state else y
