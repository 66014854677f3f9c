"""rmsnorm and gated_rmsnorm against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops.norms import gated_rmsnorm, rmsnorm


def _r(shape, seed):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float64))


def test_rmsnorm_numpy_loop():
    x, w = _r((3, 5, 16), 0), _r((16,), 1)
    want = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        v = x[idx]
        want[idx] = w * v / np.sqrt(np.mean(v * v) + 1e-5)
    np.testing.assert_allclose(rmsnorm(jnp.asarray(x), jnp.asarray(w), eps=1e-5), want, rtol=1e-13)


@pytest.mark.parametrize("group_size", [24, 8, 3])
def test_gated_rmsnorm_numpy_loop(group_size):
    x, z, w = _r((2, 7, 24), 0), _r((2, 7, 24), 1), _r((24,), 2)
    want = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        g = x[idx] * z[idx] / (1 + np.exp(-z[idx]))  # gate before normalising
        for s in range(0, 24, group_size):
            part = g[s : s + group_size]
            want[idx][s : s + group_size] = part / np.sqrt(np.mean(part * part) + 1e-6)
        want[idx] *= w
    got = gated_rmsnorm(
        jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), group_size=group_size, eps=1e-6
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gated_rmsnorm_without_gate_is_grouped_rmsnorm():
    x, w = jnp.asarray(_r((4, 12), 0)), jnp.asarray(_r((12,), 1))
    np.testing.assert_allclose(gated_rmsnorm(x, None, w, group_size=12), rmsnorm(x, w), rtol=1e-14)


def test_low_precision_input_computes_in_float32():
    x = jnp.asarray(_r((4, 64), 0) * 100, jnp.bfloat16)
    w = jnp.ones((64,), jnp.float32)
    y = rmsnorm(x, w)
    assert y.dtype == jnp.bfloat16
    ref = rmsnorm(x.astype(jnp.float32), w)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2)
    assert gated_rmsnorm(x, x, w, group_size=16).dtype == jnp.bfloat16


def test_bad_inputs():
    x = jnp.zeros((2, 12))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, jnp.ones(5))
    with pytest.raises(ValueError, match="group_size"):
        gated_rmsnorm(x, x, jnp.ones(12), group_size=5)
    with pytest.raises(ValueError, match="gate"):
        gated_rmsnorm(x, jnp.zeros((2, 3)), jnp.ones(12), group_size=4)
