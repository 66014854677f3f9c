"""The optimiser pieces: schedules, the weight-decay mask, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridjax.config import HybridConfig
from hybridjax.optim import OptimConfig, decays, make_optimizer, make_schedule, weight_decay_mask
from hybridjax.train_step import init_model, init_state, make_train_step


def test_cosine_schedule():
    lr = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(0.1)


def test_wsd_schedule():
    lr = make_schedule(
        OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0),
        110,
    )
    assert float(lr(10)) == pytest.approx(1.0) and float(lr(90)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.5) and float(lr(110)) == pytest.approx(0.0)


def test_bad_optimizer_values_name_the_field():
    with pytest.raises(ValueError, match="schedule: 'linear' is not allowed"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="b2: must be in"):
        OptimConfig(b2=1.5)


def test_weight_decay_mask_by_name():
    assert not any(
        decays(p)
        for p in (
            "periods.blocks.0.mixer.A_log",
            "periods.blocks.0.mixer.D",
            "periods.blocks.0.mixer.dt_bias",
            "periods.blocks.0.mixer.conv_x.bias",
            "periods.blocks.0.mixer.norm.weight",
            "periods.blocks.0.norm.weight",
            "norm_f.weight",
        )
    )
    assert all(
        decays(p)
        for p in (
            "embeddings.embedding",
            "lm_head.kernel",
            "periods.blocks.0.mixer.zx_proj.kernel",
            "periods.blocks.1.mixer.q_proj.kernel",
            "periods.blocks.2.mixer.experts.up_proj",
        )
    )
    _, params, model_state = init_model(HybridConfig(pattern="M*E"), seed=0)
    mask = weight_decay_mask(params)
    assert mask["periods"]["blocks"][0]["mixer"]["A_log"] is False
    assert mask["periods"]["blocks"][0]["mixer"]["zx_proj"]["kernel"] is True
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(params))
    assert "e_score_correction_bias" in str(jax.tree_util.tree_structure(model_state))


def test_grad_accumulation_matches_one_big_batch():
    config = HybridConfig(
        vocab_size=32,
        d_model=16,
        pattern="M*E",
        mamba_heads=2,
        mamba_head_dim=8,
        ssm_state=4,
        chunk_size=8,
        attn_heads=2,
        kv_heads=1,
        head_dim=8,
        n_experts=4,
        top_k=2,
        moe_ffn=8,
    )
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 32, (4, 16)).astype(np.int32),
        "targets": rng.integers(0, 32, (4, 16)).astype(np.int32),
        "loss_mask": (rng.random((4, 16)) < 0.5).astype(np.float32),
        "segment_ids": np.ones((4, 16), np.int32),
    }
    out = []
    for accum in (1, 2):
        graphdef, state = init_state(config, tx, seed=0)
        step = make_train_step(
            graphdef,
            tx,
            schedule,
            lb_coef=0.0,
            z_coef=0.0,
            router_bias_rate=0.0,
            grad_accum=accum,
            has_moe=True,
        )
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
        out.append((state.params, metrics))
    (p1, m1), (p2, m2) = out
    np.testing.assert_allclose(m1["ce"], m2["ce"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
