"""grouped_matmul against a per-group numpy loop (values) and a masked-einsum oracle (grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops.grouped_matmul import (
    grouped_matmul,
    is_hopper,
    mgpu_forward_tiling,
    mgpu_supported,
)

# M = 13 rows, 5 groups with empty ones; the last 2 rows lie past sum(group_sizes) = 11.
GROUP_SIZES = np.array([3, 0, 6, 0, 2], np.int32)
M, K, N = 13, 7, 5


def numpy_loop(lhs, rhs, group_sizes, capacity=None):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for e, size in enumerate(group_sizes):
        for i in range(size):
            if capacity is None or i < capacity:
                out[start + i] = lhs[start + i] @ rhs[e]
        start += size
    return out


def masked_oracle(lhs, rhs, group_sizes):
    """Differentiable jnp oracle: out = sum_e mask_e * (lhs @ rhs[e])."""
    ends = np.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = np.arange(lhs.shape[0])
    out = 0.0
    for e in range(rhs.shape[0]):
        mask = ((rows >= starts[e]) & (rows < ends[e]))[:, None]
        out = out + jnp.where(mask, lhs @ rhs[e], 0.0)
    return out


def operands(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)), rng.standard_normal((len(GROUP_SIZES), K, N))


@pytest.mark.parametrize("impl", ["ragged_dot", "padded", "auto"])
def test_values_match_per_group_loop(impl):
    lhs, rhs = operands()
    out = grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(GROUP_SIZES), impl)
    want = numpy_loop(lhs, rhs, GROUP_SIZES)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(out)[11:] == 0)  # rows past the groups are zero


@pytest.mark.parametrize("impl", ["ragged_dot", "padded"])
def test_grads_match_oracle(impl):
    lhs, rhs = operands(1)
    gs = jnp.asarray(GROUP_SIZES)
    cot = np.random.default_rng(2).standard_normal((M, N))

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b) * cot)

    got = jax.grad(loss(lambda a, b: grouped_matmul(a, b, gs, impl)), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(loss(lambda a, b: masked_oracle(a, b, GROUP_SIZES)), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(got[0])[11:] == 0)
    assert np.all(np.asarray(got[1])[[1, 3]] == 0)  # empty groups get zero weight gradient


def test_padded_capacity_drops_overflow_rows():
    lhs, rhs = operands(3)
    out = grouped_matmul(
        jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(GROUP_SIZES), "padded", capacity=2
    )
    np.testing.assert_allclose(
        np.asarray(out), numpy_loop(lhs, rhs, GROUP_SIZES, capacity=2), rtol=1e-12, atol=1e-12
    )


def test_jit_with_traced_group_sizes():
    lhs, rhs = operands(4)
    f = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, "padded"))
    np.testing.assert_allclose(
        np.asarray(f(lhs, rhs, jnp.asarray(GROUP_SIZES))),
        numpy_loop(lhs, rhs, GROUP_SIZES),
        rtol=1e-12,
        atol=1e-12,
    )


def test_bad_arguments_name_the_field():
    lhs, rhs = operands()
    with pytest.raises(ValueError, match="impl 'cutlass' is not allowed"):
        grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(GROUP_SIZES), "cutlass")
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="mgpu"):  # float64 and K=7: unsupported shapes
        grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(GROUP_SIZES), "mgpu")
    bf = jnp.bfloat16  # supported operands, but fewer rows than one of its tiles
    with pytest.raises(ValueError, match="impl 'persistent' needs .* M >= 128"):
        grouped_matmul(
            jnp.zeros((127, 128), bf), jnp.zeros((2, 128, 128), bf), jnp.ones(2), "persistent"
        )


def test_mgpu_support_rule():
    bf = jnp.bfloat16
    assert mgpu_supported(jnp.zeros((8, 256), bf), jnp.zeros((4, 256, 128), bf), check_device=False)
    assert not mgpu_supported(
        jnp.zeros((8, 200), bf), jnp.zeros((4, 200, 128), bf), check_device=False
    )
    assert not mgpu_supported(jnp.zeros((8, 256)), jnp.zeros((4, 256, 128)), check_device=False)


@pytest.mark.parametrize("n, width", [(128, 1), (256, 2), (384, 3), (640, 1), (768, 3), (1024, 4)])
def test_mgpu_column_swizzle_is_the_widest_that_divides(n, width):
    assert mgpu_forward_tiling(n)["grid_block_n"] == width


@pytest.mark.skipif(not is_hopper(), reason="Mosaic-GPU kernel needs an sm_90 GPU")
@pytest.mark.parametrize("impl", ["mgpu", "persistent"])
def test_mgpu_values_and_grads_match_ragged_dot(impl):
    rng = np.random.default_rng(5)
    m, k, n = 1000, 256, 384
    gs = jnp.asarray([300, 0, 128, 450, 0, 100], jnp.int32)  # sum 978 < m
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((6, k, n)) / 16, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)

    def run(impl):
        f = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl).astype(jnp.float32) * cot)
        return grouped_matmul(lhs, rhs, gs, impl), jax.grad(f, argnums=(0, 1))(lhs, rhs)

    (y, (da, db)), (y0, (da0, db0)) = run(impl), run("ragged_dot")
    for a, b in [(y, y0), (da, da0), (db, db0)]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max())


@pytest.mark.parametrize("impl", ["mgpu", "persistent"])
def test_mgpu_vjp_types_under_shard_map(monkeypatch, impl):
    """Inside shard_map the weight gradient of local rows varies with the rows: the custom VJP
    must still hand back cotangents of its primals' types, and the weight's gradient comes out
    summed over the row axes. The Hopper kernels are replaced by XLA equivalents (CPU), which
    note the forward kernel each call asks for."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    from jax.sharding import PartitionSpec as P

    import hybridjax.ops.grouped_matmul as gm
    from hybridjax.sharding import make_mesh

    asked = set()

    def fwd_kernel(lhs, rhs, group_sizes, transpose_rhs=False, persistent=False):
        asked.add(persistent)
        return jax.lax.ragged_dot(
            lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes
        )

    def wgrad(lhs, d_out, group_sizes, **_):
        ids = jnp.repeat(
            jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=lhs.shape[0]
        )
        onehot = (ids[:, None] == jnp.arange(group_sizes.shape[0])).astype(lhs.dtype)
        return jnp.einsum("me,mk,mn->ekn", onehot, lhs, d_out)

    monkeypatch.setattr(gm, "mgpu_supported", lambda *a, **k: True)
    monkeypatch.setattr(gm, "_mgpu_fwd_kernel", fwd_kernel)
    monkeypatch.setattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot", wgrad)
    mesh = make_mesh(data=2, expert=2, devices=jax.devices()[:4])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((512, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
    sizes = jnp.array([60, 40], jnp.int32)  # per device: 100 of its 128 rows, 2 local experts

    def loss(x, w, impl):
        def local(x, w):
            return jax.lax.psum(jnp.sum(grouped_matmul(x, w, sizes, impl) ** 2), ("data", "expert"))

        return jax.shard_map(
            local, mesh=mesh, in_specs=(P(("data", "expert")), P("expert")), out_specs=P()
        )(x, w)

    with jax.set_mesh(mesh):
        want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, "ragged_dot")
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, impl)
    assert asked == {impl == "persistent"}  # forward and d lhs both ran the impl's kernel
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sizes, m",
    [
        ([3, 0, 6, 0, 2], 13),  # groups inside one block, empty groups, rows past the groups
        ([300, 0, 128, 450, 0, 100], 1000),  # groups straddling blocks and aligned to them
        ([0, 0, 256, 0], 256),  # one group filling whole blocks
        ([0, 0, 0], 128),  # no rows at all
    ],
)
def test_mgpu_tile_table_runs_every_row_once_with_its_group(sizes, m):
    """The persistent kernel's schedule: running each listed tile (its block's rows times its
    group's weight, its group's rows stored) gives the grouped matmul, every row once."""
    from hybridjax.ops.ragged_matmul_mgpu import tile_table

    block_m, e = 4, len(sizes)
    table, count = (np.asarray(a) for a in tile_table(jnp.asarray(sizes, jnp.int32), m, block_m))
    assert table.shape == (4, -(-m // block_m) + e - 1)
    count = int(count[0])
    group, block, first, rows = table
    assert (rows[:count] > 0).all() and (rows[count:] == 0).all()
    rng = np.random.default_rng(0)
    lhs, rhs = rng.standard_normal((m, 3)), rng.standard_normal((e, 3, 2))
    out, hits = np.zeros((m, 2)), np.zeros(m, int)
    for t in range(count):
        assert 0 <= first[t] and first[t] + rows[t] <= block_m
        r = slice(block[t] * block_m + first[t], block[t] * block_m + first[t] + rows[t])
        out[r] = lhs[r] @ rhs[group[t]]
        hits[r] += 1
    total = sum(sizes)
    assert (hits[:total] == 1).all() and (hits[total:] == 0).all()
    np.testing.assert_allclose(out, numpy_loop(lhs, rhs, np.asarray(sizes)), rtol=1e-12)
