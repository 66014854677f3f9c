"""One meaning of a document (hybridjax.ops.segments): a run of equal segment ids. Every layer
gives a row whose ids come back later (1 1 2 2 1 1) what it gives the same row with a fresh id
per run (1 1 2 2 3 3): attention, the SSD scan, the conv and the whole model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridjax.model import HybridLM
from hybridjax.ops.attention import attention, blockwise_attention, dense_attention
from hybridjax.ops.conv1d import causal_conv1d
from hybridjax.ops.segments import document_index, document_positions, document_starts
from hybridjax.ops.ssd import ssd
from tests.tiny import tiny, tokens

# Runs of (id, length); the second row reuses ids 1 and 2 and ends in padding (id 0).
REUSED = [[(1, 3), (2, 4), (1, 5), (2, 2), (1, 6)], [(2, 5), (1, 1), (2, 6), (1, 5), (0, 3)]]
L = 20


def ids(rows, fresh: bool):
    """(B, L) segment ids from runs; fresh=True numbers the runs 1, 2, ... (padding stays 0)."""
    out = []
    for row in rows:
        out.append(
            np.concatenate(
                [np.full(n, (i + 1 if fresh and v else v)) for i, (v, n) in enumerate(row)]
            )
        )
    return jnp.asarray(np.stack(out), jnp.int32)


SEG, FRESH = ids(REUSED, False), ids(REUSED, True)


def test_definitions_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 3]])
    np.testing.assert_array_equal(
        document_starts(seg), [[0, 0, 1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]
    )
    np.testing.assert_array_equal(
        document_index(seg), [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1]]
    )
    np.testing.assert_array_equal(
        document_positions(seg, 2, 8), [[0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]
    )
    np.testing.assert_array_equal(document_positions(None, 1, 3), [[0, 1, 2]])
    # `previous`: the id before the row (a context shard's neighbour) decides position 0
    previous = jnp.array([1, 5])
    np.testing.assert_array_equal(document_starts(seg, previous)[:, 0], [False, True])
    np.testing.assert_array_equal(document_index(seg, previous)[1], [1] * 7 + [2])
    assert document_index(seg).dtype == jnp.int32


def test_fixture_reuses_ids():
    assert SEG.shape == FRESH.shape == (2, L)
    np.testing.assert_array_equal(document_index(SEG), document_index(FRESH))
    assert len(np.unique(np.asarray(SEG))) < len(np.unique(np.asarray(FRESH)))


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_attention_reused_ids_equal_fresh_ids(impl):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, L, 4, 8), jnp.float64)
    k, v = (jax.random.normal(key, (2, L, 2, 8), jnp.float64) for key in ks[1:])
    # blockwise in small blocks, so that the block ranges span several documents
    fn = (
        functools.partial(attention, impl="xla")
        if impl == "xla"
        else functools.partial(blockwise_attention, block_q=4, block_k=3)
    )

    def loss(seg, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, segment_ids=seg)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)))
    (got, got_g), (want, want_g) = grad(SEG, q, k, v), grad(FRESH, q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    # an id-equality mask would differ: the third run would read the first
    by_id = jnp.tri(L, dtype=bool) & (SEG[:, :, None] == SEG[:, None, :])
    assert not np.allclose(
        fn(q, k, v, segment_ids=SEG), dense_attention(q, k, v, by_id, scale=8**-0.5)
    )


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_ssd_reused_ids_equal_fresh_ids(impl):
    rng = np.random.default_rng(0)
    b, h, p, g, n = 2, 4, 4, 2, 4
    x = rng.standard_normal((b, L, h, p))
    dt = rng.uniform(0.1, 0.6, (b, L, h))
    A = -rng.uniform(0.5, 1.5, h)
    B, C = rng.standard_normal((2, b, L, g, n))
    init = rng.standard_normal((b, h, p, n))
    run = functools.partial(
        ssd,
        x,
        dt,
        A,
        B,
        C,
        D=np.ones(h),
        initial_state=init,
        chunk_size=6,
        return_final_state=True,
        impl=impl,
    )
    for got, want in zip(run(segment_ids=SEG), run(segment_ids=FRESH)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_conv_reused_ids_equal_fresh_ids():
    rng = np.random.default_rng(1)
    x, kernel, bias = rng.standard_normal((2, L, 3)), rng.standard_normal((4, 3)), np.ones(3)
    state = rng.standard_normal((2, 3, 3))
    run = functools.partial(
        causal_conv1d,
        jnp.asarray(x),
        jnp.asarray(kernel),
        jnp.asarray(bias),
        initial_state=jnp.asarray(state),
        return_final_state=True,
    )
    for got, want in zip(run(segment_ids=SEG), run(segment_ids=FRESH)):
        np.testing.assert_allclose(got, want, rtol=1e-14)


def test_model_reused_ids_equal_fresh_ids():
    model = HybridLM(tiny(pattern="M*", rope_theta=10000.0), rngs=nnx.Rngs(0))
    x = tokens(0, 2, L)
    logits = nnx.jit(lambda m, seg: m(x, seg))
    np.testing.assert_allclose(logits(model, SEG), logits(model, FRESH), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [{"context": 8}, {"data": 2, "context": 4}])
def test_context_split_sequence_carries_across_shards(sizes):
    """With the sequence split over "context" the index and positions are formed per shard and
    carried across: equal to one device (documents over shard edges, ids that come back, a
    `previous`), and no reduce-window in the compiled program spans more than a shard. XLA's
    own partitioning of a cumsum / cummax over the split axis was a reduce-window as wide as the
    row over a gathered copy: O(L^2 / shards) work per device."""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hybridjax.sharding import make_mesh

    seg = jnp.asarray(np.tile(np.concatenate([ids(REUSED, False)] * 4, axis=1), (2, 1)))[:, :64]
    seg = seg.at[:, 32].set(7)  # a one-token document at a shard edge
    previous = jnp.asarray([seg[0, 0], 9, seg[2, 0], 9])
    b, l = seg.shape

    def f(seg, previous):
        return (
            document_index(seg),
            document_index(seg, previous),
            document_positions(seg, b, l),
        )

    want = f(seg, previous)
    n = int(np.prod(list(sizes.values())))
    mesh = make_mesh(**{"data": 1, **sizes}, devices=jax.devices()[:n])
    with jax.set_mesh(mesh):
        args = (jax.device_put(seg, NamedSharding(mesh, P("data", "context"))), previous)
        got = jax.jit(f)(*args)
        hlo = jax.jit(f).lower(*args).compile().as_text()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    shard = l // sizes["context"]
    # a cumsum's reduce-window (no stride): its widest dimension
    windows = [
        max(int(d) for d in w.split("x"))
        for w in re.findall(r"reduce-window\(.*window=\{size=([\dx]+)(?: pad=\S*)?\}", hlo)
    ]
    assert max(windows, default=0) <= shard, windows
