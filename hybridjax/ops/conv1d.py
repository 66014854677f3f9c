"""Causal depthwise conv1d over (B, L, C), as the Mamba-2 mixer's short convolution.

    y[b, t, c] = bias[c] + sum_k kernel[k, c] * x[b, t - (K-1) + k, c]

with x at t < 0 taken from `initial_state` (zeros by default). `kernel` (K, C) is the torch
`conv1d.weight` (C, 1, K) squeezed and transposed. With `segment_ids` the window never reaches
into the previous document: x[t'] contributes to y[t] only when t' and t lie in one document, a
run of equal ids (`hybridjax.ops.segments`; an `initial_state` counts as part of the first
position's document, as in `ops.ssd`).

With the sequence split over the mesh's "context" axis, each device convolves its own stretch:
the K-1 inputs (and ids) before it come from the previous device (one neighbour send), the
first device takes `initial_state`. Left to XLA, the shifted windows of a split sequence became
two all-to-alls of the whole activation per call.

`activation="silu"` applies SiLU to the float32 sum before the one rounding to x.dtype (the
Mamba-2 mixer's silu(conv(x))); without it (the default) the conv is returned bare.

Implementations (`impl=`):
  "xla"     the shifted-window sum above, left to XLA (any dtype, any mesh).
  "pallas"  the fused conv + SiLU kernels of `hybridjax.kernels.conv1d` (forward and backward;
            GPU, bfloat16/float16/float32; needs activation="silu"). A Pallas call is opaque to
            XLA's partitioner, so under a mesh it runs per shard (shard_map): rows over the
            batch axes, channels over "tensor" where it divides them (the conv is depthwise).
            With the sequence split over "context" the call goes the XLA context path above.
  "auto"    "pallas" on a GPU backend for activation="silu" when the kernels take the call and
            the sequence is not split over "context", else "xla".
The final window (return_final_state) is formed in XLA on either path.

`causal_conv1d_update` is the one-token decode step over a window state (B, K-1, C) holding the
last K-1 inputs, oldest first. Both compute in float32 (float64 for float64 input) and return
x.dtype; the update takes the same `activation`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.ops.segments import context_shards, document_index, over_context
from hybridjax.sharding import SEQUENCE_AXIS, kernel_split

IMPLS = ("auto", "xla", "pallas")
ACTIVATIONS = (None, "silu")


def _check(x, kernel, bias):
    if x.ndim != 3:
        raise ValueError(
            f"causal_conv1d: x has shape {x.shape}, expected (batch, length, channels)"
        )
    if kernel.ndim != 2 or kernel.shape[1] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d: kernel has shape {kernel.shape}, expected (kernel_size, {x.shape[-1]})"
        )
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"causal_conv1d: bias has shape {bias.shape}, expected ({x.shape[-1]},)")


def causal_conv1d(
    x,
    kernel,
    bias=None,
    *,
    segment_ids=None,
    initial_state=None,
    return_final_state=False,
    activation=None,
    impl="auto",
):
    """x (B, L, C), kernel (K, C), bias (C,) | None -> y (B, L, C) [, final_state (B, K-1, C)].

    `initial_state` (B, K-1, C): the K-1 inputs before position 0 (oldest first). The final state
    holds the last K-1 inputs (x.dtype) for `causal_conv1d_update`; with segment_ids, entries
    from documents other than the last position's one are zeroed, so decoding continues the last
    document cleanly. `activation` None | "silu" and `impl` "auto" | "xla" | "pallas": module
    docstring.
    """
    if impl not in IMPLS:
        raise ValueError(f"causal_conv1d: unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; choose None or 'silu'")
    _check(x, kernel, bias)
    b, l, c = x.shape
    k = kernel.shape[0]
    initial_state_given = initial_state is not None
    if initial_state is None:
        initial_state = jnp.zeros((b, k - 1, c), x.dtype)
    elif initial_state.shape != (b, k - 1, c):
        raise ValueError(
            f"causal_conv1d: initial_state has shape {initial_state.shape}, "
            f"expected ({b}, {k - 1}, {c}) = (batch, kernel_size - 1, channels)"
        )
    if segment_ids is not None and segment_ids.shape != (b, l):
        raise ValueError(
            f"causal_conv1d: segment_ids has shape {segment_ids.shape}, "
            f"expected ({b}, {l}) = (batch, length)"
        )
    n_shards = context_shards(l)
    if impl == "pallas":
        if activation != "silu":
            raise ValueError(
                "causal_conv1d: impl='pallas' runs the conv fused with its SiLU and needs "
                "activation='silu'; use impl='xla' for the bare conv"
            )
        from hybridjax.kernels.conv1d import unsupported_reason

        reason = unsupported_reason(x, kernel)
        if reason is not None:
            raise ValueError(f"causal_conv1d(impl='pallas'): {reason}")
    elif impl == "auto":
        impl = "pallas" if n_shards == 1 and _pallas_supported(x, kernel, activation) else "xla"
    if n_shards > 1 and k > 1 and l // n_shards >= k - 1:
        return _conv_over_context(
            x, kernel, bias, segment_ids, initial_state, return_final_state, activation
        )
    if impl == "pallas" and n_shards == 1:
        from hybridjax.kernels.conv1d import causal_conv1d_silu_pallas

        return _conv_pallas(
            causal_conv1d_silu_pallas,
            x,
            kernel,
            bias,
            segment_ids,
            initial_state if initial_state_given else None,
            return_final_state,
        )
    return _conv(x, kernel, bias, segment_ids, initial_state, return_final_state, activation)


def _pallas_supported(x, kernel, activation):
    if activation != "silu" or jax.default_backend() != "gpu":
        return False
    try:
        from hybridjax.kernels.conv1d import unsupported_reason
    except ImportError:
        return False
    return unsupported_reason(x, kernel) is None


def _conv_pallas(fn, x, kernel, bias, segment_ids, initial_state, return_final_state):
    """`fn(x, kernel, bias, doc=, initial_state=)` (the fused conv + SiLU) per shard of the
    current mesh, and the final window in XLA."""
    k = kernel.shape[0]
    doc = None if segment_ids is None else document_index(segment_ids)
    y = _per_shard(fn, x, kernel, bias, doc, initial_state)
    if not return_final_state:
        return y
    if initial_state is None:
        initial_state = jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
    docp = None if doc is None else jnp.pad(doc, ((0, 0), (k - 1, 0)))
    return y, _final_window(x, initial_state, doc, docp)


def _per_shard(fn, x, kernel, bias, doc, initial_state):
    """fn on each device's rows (over the batch axes) and channels (over "tensor" where it
    divides them) of the current mesh; on the whole arrays without one."""
    call = lambda x, kernel, bias, doc, init: fn(x, kernel, bias, doc=doc, initial_state=init)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(x, kernel, bias, doc, initial_state)
    b, _, c = x.shape
    rows, _, ch = kernel_split(mesh, b, None, c)
    if rows is None and ch is None:
        return call(x, kernel, bias, doc, initial_state)
    in_specs = (
        P(rows, None, ch),
        P(None, ch),
        None if bias is None else P(ch),
        None if doc is None else P(rows, None),
        None if initial_state is None else P(rows, None, ch),
    )
    return jax.shard_map(
        call, mesh=mesh, in_specs=in_specs, out_specs=P(rows, None, ch), check_vma=False
    )(x, kernel, bias, doc, initial_state)


def _final_window(x, initial_state, doc, docp):
    """The last K-1 inputs (x.dtype), those of documents other than the last position's zeroed;
    docp (B, K-1+L): the documents of [initial_state, x]."""
    l = x.shape[1]
    final = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)[:, l:]
    if doc is not None and final.shape[1]:
        final = final * (docp[:, l:] == doc[:, -1:])[..., None].astype(x.dtype)
    return final


def _conv(
    x, kernel, bias, segment_ids, initial_state, return_final_state, activation=None, halo_ids=None
):
    """The conv of one stretch; `halo_ids` (B, K-1): the ids of the `initial_state` inputs (by
    default they belong to the first position's document)."""
    b, l, c = x.shape
    k = kernel.shape[0]
    ct = jnp.result_type(jnp.float32, x.dtype)
    xp = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1).astype(ct)  # (B, K-1+L, C)
    doc = docp = None
    if segment_ids is not None and halo_ids is not None:
        docp = document_index(jnp.concatenate([halo_ids, segment_ids], axis=1))
        doc = docp[:, k - 1 :]
    elif segment_ids is not None:
        doc = document_index(segment_ids)
        docp = jnp.pad(doc, ((0, 0), (k - 1, 0)))  # the state belongs to the first document
    w = kernel.astype(ct)
    y = jnp.zeros((b, l, c), ct) if bias is None else jnp.broadcast_to(bias.astype(ct), (b, l, c))
    for i in range(k):  # tap i reads x[t - (K-1) + i]
        tap = xp[:, i : i + l]
        if segment_ids is not None and i < k - 1:
            tap = tap * (docp[:, i : i + l] == doc)[..., None].astype(ct)
        y = y + tap * w[i]
    if activation == "silu":
        y = jax.nn.silu(y)
    y = y.astype(x.dtype)
    if not return_final_state:
        return y
    return y, _final_window(x, initial_state, doc, docp)


def _conv_over_context(
    x, kernel, bias, segment_ids, initial_state, return_final_state, activation=None
):
    """`_conv` per stretch of the sequence over "context": the halo (the K-1 inputs before the
    stretch and their ids) from the previous shard; shard 0 takes `initial_state`, whose inputs
    belong to its first document. The final window (return_final_state) is the last shard's,
    on every shard."""
    k = kernel.shape[0]

    def local(x, segment_ids, initial_state, kernel, bias):
        shard = jax.lax.axis_index(SEQUENCE_AXIS)
        n = jax.lax.axis_size(SEQUENCE_AXIS)
        to_next = [(i, i + 1) for i in range(n - 1)]
        halo = jax.lax.ppermute(x[:, 1 - k :], SEQUENCE_AXIS, to_next)
        halo = jnp.where(shard > 0, halo, initial_state.astype(x.dtype))
        halo_ids = None
        if segment_ids is not None:
            halo_ids = jax.lax.ppermute(segment_ids[:, 1 - k :], SEQUENCE_AXIS, to_next)
            first = jnp.broadcast_to(segment_ids[:, :1], halo_ids.shape)
            halo_ids = jnp.where(shard > 0, halo_ids, first)
        out = _conv(x, kernel, bias, segment_ids, halo, return_final_state, activation, halo_ids)
        if not return_final_state:
            return out
        y, final = out
        last = jnp.where(shard == n - 1, final, jnp.zeros_like(final))
        return y, jax.lax.psum(last, SEQUENCE_AXIS)[:, None]  # (B, 1, K-1, C): whole per shard

    out = over_context(local, x, segment_ids, initial_state, kernel, bias, shard_args=2)
    if not return_final_state:
        return out
    y, final = out
    return y, final[:, 0]


def causal_conv1d_update(x, state, kernel, bias=None, *, activation=None):
    """One decode step. x (B, C), state (B, K-1, C) -> (y (B, C), new_state (B, K-1, C)); with
    activation="silu", SiLU before the one rounding, as `causal_conv1d`."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"causal_conv1d_update: unknown activation {activation!r}; choose None or 'silu'"
        )
    if x.ndim != 2:
        raise ValueError(f"causal_conv1d_update: x has shape {x.shape}, expected (batch, channels)")
    _check(x[:, None], kernel, bias)
    k = kernel.shape[0]
    if state.shape != (x.shape[0], k - 1, x.shape[1]):
        raise ValueError(
            f"causal_conv1d_update: state has shape {state.shape}, expected "
            f"({x.shape[0]}, {k - 1}, {x.shape[1]})"
        )
    ct = jnp.result_type(jnp.float32, x.dtype)
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # (B, K, C)
    y = jnp.sum(window.astype(ct) * kernel.astype(ct), axis=1)
    if bias is not None:
        y = y + bias.astype(ct)
    if activation == "silu":
        y = jax.nn.silu(y)
    return y.astype(x.dtype), window[:, 1:].astype(state.dtype)
