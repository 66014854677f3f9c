"""The fused causal conv1d + SiLU Pallas kernels (interpret mode, CPU) against a float64 loop over
the taps: values and the gradients of x, kernel, bias and initial state, at lengths and channel
counts that the blocks do not divide, documents that start at and next to block edges, kernel
sizes 2..4, float32 and bfloat16; they lower for CUDA (Triton) alone and per shard of a mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.kernels import conv1d as kconv
from hybridjax.kernels.conv1d import causal_conv1d_silu_pallas
from hybridjax.ops.conv1d import _conv_pallas, causal_conv1d
from hybridjax.sharding import make_mesh
from tests.kernels._lowering import triton_operand_shapes

U_BF16 = 2.0**-8  # bfloat16's unit roundoff: one rounding of a float32 result


def oracle(x, kernel, bias, seg, init):
    """float64 silu(bias + sum_i kernel[i] x[t - (K-1) + i]), a tap counted only when its position
    is in t's document (a run of equal ids); the initial state's rows are the first position's."""
    b, l, c = x.shape
    k = kernel.shape[0]
    xp = jnp.concatenate([jnp.zeros((b, k - 1, c)) if init is None else init, x], axis=1)
    run = None
    if seg is not None:
        starts = np.concatenate([np.zeros((b, 1), int), np.diff(seg, axis=1) != 0], axis=1)
        run = np.cumsum(starts, axis=1)
        run = np.concatenate([np.repeat(run[:, :1], k - 1, axis=1), run], axis=1)
    pre = jnp.zeros((b, l, c)) if bias is None else jnp.broadcast_to(bias, (b, l, c))
    for i in range(k):  # xp row t + i is tap i of output t
        tap = xp[:, i : i + l] * kernel[i]
        if run is not None:
            tap = tap * (run[:, i : i + l] == run[:, k - 1 :])[..., None]
        pre = pre + tap
    return pre * jax.nn.sigmoid(pre)


def segments(b, l, starts):
    """ids (b, l) with documents starting at `starts[row]`; ids cycle through 0..2, so an id
    comes back later in the row (a new document all the same)."""
    seg = np.zeros((b, l), np.int32)
    for row in range(b):
        for n, s in enumerate(sorted(starts[row % len(starts)])):
            seg[row, s:] = (n + 1) % 3
    return seg


def inputs(b, l, c, k, dtype, bias=True, init=True, seed=0):
    rng = np.random.default_rng(seed)
    cast = lambda a: jnp.asarray(a, dtype)
    x = cast(rng.standard_normal((b, l, c)))
    kern = jnp.asarray(rng.uniform(-1, 1, (k, c)), jnp.float32)
    bia = jnp.asarray(rng.uniform(-1, 1, (c,)), jnp.float32) if bias else None
    ini = cast(rng.standard_normal((b, k - 1, c))) if init else None
    dy = cast(rng.standard_normal((b, l, c)))
    return x, kern, bia, ini, dy


def _f64(a):
    return None if a is None else jnp.asarray(a, jnp.float64)


def check(x, kern, bias, init, dy, seg, **tuning):
    doc = None
    if seg is not None:
        from hybridjax.ops.segments import document_index

        doc = document_index(jnp.asarray(seg))
    args = (x, kern, bias, init)
    diff = [i for i, a in enumerate(args) if a is not None]

    def run(fn, args):
        def f(*d):
            full = list(args)
            for i, a in zip(diff, d):
                full[i] = a
            return fn(*full)

        y, vjp = jax.vjp(f, *(args[i] for i in diff))
        return y, vjp

    pallas = functools.partial(causal_conv1d_silu_pallas, interpret=True, **tuning)
    y, vjp = run(lambda x, k, b, i: pallas(x, k, b, doc=doc, initial_state=i), args)
    grads = vjp(dy)
    y64, vjp64 = run(lambda x, k, b, i: oracle(x, k, b, seg, i), tuple(map(_f64, args)))
    want = vjp64(_f64(dy))

    names = ["x", "kernel", "bias", "initial_state"]
    assert y.dtype == x.dtype
    results = [("y", y, y64, x.dtype)]
    results += [(f"d{names[i]}", g, w, args[i].dtype) for i, g, w in zip(diff, grads, want)]
    for name, got, ref, dtype in results:
        assert got.dtype == dtype, name
        got, ref = np.asarray(got, np.float64), np.asarray(ref)
        scale = np.abs(ref).max()
        if dtype == jnp.bfloat16:  # one rounding of the float32 result, no more
            tol = U_BF16 * np.abs(ref) + 1e-5 * scale
        else:
            tol = 1e-5 * scale
        err = np.abs(got - ref)
        assert np.all(err <= tol), f"{name}: max error {err.max():.2e} (scale {scale:.2e})"


# (dtype, b, l, c, k, bias, init, document starts per row, tuning)
CASES = {
    "f32_l1000_k4_docs_init": (
        jnp.float32,
        2,
        1000,
        40,
        4,
        True,
        True,
        [[1, 63, 64, 130, 600], [3, 256]],
        {},
    ),
    "f32_l37_k3_init": (jnp.float32, 2, 37, 24, 3, True, True, None, {"block_l": 16}),
    "f32_l37_k2_docs": (jnp.float32, 1, 37, 24, 2, True, False, [[16, 17, 31]], {"block_l": 16}),
    "f32_k4_no_bias_no_init": (jnp.float32, 2, 100, 20, 4, False, False, None, {}),
    "f32_small_blocks": (
        jnp.float32,
        2,
        100,
        40,
        4,
        True,
        True,
        [[2, 16, 18, 33], [15, 47, 64, 65]],
        {"block_l": 16, "block_c": 16, "blocks_per_program": 2},
    ),
    "bf16_l1000_k4_docs_init": (
        jnp.bfloat16,
        2,
        1000,
        40,
        4,
        True,
        True,
        [[1, 2, 64, 127, 999], [500]],
        {},
    ),
    "bf16_l37_k3_docs_init": (
        jnp.bfloat16,
        2,
        37,
        20,
        3,
        True,
        True,
        [[1, 20]],
        {"block_l": 16, "block_c": 16},
    ),
    "bf16_l37_k2": (jnp.bfloat16, 1, 37, 24, 2, True, True, None, {"block_l": 16}),
    "f32_shorter_than_window": (jnp.float32, 2, 2, 8, 4, True, True, [[1]], {}),
    "bf16_one_position": (jnp.bfloat16, 2, 1, 8, 4, True, True, None, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_float64_loop(case):
    dtype, b, l, c, k, bias, init, starts, tuning = CASES[case]
    x, kern, bia, ini, dy = inputs(b, l, c, k, dtype, bias, init, seed=len(case))
    seg = None if starts is None else segments(b, l, starts)
    check(x, kern, bia, ini, dy, seg, **tuning)


def test_a_tap_off_by_one_fails_the_check(monkeypatch):
    """The tolerance catches a kernel whose taps are shifted by one position."""
    x, kern, bias, init, dy = inputs(1, 37, 16, 3, jnp.float32)
    load = kconv._Block.x  # the oldest tap (d = -2) reads one position too late
    monkeypatch.setattr(
        kconv._Block, "x", lambda self, d, n=None: load(self, d + 1 if d == -2 else d, n)
    )
    with pytest.raises(AssertionError):
        check(x, kern, bias, init, dy, None, block_l=16)


def test_float16_and_bfloat16_parameters():
    """Parameters in half precision: their gradients come back in their dtype."""
    x, kern, bias, init, dy = inputs(1, 40, 16, 4, jnp.float16)
    kern, bias = kern.astype(jnp.bfloat16), bias.astype(jnp.bfloat16)
    f = lambda k, b: causal_conv1d_silu_pallas(x, k, b, initial_state=init, interpret=True)
    y, vjp = jax.vjp(f, kern, bias)
    dk, db = vjp(dy)
    assert y.dtype == jnp.float16 and dk.dtype == db.dtype == jnp.bfloat16
    ref = oracle(*map(_f64, (x, kern, bias)), None, _f64(init))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-3, atol=1e-3)


def test_bad_arguments():
    x, kern = jnp.zeros((1, 8, 4), jnp.float32), jnp.zeros((4, 4), jnp.float32)
    with pytest.raises(ValueError, match="block_l=48 must be a power of two"):
        causal_conv1d_silu_pallas(x, kern, interpret=True, block_l=48)
    with pytest.raises(ValueError, match="float64"):
        causal_conv1d_silu_pallas(x.astype(jnp.float64), kern, interpret=True)
    with pytest.raises(ValueError, match="kernel_size 20 must be in 1..17"):
        causal_conv1d_silu_pallas(x, jnp.zeros((20, 4)), interpret=True, block_l=16)
    with pytest.raises(ValueError, match="initial_state has shape"):
        causal_conv1d_silu_pallas(x, kern, initial_state=jnp.zeros((1, 4, 4)), interpret=True)
    with pytest.raises(ValueError, match="doc has shape"):
        causal_conv1d_silu_pallas(x, kern, doc=jnp.zeros((1, 7), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"needs a GPU backend.*interpret=True"):
        causal_conv1d_silu_pallas(x, kern)


# ----------------------------------------------------------------------------------------------
# CUDA lowering (Triton-only errors), alone and per shard
# ----------------------------------------------------------------------------------------------
def _no_backend_check(monkeypatch):
    # The support check refuses a CPU backend; lowering for CUDA needs no GPU.
    monkeypatch.setattr(kconv, "backend_reason", lambda *a, **k: None)


@pytest.mark.parametrize(
    "dtype,k,features", [(jnp.bfloat16, 4, True), (jnp.float32, 3, False), (jnp.float16, 2, True)]
)
def test_forward_and_backward_lower_for_cuda(monkeypatch, dtype, k, features):
    _no_backend_check(monkeypatch)
    b, l, c = 2, 1000, 200
    x = jnp.zeros((b, l, c), dtype)
    kern = jnp.zeros((k, c))
    bias = jnp.zeros((c,)) if features else None
    init = jnp.zeros((b, k - 1, c), dtype) if features else None
    doc = jnp.zeros((b, l), jnp.int32) if features else None

    def loss(x, kern, bias, init):
        y = causal_conv1d_silu_pallas(x, kern, bias, doc=doc, initial_state=init)
        return y.astype(jnp.float32).sum()

    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if features else (0, 1)))
        .trace(x, kern, bias, init)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


def test_pallas_under_a_mesh_lowers_per_shard_for_cuda(monkeypatch):
    _no_backend_check(monkeypatch)
    b, l, c = 8, 256, 64
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
    x = jax.device_put(jnp.zeros((b, l, c), jnp.bfloat16), rows)
    seg = jnp.zeros((b, l), jnp.int32)

    def loss(x, kern, bias):
        y = causal_conv1d(x, kern, bias, segment_ids=seg, activation="silu", impl="pallas")
        return y.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        text = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            .trace(x, jnp.zeros((4, c)), jnp.zeros((c,)))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert text.count("__gpu$xla.gpu.triton") == 2
    # each kernel sees its device's 2 rows (of 8) and 32 channels (of 64), never the whole batch
    shapes = triton_operand_shapes(text)
    assert "2x256x32" in shapes and not any(s.startswith("8x") for s in shapes), shapes


def test_per_shard_equals_whole_arrays():
    """Under a mesh (rows over data and fsdp, channels over tensor) the interpret-mode kernels
    give the XLA path's values, gradients and final window."""
    b, l, c, k = 4, 40, 16, 4
    x, kern, bias, init, dy = inputs(b, l, c, k, jnp.float32)
    seg = jnp.asarray(segments(b, l, [[5, 17], [], [39]]))
    kernel_fn = functools.partial(causal_conv1d_silu_pallas, interpret=True, block_l=16)

    def loss(fn, x, kern, bias, init):
        y, final = fn(x, kern, bias, init)
        return jnp.sum(y * dy) + jnp.sum(final * jnp.cos(final))

    xla = lambda x, kern, bias, init: causal_conv1d(
        x, kern, bias, segment_ids=seg, initial_state=init, return_final_state=True,
        activation="silu", impl="xla",
    )  # fmt: skip
    pallas = lambda x, kern, bias, init: _conv_pallas(kernel_fn, x, kern, bias, seg, init, True)
    grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))
    want = grad(xla)(x, kern, bias, init)
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        got = grad(pallas)(x, kern, bias, init)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
