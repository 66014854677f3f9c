"""Blockwise (flash) attention in XLA: equal to the dense masked attention in float64 (values and
gradients; packed documents with ids reused later in the row, GQA, lengths that are not a
multiple of the block, several block sizes), the blocks it skips, O(L) compiled memory, the
dispatch of `hybridjax.ops.attention.attention`, and per shard of a mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops import attention as attn_ops
from hybridjax.ops.attention import attention, blockwise_attention, causal_mask, dense_attention
from hybridjax.sharding import make_mesh


def qkv(b, l, hq, hk, d, dtype=jnp.float64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = 2 * jax.random.normal(ks[0], (b, l, hq, d), dtype)  # scores far from uniform
    k = 2 * jax.random.normal(ks[1], (b, l, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, l, hk, d), dtype)
    return q, k, v, jax.random.normal(ks[3], (b, l, hq, d), dtype)


def docs(*rows):
    """segment_ids from (id, length) runs per row."""
    return jnp.array([np.repeat(*zip(*row)) for row in rows], jnp.int32)


def dense(q, k, v, segment_ids):
    b, l, _, d = q.shape
    return dense_attention(q, k, v, causal_mask(segment_ids, b, l), scale=d**-0.5)


def value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)


L = 37
PACKED = docs(
    [(0, 5), (1, 10), (0, 7), (2, 15)],  # id 0 comes back after another document
    [(3, 1), (4, 1), (5, 20), (6, 15)],
)  # one-token documents at the start
ONE_DOC = docs([(7, L)], [(0, L)])


@pytest.mark.parametrize(
    "mask,hq,hk,block_q,block_k",
    [
        ("none", 6, 2, 8, 8),
        ("none", 4, 4, 7, 13),
        ("packed", 6, 2, 8, 8),
        ("packed", 6, 2, 16, 5),
        ("packed", 4, 4, 7, 13),
        ("packed", 3, 1, 64, 64),  # one block
        ("one", 3, 1, 16, 5),
        ("one", 6, 2, 13, 7),
    ],
)
def test_equals_dense_in_float64(mask, hq, hk, block_q, block_k):
    segment_ids = {"none": None, "packed": PACKED, "one": ONE_DOC}[mask]
    q, k, v, ct = qkv(2, L, hq, hk, 8)
    fn = functools.partial(
        blockwise_attention, segment_ids=segment_ids, block_q=block_q, block_k=block_k
    )
    out, grads = value_and_grads(jax.jit(fn), q, k, v, ct)
    want, want_grads = value_and_grads(
        functools.partial(dense, segment_ids=segment_ids), q, k, v, ct
    )
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    for name, got, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("l", [1, 3, 64, 100])
def test_lengths(l):
    q, k, v, ct = qkv(1, l, 2, 1, 4, seed=l)
    seg = (jnp.arange(l) // 10)[None]
    fn = functools.partial(blockwise_attention, segment_ids=seg, block_q=16, block_k=32)
    out, grads = value_and_grads(fn, q, k, v, ct)
    want, want_grads = value_and_grads(functools.partial(dense, segment_ids=seg), q, k, v, ct)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_low_precision_inputs(dtype, tol):
    q, k, v, ct = qkv(2, L, 6, 2, 16)
    fn = functools.partial(blockwise_attention, segment_ids=PACKED, block_q=8, block_k=16)
    out, grads = value_and_grads(fn, *(t.astype(dtype) for t in (q, k, v, ct)))
    want, want_grads = value_and_grads(functools.partial(dense, segment_ids=PACKED), q, k, v, ct)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float64) - b) / jnp.linalg.norm(b))
    assert rel(out, want) < tol
    for got, ref in zip(grads, want_grads):
        assert rel(got, ref) < 3 * tol


def test_block_ranges_skip_other_documents():
    def ranges(seg, l, bq, bk):
        blocks = attn_ops._Blocks(l, l, *attn_ops._split(l, bq), *attn_ops._split(l, bk))
        return [np.asarray(r).tolist() for r in attn_ops._block_ranges(seg, blocks, 0)]

    # causal: query block i reads key blocks [0, i]; key block j is read by query blocks [j, n)
    assert ranges(None, 32, 8, 8) == [[0, 0, 0, 0], [1, 2, 3, 4], [0, 1, 2, 3], [4, 4, 4, 4]]
    # two documents of 16: each block reads only its own document's blocks
    seg = docs([(0, 16), (1, 16)], [(5, 16), (6, 16)])
    assert ranges(seg, 32, 8, 8) == [[0, 0, 2, 2], [1, 2, 3, 4], [0, 1, 2, 3], [2, 2, 4, 4]]
    # bounds hold for every row: a row with one document reads the whole causal band
    seg = docs([(0, 16), (1, 16)], [(5, 32)])
    assert ranges(seg, 32, 8, 8)[0] == [0, 0, 0, 0]
    # an id that comes back starts a third document: its blocks skip the first occurrence
    seg = docs([(0, 8), (1, 16), (0, 8)])
    assert ranges(seg, 32, 8, 8) == [[0, 1, 1, 3], [1, 2, 3, 4], [0, 1, 2, 3], [1, 3, 3, 4]]
    # length 30: query blocks of 10; key blocks of at most 7 -> 5 blocks of 6
    assert ranges(None, 30, 10, 7) == [[0, 0, 0], [2, 4, 5], [0, 0, 1, 1, 2], [3] * 5]


def test_default_block(monkeypatch):
    assert attn_ops.default_block(1, 16) == 128  # the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    # float32 scores (batch, heads, block, block) within 256 MiB, 128..2048
    assert [attn_ops.default_block(b, h) for b, h in ((1, 16), (4, 32), (64, 64))] == [
        2048,
        512,
        128,
    ]


def _temp_bytes(l, heads=2, kv_heads=1, d=16):
    """XLA's planned temporaries for the blockwise forward + backward at length l (packed)."""
    q = jax.ShapeDtypeStruct((1, l, heads, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, l, kv_heads, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, l), jnp.int32)

    def loss(q, k, v, seg):
        return blockwise_attention(q, k, v, seg).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_length():
    l = 16384
    t_half, t, t_double = (_temp_bytes(n) for n in (l // 2, l, 2 * l))
    scores = l * l * 4  # one head's (L, L) float32 scores: 1 GiB
    assert t < scores / 32, (t, scores)
    # linear: doubling the length adds twice what the previous doubling added
    assert 1.6 < (t_double - t) / (t - t_half) < 2.4, (t_half, t, t_double)


# --- attention(): dispatch -------------------------------------------------------------------
def test_auto_is_blockwise_on_cpu(monkeypatch):
    q, k, v, _ = qkv(1, 20, 2, 1, 8)
    calls = []
    real = attn_ops.blockwise_attention
    monkeypatch.setattr(
        attn_ops, "blockwise_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    out = attention(q, k, v, segment_ids=ONE_DOC[:1, :20])
    assert calls and out.shape == q.shape
    np.testing.assert_allclose(out, attention(q, k, v, impl="xla"), rtol=1e-12)


def test_dispatch_errors():
    q, k, v, _ = qkv(1, 20, 4, 2, 16)
    seg = jnp.zeros((1, 20), jnp.int32)
    with pytest.raises(ValueError, match="attn_impl: 'flash'.*'blockwise'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="pallas.*GPU.*blockwise"):
        attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), impl="pallas"
        )
    with pytest.raises(ValueError, match="float64.*blockwise"):
        attention(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="head_dim=8 .*16..128"):
        attention(*(t[..., :8].astype(jnp.float32) for t in (q, k, v)), impl="pallas")
    with pytest.raises(ValueError, match="cudnn' with packed documents: needs a GPU.*blockwise"):
        attention(q, k, v, segment_ids=seg, impl="cudnn")
    with pytest.raises(ValueError, match="kv heads must divide"):
        attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        attention(q, k, v, segment_ids=seg[:, :5])
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        attention(q, k, v, segment_ids=seg.astype(jnp.float32))
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        blockwise_attention(q, k, v, block_q=0)


# --- per shard -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes,hk",
    [
        ({"data": 2, "fsdp": 2, "tensor": 2}, 2),  # rows, heads
        ({"data": 2, "tensor": 4}, 2),
    ],
)  # kv heads repeated
def test_per_shard_equals_whole(sizes, hk):
    q, k, v, ct = qkv(4, L, 4, hk, 8)
    seg = jnp.concatenate([PACKED, ONE_DOC])

    def run(q, k, v):
        return attention(q, k, v, segment_ids=seg, impl="blockwise")

    want, want_grads = value_and_grads(jax.jit(run), q, k, v, ct)
    with jax.set_mesh(make_mesh(**sizes)):
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v))
        got, grads = value_and_grads(jax.jit(run), q, k, v, ct)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)
