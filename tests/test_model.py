"""HybridLM: the scanned stack against an unscanned one, packing, aux outputs, sizes, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybridjax.model
from hybridjax.model import (
    HybridLM,
    flat_params,
    load_flat_params,
    make_pattern,
    param_counts,
    pattern_period,
)
from hybridjax.ops.remat_names import KERNEL_OUTPUT
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


def test_packed_documents_equal_separate_runs():
    """Two documents packed in one row give the logits each gives alone (SSM, conv, attention)."""
    model = HybridLM(tiny(pattern="M*M-", rope_theta=10000.0), rngs=nnx.Rngs(0))
    doc_a, doc_b = tokens(1, 1, 13), tokens(2, 1, 11)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.concatenate([jnp.zeros((1, 13), jnp.int32), jnp.ones((1, 11), jnp.int32)], axis=1)
    out = model(packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :13], model(doc_a), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out[:, 13:], model(doc_b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "block", "offload", "nested"])
def test_remat_keeps_values_and_gradients(remat):
    cfg = tiny(pattern="M*E-M*E-")
    plain = HybridLM(cfg, rngs=nnx.Rngs(0))
    rematted = HybridLM(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    x = tokens(3, 2, 9)

    def loss(model):
        logits, aux = model(x, return_aux=True)
        return jnp.mean(logits**2) + aux.lb_loss, logits

    (ga, a), (gb, b) = (nnx.grad(loss, has_aux=True)(m) for m in (plain, rematted))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _grad_jaxpr(model, x):
    graphdef, state = nnx.split(model)
    return str(
        jax.make_jaxpr(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).hidden(x)[0])))(state)
    )


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_matmul_saving_remat_keeps_the_expert_matmuls(remat):
    """The policies that save matmul outputs save the MoE experts' grouped matmuls too: the
    backward runs none of them again (with remat="full" it reruns each one of the forward)."""
    x = tokens(7, 2, 9)
    count = lambda text: text.count("ragged_dot_general[")
    model = lambda r: HybridLM(tiny(pattern="E-E-", remat=r), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model("full"))
    forward = count(str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).hidden(x))(state)))
    assert forward == 2  # the up and down projections, in the scanned period's body
    assert count(_grad_jaxpr(model("full"), x)) - count(_grad_jaxpr(model(remat), x)) == forward


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_matmul_saving_remat_keeps_the_expert_dispatch(remat):
    """They keep the routing and dispatch as well (the chosen experts, the sort by expert and the
    sorted rows): the backward routes and sorts no token again; remat="full" does it once more."""
    x = tokens(7, 2, 9)
    config = tiny(pattern="E-E-")
    model = lambda r: HybridLM(config.replace(remat=r), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model("full"))
    forward = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).hidden(x))(state))
    grads = {r: _grad_jaxpr(model(r), x) for r in ("full", remat)}
    for op in ("top_k[", "sort["):
        count = lambda text, op=op: text.count(op)
        assert count(forward) >= 1
        assert count(grads[remat]) == count(forward)
        assert count(grads["full"]) == 2 * count(forward)
    # Gathers of (tokens x top-k, d_model) rows: "full" forms the sorted rows again, the others
    # keep them (the combine's gather of the expert outputs runs again under every policy).
    rows = re.compile(rf"\[{x.size * config.top_k},{config.d_model}\] = gather\[")
    assert len(rows.findall(grads["full"])) - len(rows.findall(grads[remat])) == 1


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_matmul_saving_remat_keeps_the_tagged_kernel_outputs(remat):
    """The same policies keep the tagged kernel outputs (the Mamba-2 mixer's two convs, scan and
    gated norm; the MLP's activation; each block's RMSNorm): with remat="full" the backward forms
    each a second time, with them only the forward does."""
    x = tokens(8, 2, 9)
    count = lambda r: _grad_jaxpr(
        HybridLM(tiny(pattern="M-M-", remat=r), rngs=nnx.Rngs(0)), x
    ).count(f"name={KERNEL_OUTPUT}")
    # one Mamba-2 and one MLP block in the scanned period's body (4 + 1, and a norm each), and
    # the final norm outside the layers
    assert count("none") == 8
    assert count("full") == 15
    assert count(remat) == 8


def test_offload_keeps_block_inputs_on_the_host():
    """remat="offload" saves one (B, L, d) input per block, stacked over the repeats, in host
    memory; remat="block" keeps them on the device."""
    x = tokens(4, 2, 9)
    models = {
        r: HybridLM(tiny(pattern="M*M*", remat=r), rngs=nnx.Rngs(0)) for r in ("block", "offload")
    }
    assert "f64<host>[2,2,9,32]" in _grad_jaxpr(models["offload"], x)
    assert "<host>" not in _grad_jaxpr(models["block"], x)


def test_nested_remat_keeps_one_input_per_period():
    """The layer scan's saved (B, L, d) activations, stacked over the repeats: one per block with
    remat="block", one per period with remat="nested" (its backward recomputes the others)."""
    x = tokens(3, 2, 9)

    def stacked_residuals(remat):
        model = HybridLM(tiny(pattern="M-*-M-*-", remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        grad = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).hidden(x)[0]))
        forward_scan = next(
            e for e in jax.make_jaxpr(grad)(state).eqns if e.primitive.name == "scan"
        )
        return sum(str(v.aval) == "float64[2,2,9,32]" for v in forward_scan.outvars)

    assert (stacked_residuals("block"), stacked_residuals("nested")) == (4, 1)


def test_offload_without_pinned_host_memory_stays_on_the_device(monkeypatch, caplog):
    monkeypatch.setattr(hybridjax.model, "host_offload_supported", lambda: False)
    model = HybridLM(tiny(pattern="M-", remat="offload"), rngs=nnx.Rngs(0))
    assert "<host>" not in _grad_jaxpr(model, tokens(5, 1, 8))
    assert "no pinned_host memory" in caplog.text


def test_logits_from_hidden_and_head_equal_the_flax_head():
    """`head` and `logits` read the lm_head kernel, or the tied embedding table, as flax does."""
    x = tokens(6, 2, 11)
    for tie in (False, True):
        model = HybridLM(tiny(pattern="M*", tie_embeddings=tie), rngs=nnx.Rngs(0))
        h, _ = model.hidden(x)
        _, vocab_major = model.head()
        assert vocab_major == tie and h.shape == (2, 11, 32)
        flax_head = model.embeddings.attend(h) if tie else model.lm_head(h)
        np.testing.assert_allclose(model(x), flax_head, rtol=1e-13, atol=1e-13)


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


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"pattern": "MX"}, "pattern"),
        ({"n_groups": 3}, "n_groups"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"pattern": "E", "top_k": 9}, "top_k"),
        ({"dtype": "int8"}, "dtype"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
        ({"remat": "offlaod"}, "remat"),
        ({"remat": "nested", "scan_layers": False}, "scan_layers"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
    ],
)
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny(**bad)
