"""`ssd`: the Mamba-2 state-space-duality scan, one signature over several implementations.

Per head (head h reads group h // (H/G) of B and C):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        y_t = C_t . h_t + D * x_t

Implementations (`impl=`):
  "reference"  `lax.scan` over time, one step per token: the oracle.
  "assoc"      `lax.associative_scan` over the full (b, l, h, p, n) state: a second oracle.
  "chunked"    the Mamba-2 SSD matmul form in plain XLA: the training path until Pallas lands.
  "pallas"     the GPU kernel in `hybridjax.kernels` (imported only when asked for); under a
               mesh it runs per shard (`hybridjax.ops.ssd_sharded`).
Under a mesh with a "context" axis (the sequence split over devices) every implementation runs
per shard with exact state passing between the shards (`hybridjax.ops.ssd_sharded`).
  "auto"       "pallas" on a GPU backend when the kernel supports the call, else "chunked".

Packed sequences: wherever segment_ids[t] != segment_ids[t-1] the state is zeroed before step t.
`initial_state` is the state before t=0, so it feeds the first segment only (position 0 never
resets). Decays and the state are computed in float32 (float64 when inputs are float64);
y comes back in x.dtype, the final state in float32 (float64).
"""

import functools

import jax
import jax.numpy as jnp

from hybridjax.ops.ssd_assoc import ssd_assoc
from hybridjax.ops.ssd_chunked import ssd_chunked
from hybridjax.ops.ssd_reference import ssd_reference
from hybridjax.ops.ssd_sharded import splits_sequence, ssd_per_shard

IMPLS = ("auto", "reference", "assoc", "chunked", "pallas")


def _shape_error(name, got, want):
    return ValueError(f"ssd: {name} has shape {tuple(got)}, expected {want}")


def _check_shapes(x, dt, A, B, C, D, initial_state, segment_ids, chunk_size):
    if x.ndim != 4:
        raise _shape_error("x", x.shape, "(batch, length, heads, head_dim) — 4 dims")
    b, l, h, p = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, l):
        raise _shape_error("B", B.shape, f"({b}, {l}, n_groups, d_state) for x of shape {x.shape}")
    g, n = B.shape[2:]
    if g == 0 or h % g:
        raise ValueError(
            f"ssd: B has {g} groups, which must divide the {h} heads of x "
            f"(x {tuple(x.shape)}, B {tuple(B.shape)})"
        )
    if C.shape != B.shape:
        raise _shape_error("C", C.shape, f"{tuple(B.shape)} (the shape of B)")
    if dt.shape != (b, l, h):
        raise _shape_error("dt", dt.shape, f"({b}, {l}, {h}) for x of shape {x.shape}")
    if A.shape != (h,):
        raise _shape_error("A", A.shape, f"({h},) for x of shape {x.shape}")
    if D is not None and D.shape != (h,):
        raise _shape_error("D", D.shape, f"({h},) for x of shape {x.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise _shape_error(
            "initial_state",
            initial_state.shape,
            f"({b}, {h}, {p}, {n}) = (batch, heads, head_dim, d_state)",
        )
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            raise _shape_error("segment_ids", segment_ids.shape, f"({b}, {l}) = (batch, length)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"ssd: segment_ids must be integers, got dtype {segment_ids.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")


def accumulation_dtype(*arrays):
    """float64 when any input is float64, else float32: the dtype of decays and states."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def _pallas_supported(x, dt, A, B, C, **kw):
    if jax.default_backend() != "gpu":
        return False
    try:
        from hybridjax.kernels import pallas_unsupported_reason
    except ImportError:
        return False
    return pallas_unsupported_reason(x, dt, A, B, C, **kw) is None


def ssd(
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
    impl="auto",
):
    """The SSD scan; see the module docstring. Returns y or (y, final_state)."""
    if impl not in IMPLS:
        raise ValueError(f"ssd: unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    x, dt, A, B, C = map(jnp.asarray, (x, dt, A, B, C))
    D = None if D is None else jnp.asarray(D)
    initial_state = None if initial_state is None else jnp.asarray(initial_state)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    _check_shapes(x, dt, A, B, C, D, initial_state, segment_ids, chunk_size)

    kw = {
        "D": D,
        "chunk_size": chunk_size,
        "initial_state": initial_state,
        "segment_ids": segment_ids,
        "return_final_state": return_final_state,
    }
    if impl == "auto":
        impl = "pallas" if _pallas_supported(x, dt, A, B, C, **kw) else "chunked"
    if impl == "pallas":  # a custom call XLA cannot partition: run it per shard
        from hybridjax.kernels import ssd_pallas

        return ssd_per_shard(ssd_pallas, x, dt, A, B, C, **kw)
    xla = functools.partial(_ssd_xla_call, impl=impl)
    if splits_sequence(x.shape, B.shape[2]):  # the state crosses devices: exact state passing
        return ssd_per_shard(xla, x, dt, A, B, C, **kw)
    return xla(x, dt, A, B, C, **kw)


def _ssd_xla_call(
    x, dt, A, B, C, *, D, chunk_size, initial_state, segment_ids, return_final_state, impl
):
    return _ssd_xla(
        x,
        dt,
        A,
        B,
        C,
        D,
        initial_state,
        segment_ids,
        chunk_size=chunk_size,
        return_final_state=return_final_state,
        impl=impl,
    )


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_final_state", "impl"))
def _ssd_xla(
    x, dt, A, B, C, D, initial_state, segment_ids, *, chunk_size, return_final_state, impl
):
    acc = accumulation_dtype(x, dt, A, B, C)
    if impl == "reference":
        y, final = ssd_reference(x, dt, A, B, C, initial_state, segment_ids, acc)
    elif impl == "assoc":
        y, final = ssd_assoc(x, dt, A, B, C, initial_state, segment_ids, acc)
    else:
        y, final = ssd_chunked(x, dt, A, B, C, initial_state, segment_ids, acc, chunk_size)
    if D is not None:
        y = y + D.astype(acc)[:, None] * x.astype(acc)
    y = y.astype(x.dtype)
    return (y, final.astype(acc)) if return_final_state else y
