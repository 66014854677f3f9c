"""HybridLM: the scanned stack against an unscanned one, packing, aux outputs, sizes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridjax.model import (HybridLM, flat_params, load_flat_params, make_pattern,
                             param_counts, pattern_period, segment_positions)
from tests.tiny import tiny, tokens

def test_pattern_period():
    assert pattern_period("M-M*M-M*") == "M-M*"
    assert pattern_period("MMMM") == "M"
    assert pattern_period("M*E") == "M*E"


def test_make_pattern():
    assert make_pattern(8, attn_every=4) == "MMM*MMM*"
    assert make_pattern(4, attn_every=2, ffn="E") == "ME*EME*E"
    assert make_pattern(8, attn_fraction=0.0) == "M" * 8
    assert make_pattern(8, attn_fraction=1.0) == "*" * 8
    assert make_pattern(8, attn_fraction=0.25).count("*") == 2
    assert make_pattern(8, attn_fraction=0.125, ffn="-") == "M-M-M-M-*-M-M-M-"
    with pytest.raises(ValueError, match="attn_fraction"):
        make_pattern(8, attn_fraction=1.5)
    with pytest.raises(ValueError, match="ffn"):
        make_pattern(8, attn_every=2, ffn="X")


@pytest.mark.parametrize("pattern", ["M*E-M*E-", "ME*-"])
def test_scanned_stack_equals_unscanned(pattern):
    """The scanned periods compute what a plain loop over the same layers computes."""
    scanned = HybridLM(tiny(pattern=pattern), rngs=nnx.Rngs(0))
    looped = HybridLM(tiny(pattern=pattern, scan_layers=False), rngs=nnx.Rngs(1))
    load_flat_params(looped, flat_params(scanned))
    x = tokens(0, 2, 21)
    a, aux_a = scanned(x, return_aux=True)
    b, aux_b = looped(x, return_aux=True)
    assert a.shape == (2, 21, 64) and a.dtype == jnp.float64
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux_a.expert_load, aux_b.expert_load, rtol=1e-12)
    assert aux_a.expert_load.shape == (pattern.count("E"), 4)
    np.testing.assert_allclose(aux_a.expert_load.sum(-1), 1.0, rtol=1e-12)


def test_flat_params_round_trip_and_errors():
    model = HybridLM(tiny(pattern="M*E-M*E-"), rngs=nnx.Rngs(0))
    flat = flat_params(model)
    assert "layers.7.mixer.down_proj.kernel" in flat and "layers.0.mixer.A_log" in flat
    other = HybridLM(tiny(pattern="M*E-M*E-"), rngs=nnx.Rngs(5))
    load_flat_params(other, flat)
    for k, v in flat_params(other).items():
        np.testing.assert_array_equal(v, flat[k])
    bad = dict(flat)
    bad["layers.0.mixer.A_log"] = np.zeros(3)
    with pytest.raises(ValueError, match="layers.0.mixer.A_log"):
        load_flat_params(other, bad)
    del bad["layers.0.mixer.A_log"]
    with pytest.raises(ValueError, match="missing"):
        load_flat_params(other, bad)


def test_segment_positions():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(segment_positions(seg.shape, seg), [[0, 1, 2, 0, 1, 0, 1, 2]])


def test_packed_documents_equal_separate_runs():
    """Two documents packed in one row give the logits each gives alone (SSM, conv, attention)."""
    model = HybridLM(tiny(pattern="M*M-", rope_theta=10000.0), rngs=nnx.Rngs(0))
    doc_a, doc_b = tokens(1, 1, 13), tokens(2, 1, 11)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.concatenate([jnp.zeros((1, 13), jnp.int32), jnp.ones((1, 11), jnp.int32)], axis=1)
    out = model(packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :13], model(doc_a), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out[:, 13:], model(doc_b), rtol=1e-6, atol=1e-8)


def test_remat_keeps_gradients():
    cfg = tiny(pattern="M*E-M*E-")
    plain = HybridLM(cfg, rngs=nnx.Rngs(0))
    remat = HybridLM(cfg.replace(remat="full"), rngs=nnx.Rngs(0))
    x = tokens(3, 2, 9)

    def loss(model):
        return jnp.mean(model(x) ** 2)

    ga, gb = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_router_bias_update_favours_underloaded_experts():
    model = HybridLM(tiny(pattern="ME"), rngs=nnx.Rngs(0))
    load = jnp.array([[0.7, 0.1, 0.1, 0.1]])
    model.update_router_bias(load, rate=0.01)
    bias = flat_params(model)["layers.1.mixer.gate.e_score_correction_bias"]
    assert bias[0] < 0 and np.all(bias[1:] > 0)


def test_param_counts_match_hand_count():
    cfg = tiny(pattern="E", shared_ffn=0, tie_embeddings=True)
    total, active = param_counts(cfg)
    d, e, f, v = 32, 4, 16, 64
    experts = e * (d * f + f * d)
    by_hand = v * d + d + e * d + experts + d  # embed, block norm, router, experts, norm_f
    assert total == by_hand
    assert active == total - experts + experts * 2 // 4


@pytest.mark.parametrize("bad, field", [
    (dict(pattern="MX"), "pattern"), (dict(n_groups=3), "n_groups"),
    (dict(kv_heads=3), "kv_heads"), (dict(pattern="E", top_k=9), "top_k"),
    (dict(dtype="int8"), "dtype"), (dict(rope_scaling="linear"), "rope_scaling"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny(**bad)
