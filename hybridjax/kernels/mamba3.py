"""`mamba3_siso_pallas`: the Mamba-3 SISO scan on the GPU through the Pallas SSD kernels.

The reduction (DESIGN note). Mamba-3's exponential-trapezoidal step

    S_t = alpha_t S_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T,    y_t = S_t q~_t

(alpha = exp(A dt), beta = (1 - lam) dt alpha, gamma = lam dt, q~ and k~ biased and rotated by
the cumulative angles) is an SSD in disguise (`hybridjax.ops.mamba3_chunked`'s docstring). With
w_t = dt_{t+1} (1 - lam_{t+1}) (0 at the last step and before a document start) the primed
state S'_t = S_t + w_t v_t k~_t^T obeys

    S'_t = alpha_t S'_{t-1} + (gamma_t + w_t) v_t k~_t^T,     y_t = q~_t . S'_t - w_t (q~_t . k~_t) v_t

so y is the SSD with per-position log decay A dt, input weight gamma + w, B = k~, C = q~ (per
head: after the rotation every head has its own, so the SSD has one group per head), minus a
per-position multiple of v. The caller's initial state enters primed, S_init + dt_0 (1 - lam_0)
v_prev k_prev^T, and the final S' is S (w = 0 at the last step). So the GPU path is:

  XLA (elementwise)  cumulative angles (`running_angle`: a segmented prefix sum mod 2 pi),
                     q~ and k~ (written in the kernels' operand dtype) and their diagonal
                     q~ . k~, the weights gamma + w, the primed initial state
                     (`mamba3_chunked.ssd_form`, the chunked path's own prep)
  Pallas             `weighted_ssd_pallas`, the Mamba-2 kernels' core with the input weight and
                     the log decay as separate inputs (forward and backward, segment resets,
                     initial and final state)
  XLA (elementwise)  y = (y_ssd + (D - w (q~ . k~)) v) * silu(z)

and the backward is the kernels' custom_vjp plus XLA's autodiff of the two elementwise ends
(rotation, angles, trapezoid weights, the gate): nothing Mamba-3-specific runs inside a kernel,
so the kernels that Mamba-2 uses (and their tests) are the ones that run. The diagonal's q~ . k~
is taken from q~ and k~ rounded to the kernels' operand dtype, the products the kernels
multiply, so the subtraction removes what the kernel added at that position.

The final state is (angle, S, last k~, last v) as every impl of `hybridjax.ops.mamba3_siso`
returns it, float32. Under a mesh the scan runs per device on its rows and heads (shard_map:
a Pallas call is opaque to XLA's partitioner, which would gather it onto every device); a mesh
that splits the sequence ("context") is refused: that needs the state passed between shards,
which only the XLA paths get (from XLA). MIMO stays on the chunked XLA path: its rank axis folds
into the chunk ((L R) x (L R) blocks), which these kernels' per-position vectors do not express.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.kernels.ssd import F32, backend_reason, limits_reason, weighted_ssd_pallas
from hybridjax.ops.mamba3_chunked import ssd_form
from hybridjax.ops.mamba3_reference import Mamba3State, heads_with_bias, rotate
from hybridjax.ops.ssd_sharded import _local_groups, mesh_split


def mamba3_pallas_unsupported_reason(q, v, *, chunk_size=64, interpret=False, **unused):
    """None when `mamba3_siso_pallas` supports a call with q (b, l, g, n), v (b, l, h, p) (under
    the current mesh), else a sentence saying why not."""
    del unused
    reason = limits_reason("v", v.dtype, v.shape[-1], q.shape[-1], chunk_size)
    if reason is None:
        split = mesh_split(v.shape, q.shape[2])
        if split is not None and split[2] is not None:
            reason = (
                "the mesh splits the sequence (the 'context' axis); the Pallas path runs per "
                "device on whole sequences, impl='chunked' leaves the split to XLA"
            )
    return reason or backend_reason("hybridjax.kernels.mamba3_siso_pallas", interpret)


def mamba3_siso_pallas(
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
    interpret=False,
    **tuning,
):
    """The Mamba-3 SISO scan of `hybridjax.ops.mamba3_siso` (same arguments and results; the
    caller checks the shapes) through the Pallas SSD kernels; see the module docstring.

    chunk_size caps the kernels' chunk length (64 at most; the result does not depend on it
    beyond rounding). `tuning` goes to `weighted_ssd_pallas` (block_q, superchunks, poison, ...:
    `hybridjax.kernels.ssd_pallas`'s docstring). interpret=True runs the kernels in Pallas
    interpret mode (CPU). Returns y (b, l, h, p) in v.dtype [, Mamba3State in float32].
    """
    reason = mamba3_pallas_unsupported_reason(q, v, chunk_size=chunk_size, interpret=interpret)
    if reason is not None:
        raise ValueError(f"mamba3_siso(impl='pallas'): {reason}")
    if initial_state is not None:
        initial_state = Mamba3State(*initial_state)
    scan = functools.partial(
        _siso,
        chunk_size=chunk_size,
        interpret=bool(interpret),
        tuning=tuple(sorted(tuning.items())),
    )
    args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, initial_state, segment_ids)
    y, final = _per_shard(scan, *args)
    return (y, final) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret", "tuning"))
def _siso(
    q,
    k,
    v,
    adt,
    dt,
    trap,
    q_bias,
    k_bias,
    angles,
    D,
    z,
    initial_state,
    segment_ids,
    *,
    chunk_size,
    interpret,
    tuning,
):
    """(y, final state) on whole sequences (one device's rows and heads under a mesh)."""
    if initial_state is not None:  # ssd_form's layout has a rank axis
        initial_state = initial_state._replace(k=initial_state.k[:, None])
    form = ssd_form(
        q[:, :, None],
        k[:, :, None],
        v,
        dt,
        trap,
        q_bias[:, None],
        k_bias[:, None],
        angles,
        None,
        initial_state,
        segment_ids,
        F32,
        "adjacent",
    )
    # q~ and k~ go to the kernels in their operand dtype: the rotation's fusion writes them so,
    # half the bytes of float32 (the kernels would round them on loading anyway)
    q_op, k_op = (t[:, :, 0].astype(v.dtype) for t in (form.q, form.k))  # (b, l, h, n)
    y, ssm = weighted_ssd_pallas(
        v,
        form.gamma + form.w,
        adt,
        k_op,
        q_op,
        chunk_size=chunk_size,
        initial_state=form.s0,
        segment_ids=segment_ids,
        interpret=interpret,
        **dict(tuning),
    )
    # the diagonal took weight gamma + w; it should have taken gamma (module docstring). q~ . k~
    # of the rounded operands, the products the kernels multiplied. The barrier keeps this
    # reduction a fusion of its own: fused with the kernels' (b, h, l) weights below, XLA emitted
    # it transposed at a fifth of the bandwidth (0.55 ms of a 1.3 ms forward, b4 l4096 h32 n128).
    qk = jax.lax.optimization_barrier(jnp.sum(q_op.astype(F32) * k_op.astype(F32), axis=-1))
    coef = -form.w * qk
    if D is not None:
        coef = coef + D.astype(F32)
    out = y.astype(F32) + coef[..., None] * v.astype(F32)
    if z is not None:
        out = out * jax.nn.silu(z.astype(F32))
    # the last k~ in float32, from the last step alone (not a slice of the whole rotation)
    k_last = rotate(
        heads_with_bias(k[:, -1:, None].astype(F32), k_bias[:, None].astype(F32)),
        form.phi[:, -1:, None],
        "adjacent",
    )[:, 0, 0]
    final = Mamba3State(form.phi[:, -1], ssm, k_last, v[:, -1].astype(F32))
    return out.astype(v.dtype), final


def _per_shard(scan, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, state, segment_ids):
    """scan on each device's rows and heads of the current mesh (on the whole arrays without
    one); the sequence is never split here (`mamba3_pallas_unsupported_reason`)."""
    split = mesh_split(v.shape, q.shape[2])
    args = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, state, segment_ids)
    if split is None:
        return scan(*args)
    mesh, rows, _, heads, groups = split
    h, g = v.shape[2], q.shape[2]
    n_tensor = mesh.shape.get("tensor", 1)

    def local(q, k, *rest):
        if heads is not None and groups is None:  # q, k whole: take the groups of our heads
            q, k = (_local_groups(t, h // n_tensor, h // g) for t in (q, k))
        return scan(q, k, *rest)

    qk = P(rows, None, groups, None)
    per_head = P(rows, None, heads, None)
    per_step = P(rows, None, heads)
    bias = P(heads, None)
    state_spec = Mamba3State(
        P(rows, heads, None), P(rows, heads, None, None), P(rows, heads, None), P(rows, heads, None)
    )
    in_specs = (
        qk,
        qk,
        per_head,
        per_step,
        per_step,
        per_step,
        bias,
        bias,
        per_head,
        None if D is None else P(heads),
        None if z is None else per_head,
        None if state is None else state_spec,
        None if segment_ids is None else P(rows, None),
    )
    return jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=(per_head, state_spec), check_vma=False
    )(*args)
