"""The packed cuDNN attention path: document spans on any backend, the kernel on a GPU (the tests
default to the CPU: `JAX_PLATFORMS=cuda python -m pytest tests/ops/test_attention_cudnn.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops.attention import causal_mask, dense_attention
from hybridjax.ops.attention_cudnn import cudnn_packed_attention, document_spans, unsupported_reason


def spans_by_loop(ids, m):
    offsets, lengths = [], []
    for row in ids:
        first = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
        ends = first[1:] + [len(row)]
        offsets.append((first + [-1] * (m + 1))[:m] + [-1])
        lengths.append(([e - s for s, e in zip(first, ends)] + [-1] * m)[:m])
    return np.array(offsets), np.array(lengths)


@pytest.mark.parametrize("m", [3, 8])
def test_document_spans_match_a_loop_over_runs(m):
    ids = np.array(
        [
            [1, 1, 2, 2, 2, 1, 1, 0, 0, 0],  # a reused id is a new document
            [5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
        ]
    )
    offsets, lengths, fits = document_spans(jnp.asarray(ids), m)
    want_offsets, want_lengths = spans_by_loop(ids, m)
    np.testing.assert_array_equal(offsets, want_offsets)
    np.testing.assert_array_equal(lengths, want_lengths)
    assert bool(fits) == (m >= 4)


@pytest.mark.skipif(unsupported_reason() is not None, reason=str(unsupported_reason()))
@pytest.mark.parametrize("max_documents", [16, 2])  # the kernel; the fallback for 2
def test_packed_cudnn_matches_dense_attention(max_documents):
    b, l, hq, hk, d = 2, 1024, 8, 2, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (b, l, h, d), jnp.bfloat16) for kk, h in zip(ks, (hq, hk, hk)))
    ids = jnp.cumsum(jax.random.bernoulli(ks[3], 0.004, (b, l)), axis=1).astype(jnp.int32)
    scale = d**-0.5

    def ours(q, k, v):
        fallback = lambda q, k, v, s: dense_attention(q, k, v, causal_mask(s, b, l), scale=scale)
        return cudnn_packed_attention(
            q, k, v, ids, scale=scale, max_documents=max_documents, fallback=fallback
        )

    def oracle(q, k, v):
        f32 = [t.astype(jnp.float32) for t in (q, k, v)]
        return dense_attention(*f32, causal_mask(ids, b, l), scale=scale)

    dy = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    y, vjp = jax.vjp(ours, q, k, v)
    want_y, want_vjp = jax.vjp(oracle, q, k, v)
    for got, want in zip((y, *vjp(dy.astype(y.dtype))), (want_y, *want_vjp(dy))):
        want = np.asarray(want, np.float32)  # bf16 inputs: 2% of the largest entry
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, atol=2e-2 * np.abs(want).max()
        )


def test_the_layer_passes_its_document_limit(monkeypatch):
    from flax import nnx

    from hybridjax.config import HybridConfig
    from hybridjax.layers import attention as layer

    seen = {}
    monkeypatch.setattr(layer, "attention", lambda *a, **kw: seen.update(kw) or a[0])
    config = HybridConfig(d_model=32, attn_heads=2, kv_heads=1, head_dim=16, attn_max_documents=3)
    attn = layer.Attention(config, rngs=nnx.Rngs(0))
    attn(jnp.zeros((1, 4, 32)), segment_ids=jnp.zeros((1, 4), jnp.int32))
    assert seen["max_documents"] == 3
    with pytest.raises(ValueError, match="attn_max_documents: must be > 0"):
        HybridConfig(attn_max_documents=0)
