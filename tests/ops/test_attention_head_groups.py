"""attention(kv_heads_per_call=n): the kernel over groups of kv heads one after another gives the
same values and gradients, and a kernel's buffers that grow with its heads hold one group's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.config import HybridConfig
from hybridjax.ops.attention import attention, by_head_groups, causal_mask, dense_attention


def _qkv(length, hq=8, hk=4, d=8, dtype=jnp.float64):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, hq, d), dtype)
    k, v = (jax.random.normal(key, (2, length, hk, d), dtype) for key in keys[1:])
    return q, k, v


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("per_call", [1, 3])  # 3: the largest divisor of the 4 kv heads below, 2
def test_head_groups_keep_values_and_gradients(impl, per_call):
    q, k, v = _qkv(40)
    seg = jnp.asarray(np.repeat([[1] * 15 + [2] * 25], 2, axis=0))
    w = jax.random.normal(jax.random.key(1), q.shape, q.dtype)

    def loss(q, k, v, n):
        out = attention(q, k, v, segment_ids=seg, impl=impl, kv_heads_per_call=n)
        return jnp.sum(out * w), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    (want, want_out), (got, got_out) = (grad(q, k, v, n) for n in (0, per_call))
    np.testing.assert_allclose(got_out, want_out, rtol=1e-12, atol=1e-14)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@jax.custom_vjp
def _flash_like(q, k, v):
    """Dense attention that keeps only q, k, v and recomputes its (B, H, L, L) scores in the
    backward: a stand-in for a fused kernel whose backward workspace grows with its heads (cuDNN's
    packed backward: rows x documents x length x heads x head_dim in float32)."""
    mask = causal_mask(None, *q.shape[:2])
    return dense_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)


_flash_like.defvjp(
    lambda q, k, v: (_flash_like(q, k, v), (q, k, v)),
    lambda res, g: jax.vjp(_flash_like.fun, *res)[1](g),
)


def test_head_groups_hold_one_groups_buffers():
    """One kv head (two query heads) of eight per call: the backward holds one group's scores,
    so the forward and backward plan under a third of the temporaries."""
    q, k, v = _qkv(1024, hq=16, hk=8, d=16, dtype=jnp.float32)
    kernel = lambda q, k, v, segment_ids: _flash_like(q, k, v)

    def temp(n):
        run = lambda q, k, v: by_head_groups(kernel, q, k, v, None, kv_heads_per_call=n)
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)), argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    whole, grouped = temp(8), temp(1)
    assert grouped < whole / 3, (whole, grouped)


def test_config_refuses_a_negative_head_count():
    with pytest.raises(ValueError, match="attn_kv_heads_per_call"):
        HybridConfig(attn_kv_heads_per_call=-1)
