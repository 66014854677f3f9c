"""Context-parallel attention: each device's queries against the keys of the whole row equal the
dense one-device oracle (float64), forward and gradients, with documents crossing shard edges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.ops import attention as attn_ops
from hybridjax.sharding import batch_sharding, make_mesh


def inputs(b=2, l=64, hq=4, hk=2, d=8):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (b, l, h, d), jnp.float64) for kk, h in zip(ks, (hq, hk, hk)))
    # row 0: documents starting inside shards and exactly at the edge 32 of context=4 (16 each);
    # row 1: one id that comes back (a third document)
    seg = np.zeros((b, l), np.int32)
    seg[0, 10:32], seg[0, 32:50], seg[0, 50:] = 1, 2, 3
    seg[1, 20:40] = 1
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize(
    "sizes", [{"data": 2, "context": 4}, {"context": 2, "tensor": 2}, {"context": 8}]
)
@pytest.mark.parametrize("packed", [True, False])
def test_context_parallel_equals_dense(sizes, packed):
    q, k, v, seg = inputs()
    seg = seg if packed else None
    dy = jax.random.normal(jax.random.key(1), q.shape, jnp.float64)
    b, l = q.shape[:2]

    def oracle(q, k, v):
        return attn_ops.dense_attention(
            q, k, v, attn_ops.causal_mask(seg, b, l), scale=q.shape[-1] ** -0.5
        )

    def ours(q, k, v):
        return attn_ops.attention(q, k, v, segment_ids=seg, impl="blockwise")

    want_y, want_vjp = jax.vjp(oracle, q, k, v)
    want = (want_y, *want_vjp(dy))
    mesh = make_mesh(**{"data": 1, **sizes}, devices=jax.devices()[: np.prod(list(sizes.values()))])
    split = NamedSharding(mesh, P(batch_sharding(mesh).spec[0], "context"))
    with jax.set_mesh(mesh):
        assert attn_ops.splits_sequence(q.shape, k.shape[2])

        @jax.jit
        def f(q, k, v, dy):
            y, vjp = jax.vjp(ours, q, k, v)
            return (y, *vjp(dy))

        args = [jax.device_put(t, split) for t in (q, k, v, dy)]
        got = f(*args)
        body = next(
            e for e in jax.make_jaxpr(ours)(*args[:3]).eqns if e.primitive.name == "shard_map"
        ).params["jaxpr"]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-12)
    # per device: its stretch of queries, keys and values; the keys and values (and ids) of the
    # whole row gathered inside, so that their gradients leave by a reduce-scatter
    n = sizes["context"]
    assert [v.aval.shape[1] for v in body.invars[:3]] == [l // n] * 3
    gathered = [e.outvars[0].aval.shape for e in body.eqns if e.primitive.name == "all_gather"]
    assert [s[1] for s in gathered] == [l] * (3 if packed else 2)


def test_queries_at_an_offset_equal_the_rows_slice():
    q, k, v, seg = inputs()
    full = attn_ops.blockwise_attention(q, k, v, seg, block_q=8, block_k=8)
    part = attn_ops._blockwise(q[:, 20:36], k, v, seg, jnp.int32(20), block_q=8, block_k=8)
    np.testing.assert_allclose(part, full[:, 20:36], atol=1e-12)
