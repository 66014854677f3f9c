"""MoE dispatch: dropless sort/un-sort and capacity slots against python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops import moe_dispatch as md


def routing(t=11, k=3, e=5, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    return idx, rng.standard_normal((t, k)), rng.standard_normal((t, 4))


def expert_maps(e=5, d=4, seed=1):
    return np.random.default_rng(seed).standard_normal((e, d, d))


def test_expert_capacity_formula():
    assert md.expert_capacity(100, 2, 8, 1.25) == 32  # ceil(31.25)
    assert md.expert_capacity(64, 2, 8, 1.0) == 16
    assert md.expert_capacity(1, 1, 64, 0.5) == 1  # never below one row


def test_dropless_groups_are_contiguous_and_exact():
    idx, w, x = routing()
    e, maps = 5, expert_maps()
    rows, plan = md.dropless_dispatch(jnp.asarray(x), jnp.asarray(idx), e)
    np.testing.assert_array_equal(plan.group_sizes, np.bincount(idx.ravel(), minlength=e))
    # Row r of the sorted rows is token order[r] // k, which routed to the group's expert.
    sorted_experts = np.repeat(np.arange(e), np.asarray(plan.group_sizes))
    order = np.asarray(plan.order)
    np.testing.assert_array_equal(idx.ravel()[order], sorted_experts)
    np.testing.assert_array_equal(np.asarray(rows), x[order // 3])
    # Apply each expert's map to its rows, combine, compare with a per-token loop.
    y_rows = np.einsum("ad,ade->ae", np.asarray(rows), maps[sorted_experts])
    out = md.dropless_combine(jnp.asarray(y_rows), plan, jnp.asarray(w))
    want = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(3):
            want[t] += w[t, s] * (x[t] @ maps[idx[t, s]])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-12)


def python_capacity(idx, capacity, e):
    """Slot-major, then token order: keep[t, s] and slot (expert * capacity + position)."""
    t_n, k = idx.shape
    fill = [0] * e
    keep = np.zeros((t_n, k), bool)
    slot = np.full((t_n, k), e * capacity)
    for s in range(k):
        for t in range(t_n):
            ex = idx[t, s]
            if fill[ex] < capacity:
                keep[t, s], slot[t, s] = True, ex * capacity + fill[ex]
                fill[ex] += 1
    return keep, slot


@pytest.mark.parametrize("capacity", [1, 2, 5, 40])
def test_capacity_slots_and_combine_match_python_loop(capacity):
    e = 5
    idx, w, x = routing(t=17, k=2, e=e, seed=capacity)
    maps = expert_maps(e)
    keep, slot = python_capacity(idx, capacity, e)
    buf, plan = md.capacity_dispatch(jnp.asarray(x), jnp.asarray(idx), e, capacity)
    np.testing.assert_array_equal(np.asarray(plan.keep), keep)
    np.testing.assert_array_equal(np.asarray(plan.slot), slot)
    assert buf.shape == (e, capacity, 4)
    y = np.einsum("ecd,edf->ecf", np.asarray(buf), maps)
    out = md.capacity_combine(jnp.asarray(y), plan, jnp.asarray(w))
    want = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(2):
            if keep[t, s]:
                want[t] += w[t, s] * (x[t] @ maps[idx[t, s]])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=1e-12)
    if capacity == 40:
        assert keep.all()


def test_capacity_gradient_is_zero_for_dropped_tokens():
    e = 3
    idx = np.array([[0], [0], [0], [1]], np.int32)  # capacity 2: token 2 is dropped
    x = np.random.default_rng(0).standard_normal((4, 2))
    w = np.ones((4, 1))

    def f(x):
        buf, plan = md.capacity_dispatch(x, jnp.asarray(idx), e, 2)
        return jnp.sum(md.capacity_combine(buf * 2.0, plan, jnp.asarray(w)))

    g = np.asarray(jax.grad(f)(x))
    np.testing.assert_allclose(g, [[2, 2], [2, 2], [0, 0], [2, 2]])


def test_dropless_gradients_equal_autodiff_of_plain_gathers():
    """The gather-only backward of dispatch and combine equals autodiff of the plain gathers
    (whose transposes are scatter-adds), for the input rows, expert outputs and weights."""
    idx, w, x = routing(t=13, k=3, e=4, seed=3)
    maps = jnp.asarray(expert_maps(4))
    idx, w, x = jnp.asarray(idx), jnp.asarray(w), jnp.asarray(x)

    def layer(x, w, gathers):
        rows, plan = md.dropless_dispatch(x, idx, 4)
        experts = jnp.repeat(jnp.arange(4), plan.group_sizes, total_repeat_length=rows.shape[0])
        if gathers == "plain":
            rows = x[plan.order // 3]
        y = jnp.einsum("ad,ade->ae", rows, maps[experts])
        if gathers == "plain":
            return jnp.sum(jnp.sin(md.weighted_sum(y[plan.inverse].reshape(-1, 3, 4), w)))
        return jnp.sum(jnp.sin(md.dropless_combine(y, plan, w)))

    got = jax.grad(layer, argnums=(0, 1))(x, w, "ours")
    want = jax.grad(layer, argnums=(0, 1))(x, w, "plain")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)

    def float_scatters(gathers):
        """Scatter equations on floating rows in the gradient's jaxpr (nested ones included)."""
        found, todo = [], [jax.make_jaxpr(jax.grad(layer), static_argnums=2)(x, w, gathers).jaxpr]
        while todo:
            for eqn in todo.pop().eqns:
                if "scatter" in eqn.primitive.name:
                    found += (
                        [eqn] if jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating) else []
                    )
                for v in eqn.params.values():
                    todo += (
                        [getattr(v, "jaxpr", v)]
                        if hasattr(v, "eqns") or hasattr(v, "jaxpr")
                        else []
                    )
        return found

    assert len(float_scatters("plain")) >= 2  # the transposed gathers
    assert float_scatters("ours") == []
