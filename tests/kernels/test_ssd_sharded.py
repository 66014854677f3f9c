"""The SSD scan per shard of a mesh (8 forced CPU devices): equal to the whole-array scan (values
and gradients, every way heads can read groups across tensor shards, the sequence split over
"context" with documents starting inside shards and exactly at their edges), and the Pallas
kernels lower for CUDA on each device's rows and heads only (no gathered operand)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.kernels import ssd as pallas_ssd
from hybridjax.kernels import ssd_pallas
from hybridjax.ops import ssd
from hybridjax.ops.ssd_sharded import ssd_per_shard
from hybridjax.sharding import make_mesh
from tests.kernels._lowering import triton_operand_shapes
from tests.kernels.test_ssd_pallas import make_inputs, segments


def _loss_and_grads(scan, fl, seg, cots):
    def f(fl):
        y, final = scan(**fl, segment_ids=seg, return_final_state=True)
        return jnp.sum(y * cots[0]) + jnp.sum(final * cots[1])

    return jax.jit(jax.value_and_grad(f))(fl)


@pytest.mark.parametrize(
    "h,g,sizes",
    [
        (4, 2, {"data": 2, "fsdp": 2, "tensor": 2}),  # groups split with the heads
        (8, 2, {"data": 2, "tensor": 4}),  # two heads per shard, one group
        (6, 3, {"data": 4, "tensor": 2}),  # heads straddle groups unevenly: a group per head
        (4, 1, {"data": 8}),  # rows only
    ],
)
def test_per_shard_equals_whole_scan(h, g, sizes):
    fl, cots = make_inputs(h * g, 8, 40, h, 8, g, 8, jnp.float32, True, True)
    fl = jax.tree.map(lambda a: a.astype(jnp.float64), fl)
    cots = jax.tree.map(lambda a: a.astype(jnp.float64), cots)
    seg = segments(8, 40, [[5, 30]] * 8)
    scan = functools.partial(ssd, chunk_size=8, impl="chunked")
    want, want_grads = _loss_and_grads(scan, fl, seg, cots)
    with jax.set_mesh(make_mesh(**sizes)):
        got, got_grads = _loss_and_grads(functools.partial(ssd_per_shard, scan), fl, seg, cots)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for name in fl:
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, err_msg=name
        )


CONTEXT_CASES = {
    "context8": (4, 2, {"data": 1, "context": 8}),
    "data2_context4": (4, 2, {"data": 2, "context": 4}),
    "context2_tensor2": (4, 2, {"data": 2, "context": 2, "tensor": 2}),
    "context4_tensor2_one_group": (4, 1, {"data": 1, "context": 4, "tensor": 2}),
}


@pytest.mark.parametrize("case", list(CONTEXT_CASES))
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_context_parallel_equals_one_device(case, impl):
    """Rows of 48 positions over up to 8 shards of 6: documents start inside shards (7, 20),
    exactly at shard edges (12, 24 with 8 shards; 24 with 2 or 4), ids are reused (cycling
    through 0..2), one row has a single document, and an initial state feeds the first."""
    h, g, sizes = CONTEXT_CASES[case]
    b, l = 4, 48
    fl, cots = make_inputs(len(case), b, l, h, 8, g, 8, jnp.float32, True, True)
    fl, cots = jax.tree.map(lambda a: a.astype(jnp.float64), (fl, cots))
    seg = segments(b, l, [[7, 12, 20, 24, 36], [24], [], [1, 47]])
    scan = functools.partial(ssd, chunk_size=8, impl=impl)
    want, want_grads = _loss_and_grads(scan, fl, seg, cots)
    with jax.set_mesh(make_mesh(**sizes)):
        got, got_grads = _loss_and_grads(scan, fl, seg, cots)
        got_nodocs, _ = _loss_and_grads(scan, fl, None, cots)
    np.testing.assert_allclose(got, want, rtol=1e-11)
    for name in fl:
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-9, atol=1e-11, err_msg=name
        )
    np.testing.assert_allclose(got_nodocs, _loss_and_grads(scan, fl, None, cots)[0], rtol=1e-11)


def test_combine_is_the_sequential_state_pass():
    """The associative operator over stretches equals stepping the recurrence (float64)."""
    from hybridjax.ops.ssm_combine import carry, combine

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0, 1, (9, 2, 3)))
    u = jnp.asarray(rng.standard_normal((9, 2, 3, 4, 5)))
    state, states = jnp.zeros((2, 3, 4, 5)), []
    for t in range(9):
        state = carry(a[t], state, u[t])
        states.append(state)
    a_all, h_all = jax.lax.associative_scan(combine, (a, u), axis=0)
    np.testing.assert_allclose(h_all, np.stack(states), rtol=1e-13)
    np.testing.assert_allclose(a_all, np.cumprod(a, axis=0), rtol=1e-13)


def test_pallas_kernels_per_shard_interpret():
    fl, cots = make_inputs(7, 4, 48, 4, 16, 2, 16, jnp.float32, True, True)
    seg = segments(4, 48, [[3, 20]] * 4)
    kernel = functools.partial(ssd_pallas, chunk_size=16, interpret=True)
    want, want_grads = _loss_and_grads(
        functools.partial(ssd, chunk_size=16, impl="reference"), fl, seg, cots
    )
    with jax.set_mesh(make_mesh(data=2, tensor=2, fsdp=2)):
        got, got_grads = _loss_and_grads(functools.partial(ssd_per_shard, kernel), fl, seg, cots)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name in fl:
        np.testing.assert_allclose(
            got_grads[name], want_grads[name], rtol=1e-4, atol=1e-4, err_msg=name
        )


def test_pallas_under_a_mesh_lowers_per_shard_for_cuda(monkeypatch):
    # The support check refuses a CPU backend; lowering for CUDA needs no GPU.
    monkeypatch.setattr(pallas_ssd, "pallas_unsupported_reason", lambda *a, **k: None)
    b, l, h, p, g, n = 8, 512, 4, 64, 2, 64
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None, "tensor"))
    x = jax.device_put(jnp.zeros((b, l, h, p), jnp.bfloat16), rows)
    dt = jax.device_put(jnp.full((b, l, h), 0.1), rows)
    B = jax.device_put(jnp.zeros((b, l, g, n), jnp.bfloat16), rows)
    A = -jnp.ones((h,))

    def loss(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, chunk_size=64, impl="pallas").astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        text = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            .trace(x, dt, A, B, B)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    shapes = triton_operand_shapes(text)
    assert text.count("__gpu$xla.gpu.triton") >= 4  # forward, state, dc and dx kernels
    # every kernel sees its device's 2 rows (of 8) and 2 heads (of 4), never the whole batch
    # (without the shard_map they would read 8x512x4x64: the operands gathered)
    assert shapes and all(s.startswith("2x") for s in shapes), shapes
    assert "2x512x2x64" in shapes and "2x512x1x64" in shapes  # x's and B's local blocks
