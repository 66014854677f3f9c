"""causal_conv1d and causal_conv1d_update against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops.conv1d import causal_conv1d, causal_conv1d_update


def _r(shape, seed):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float64))


def _numpy_conv(x, kernel, bias, segment_ids=None, initial_state=None):
    b, l, c = x.shape
    k = kernel.shape[0]
    state = np.zeros((b, k - 1, c)) if initial_state is None else initial_state
    xp = np.concatenate([state, x], axis=1)
    seg = None
    if segment_ids is not None:  # run index: a document is a run of equal ids
        doc = np.cumsum(np.diff(segment_ids, axis=1, prepend=segment_ids[:, :1]) != 0, axis=1)
        seg = np.concatenate([np.zeros((b, k - 1), int), doc], 1)
    y = np.zeros((b, l, c))
    for bi in range(b):
        for t in range(l):
            for ch in range(c):
                acc = bias[ch]
                for i in range(k):
                    src = t + i  # index into xp of x[t - (K-1) + i]
                    if seg is not None and seg[bi, src] != seg[bi, t + k - 1]:
                        continue
                    acc += kernel[i, ch] * xp[bi, src, ch]
                y[bi, t, ch] = acc
    return y


@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_numpy(k):
    x, kern, bias = _r((2, 9, 5), 0), _r((k, 5), 1), _r((5,), 2)
    got = causal_conv1d(jnp.asarray(x), jnp.asarray(kern), jnp.asarray(bias))
    np.testing.assert_allclose(got, _numpy_conv(x, kern, bias), rtol=1e-13, atol=1e-14)


def test_segments_and_initial_state_match_numpy():
    x, kern, bias, state = _r((2, 10, 3), 0), _r((4, 3), 1), _r((3,), 2), _r((2, 3, 3), 3)
    seg = np.array([[0, 0, 1, 1, 1, 1, 1, 0, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4, 5]])
    got = causal_conv1d(
        jnp.asarray(x),
        jnp.asarray(kern),
        jnp.asarray(bias),
        segment_ids=jnp.asarray(seg),
        initial_state=jnp.asarray(state),
    )
    want = _numpy_conv(x, kern, bias, seg, state)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_segments_equal_separate_documents():
    x, kern, bias = _r((1, 11, 4), 0), _r((4, 4), 1), _r((4,), 2)
    seg = jnp.array([[0] * 5 + [1] * 6])
    got = causal_conv1d(jnp.asarray(x), jnp.asarray(kern), jnp.asarray(bias), segment_ids=seg)
    np.testing.assert_allclose(got[:, :5], causal_conv1d(x[:, :5], kern, bias), rtol=1e-14)
    np.testing.assert_allclose(got[:, 5:], causal_conv1d(x[:, 5:], kern, bias), rtol=1e-14)


@pytest.mark.parametrize("prompt", [1, 2, 6])
def test_final_state_then_update_equals_full(prompt):
    x, kern, bias = jnp.asarray(_r((2, 12, 6), 0)), jnp.asarray(_r((4, 6), 1)), _r((6,), 2)
    bias = jnp.asarray(bias)
    full = causal_conv1d(x, kern, bias)
    y, state = causal_conv1d(x[:, :prompt], kern, bias, return_final_state=True)
    assert state.shape == (2, 3, 6)
    outs = [y]
    for t in range(prompt, 12):
        yt, state = causal_conv1d_update(x[:, t], state, kern, bias)
        outs.append(yt[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-13, atol=1e-14)


def test_final_state_drops_earlier_documents():
    x, kern = jnp.asarray(_r((1, 6, 2), 0)), jnp.asarray(_r((4, 2), 1))
    seg = jnp.array([[0, 0, 0, 0, 1, 1]])
    _, state = causal_conv1d(x, kern, segment_ids=seg, return_final_state=True)
    np.testing.assert_array_equal(state[0, 0], 0.0)  # x[3] belongs to document 0
    np.testing.assert_allclose(state[0, 1:], x[0, 4:])


def test_bad_inputs():
    x = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="kernel"):
        causal_conv1d(x, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, jnp.zeros((4, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="segment_ids"):
        causal_conv1d(x, jnp.zeros((4, 3)), segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, jnp.zeros((4, 3)), initial_state=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="state"):
        causal_conv1d_update(jnp.zeros((2, 3)), jnp.zeros((2, 2, 3)), jnp.zeros((4, 3)))


def test_context_parallel_equals_one_device_with_neighbour_sends_only():
    """The sequence split over "context": each shard's halo comes from its neighbour (documents
    starting inside shards, at a shard edge and one id that comes back), values and gradients
    (initial and final state included) equal one device, and the compiled step moves only the
    halos and the small sums: no all-to-all or all-gather of the activation."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hybridjax.bench.mesh import collective_counts
    from hybridjax.sharding import make_mesh

    b, l, c = 2, 64, 6
    x, kern, bias, init = _r((b, l, c), 0), _r((4, c), 1), _r((c,), 2), _r((b, 3, c), 3)
    seg = np.zeros((b, l), np.int32)
    seg[0, 10:32], seg[0, 32:50], seg[0, 50:] = 1, 2, 1  # edge 32 (and 16, 48 at context 4)
    seg[1, 7:9] = 1  # a two-token document inside shard 0
    sizes = {"data": 2, "context": 4}

    def loss(x, kern, bias, init, seg):
        y, final = causal_conv1d(
            x, kern, bias, segment_ids=seg, initial_state=init, return_final_state=True
        )
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(final**2), (y, final)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    want = grad(x, kern, bias, init, seg)
    mesh = make_mesh(**{"data": 1, **sizes}, devices=jax.devices()[: np.prod(list(sizes.values()))])
    split = NamedSharding(mesh, P("data", "context"))
    with jax.set_mesh(mesh):
        args = (jax.device_put(x, split), kern, bias, init, jax.device_put(seg, split))
        got = jax.jit(grad)(*args)
        hlo = jax.jit(grad).lower(*args).compile().as_text()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-12)
    counts = collective_counts(hlo)
    assert counts["all-to-all"] == counts["all-gather"] == 0, counts
    assert counts["collective-permute"] > 0, counts


# --- activation and impl ----------------------------------------------------------------------
def _silu(v):
    return v / (1.0 + np.exp(-v))


def test_silu_matches_numpy():
    x, kern, bias, state = _r((2, 10, 3), 0), _r((4, 3), 1), _r((3,), 2), _r((2, 3, 3), 3)
    seg = np.array([[0, 0, 1, 1, 1, 1, 1, 0, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4, 5]])
    args = (jnp.asarray(x), jnp.asarray(kern), jnp.asarray(bias))
    kw = {"segment_ids": jnp.asarray(seg), "initial_state": jnp.asarray(state)}
    got = causal_conv1d(*args, **kw, activation="silu", impl="xla")
    want = _silu(_numpy_conv(x, kern, bias, seg, state))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    # without an activation the conv is returned bare, as before
    np.testing.assert_allclose(causal_conv1d(*args, **kw), _numpy_conv(x, kern, bias, seg, state))


def test_silu_rounds_once_in_bfloat16():
    """bfloat16 input: SiLU is applied to the float32 sum, then one rounding."""
    x = jnp.asarray(_r((2, 50, 8), 0), jnp.bfloat16)
    kern, bias = jnp.asarray(_r((4, 8), 1), jnp.float32), jnp.asarray(_r((8,), 2), jnp.float32)
    got = causal_conv1d(x, kern, bias, activation="silu")
    assert got.dtype == jnp.bfloat16
    want = _silu(_numpy_conv(np.asarray(x, np.float64), np.asarray(kern), np.asarray(bias)))
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 2.0**-8 * np.abs(want) + 1e-6), err.max()


def test_auto_is_xla_on_the_cpu():
    x, kern, bias = jnp.asarray(_r((1, 9, 4), 0)), jnp.asarray(_r((3, 4), 1)), _r((4,), 2)
    for act in (None, "silu"):
        auto = causal_conv1d(x, kern, jnp.asarray(bias), activation=act)
        xla = causal_conv1d(x, kern, jnp.asarray(bias), activation=act, impl="xla")
        np.testing.assert_array_equal(auto, xla)


def test_pallas_final_state_equals_xla():
    """impl='pallas' (the kernels in interpret mode) returns the XLA path's final window."""
    import functools

    from hybridjax.kernels.conv1d import causal_conv1d_silu_pallas
    from hybridjax.ops.conv1d import _conv_pallas

    x, kern, bias = jnp.asarray(_r((2, 7, 4), 0)), jnp.asarray(_r((4, 4), 1)), _r((4,), 2)
    x, kern, bias = x.astype(jnp.float32), kern.astype(jnp.float32), jnp.asarray(bias, "float32")
    seg = jnp.array([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    state = jnp.asarray(_r((2, 3, 4), 3), jnp.float32)
    fn = functools.partial(causal_conv1d_silu_pallas, interpret=True)
    for init in (None, state):
        y, final = _conv_pallas(fn, x, kern, bias, seg, init, True)
        want_y, want_final = causal_conv1d(
            x, kern, bias, segment_ids=seg, initial_state=init, return_final_state=True,
            activation="silu", impl="xla",
        )  # fmt: skip
        np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(final, want_final)


def test_bad_impl_and_activation():
    x, kern = jnp.zeros((2, 5, 3), jnp.float32), jnp.zeros((4, 3), jnp.float32)
    with pytest.raises(ValueError, match="unknown impl 'triton'; choose one of auto, xla, pallas"):
        causal_conv1d(x, kern, impl="triton")
    with pytest.raises(ValueError, match="unknown activation 'gelu'; choose None or 'silu'"):
        causal_conv1d(x, kern, activation="gelu")
    with pytest.raises(ValueError, match="impl='pallas'.*needs activation='silu'"):
        causal_conv1d(x, kern, impl="pallas")
    with pytest.raises(ValueError, match=r"needs a GPU backend.*interpret=True"):
        causal_conv1d(x, kern, activation="silu", impl="pallas")
    with pytest.raises(ValueError, match="float64"):
        causal_conv1d(x.astype(jnp.float64), kern, activation="silu", impl="pallas")


def test_silu_over_context_equals_one_device():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hybridjax.sharding import make_mesh

    b, l, c = 2, 32, 4
    x, kern, bias, init = _r((b, l, c), 0), _r((4, c), 1), _r((c,), 2), _r((b, 3, c), 3)
    seg = np.zeros((b, l), np.int32)
    seg[0, 9:] = 1
    f = lambda x, seg: causal_conv1d(
        x, kern, bias, segment_ids=seg, initial_state=init, activation="silu"
    )
    want = f(x, seg)
    mesh = make_mesh(data=2, context=4, devices=jax.devices()[:8])
    split = NamedSharding(mesh, P("data", "context"))
    with jax.set_mesh(mesh):
        got = jax.jit(f)(jax.device_put(x, split), jax.device_put(seg, split))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-13)
