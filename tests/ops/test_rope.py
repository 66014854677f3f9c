"""RoPE against direct numpy formulas; the scalings against their formulas and transformers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.ops.rope import apply_rope, rope_frequencies


def _numpy_rope(x, positions, inv_freq, scale=1.0):
    """Rotate pairs (i, i + d/2) by angle position * inv_freq[i] (transformers' rotate_half)."""
    out = np.empty_like(x)
    d = x.shape[-1]
    for b, l, h in np.ndindex(x.shape[:3]):
        for i in range(d // 2):
            a = positions[b, l] * inv_freq[i]
            x1, x2 = x[b, l, h, i], x[b, l, h, i + d // 2]
            out[b, l, h, i] = (x1 * math.cos(a) - x2 * math.sin(a)) * scale
            out[b, l, h, i + d // 2] = (x2 * math.cos(a) + x1 * math.sin(a)) * scale
    return out


def _x(shape=(2, 5, 3, 8), seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float64))


def _positions():
    return np.array([[0, 1, 2, 3, 4], [7, 100, 3, 5000, 0]])


def test_plain_rope_matches_numpy():
    x, pos = _x(), _positions()
    inv_freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=10000.0)
    np.testing.assert_allclose(got, _numpy_rope(x, pos, inv_freq), rtol=1e-12, atol=1e-12)


def test_linear_is_position_interpolation():
    x, pos = _x(), _positions()
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=500.0, scaling="linear", factor=4.0)
    want = apply_rope(jnp.asarray(x), jnp.asarray(pos / 4.0), theta=500.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ntk_base_formula():
    d, theta, factor = 8, 500.0, 4.0
    inv_freq, scale = rope_frequencies(d, theta, scaling="ntk", factor=factor)
    base = theta * factor ** (d / (d - 2))
    np.testing.assert_allclose(inv_freq, base ** (-np.arange(0, d, 2) / d), rtol=1e-14)
    assert scale == 1.0
    x, pos = _x(), _positions()
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=theta, scaling="ntk", factor=factor)
    np.testing.assert_allclose(got, _numpy_rope(x, pos, inv_freq), rtol=1e-12, atol=1e-12)


def _yarn_formula(d, theta, factor, original):
    def corr(rot):
        return d * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    inv_freq = []
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low if high != low else 0.001), 0.0), 1.0)
        f = theta ** (-2 * i / d)
        inv_freq.append(f * (1 - ramp) + f / factor * ramp)  # low dims keep f, high dims f/s
    return np.array(inv_freq), 0.1 * math.log(factor) + 1


def test_yarn_formula_and_attention_scale():
    d, theta, factor, original = 16, 500.0, 4.0, 16
    want_freq, want_scale = _yarn_formula(d, theta, factor, original)
    inv_freq, scale = rope_frequencies(
        d, theta, scaling="yarn", factor=factor, original_max_len=original
    )
    np.testing.assert_allclose(inv_freq, want_freq, rtol=1e-14)
    assert scale == pytest.approx(want_scale)
    x, pos = _x((2, 5, 3, d)), _positions()
    got = apply_rope(
        jnp.asarray(x),
        jnp.asarray(pos),
        theta=theta,
        scaling="yarn",
        factor=factor,
        original_max_len=original,
    )
    np.testing.assert_allclose(got, _numpy_rope(x, pos, inv_freq, scale), rtol=1e-12, atol=1e-12)


def test_scalings_match_transformers():
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta, factor, original = 16, 500.0, 4.0, 64
    base = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": d}
    yarn = LlamaConfig(
        **base,
        max_position_embeddings=original * 4,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": original,
        },
    )
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](yarn, "cpu")
    got, scale = rope_frequencies(
        d, theta, scaling="yarn", factor=factor, original_max_len=original
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert scale == pytest.approx(want_scale)
    linear = LlamaConfig(
        **base, rope_parameters={"rope_type": "linear", "rope_theta": theta, "factor": factor}
    )
    want, _ = ROPE_INIT_FUNCTIONS["linear"](linear, "cpu")
    np.testing.assert_allclose(
        rope_frequencies(d, theta, scaling="linear", factor=factor)[0], want.numpy(), rtol=1e-6
    )
    # "ntk" is transformers' dynamic-NTK base formula frozen at scale `factor`, which dynamic
    # reaches at seq_len = original * (2 - 1/factor)
    dynamic = LlamaConfig(
        **base,
        max_position_embeddings=original,
        rope_parameters={"rope_type": "dynamic", "rope_theta": theta, "factor": factor},
    )
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](dynamic, "cpu", seq_len=original * (2 - 1 / factor))
    np.testing.assert_allclose(
        rope_frequencies(d, theta, scaling="ntk", factor=factor)[0], want.numpy(), rtol=1e-6
    )


def test_dot_products_depend_on_relative_position():
    q, k = _x((1, 1, 1, 8), 1), _x((1, 1, 1, 8), 2)

    def score(pq, pk):
        rq = apply_rope(jnp.asarray(q), jnp.array([[pq]]), theta=100.0)
        rk = apply_rope(jnp.asarray(k), jnp.array([[pk]]), theta=100.0)
        return float(jnp.sum(rq * rk))

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-10)


def test_dtype_preserved():
    x = jnp.asarray(_x(), jnp.bfloat16)
    assert apply_rope(x, jnp.asarray(_positions()), theta=1e4).dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="rope_scaling"):
        rope_frequencies(8, 1e4, scaling="dynamic")
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(7, 1e4)
    with pytest.raises(ValueError, match="rope_theta"):
        rope_frequencies(8, 0.0)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 3), jnp.int32), theta=1e4)
