"""MoE token_mask: padding is not routed and counts in no statistic (lb loss, z loss, expert
load, dropped fraction), on one device, expert-parallel on the 8 CPU devices, and through the
model and the trainer's batch contract (segment id 0 = padding)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax.train_step import init_model, real_tokens, token_losses
from tests.layers.test_moe import assert_tree_close, inputs, make
from tests.tiny import tiny, tokens

LENGTHS = [7, 3, 0]  # real tokens per row of 7; the last row is all padding


def padding_mask(lengths=LENGTHS, length=7):
    return np.arange(length)[None] < np.asarray(lengths)[:, None]


@nnx.jit
def run(moe, x, mask):
    return moe(x, token_mask=mask)


def numpy_stats(cfg, moe, x_TD):
    """(expert load, lb loss, z loss) of tokens x (T, d) by hand, from the documented routing."""
    logits = x_TD @ np.asarray(moe.gate.weight[...]).T
    if cfg.router == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
        probs = scores / scores.sum(-1, keepdims=True)
    else:
        scores = probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.argsort(-(scores + np.asarray(moe.gate.e_score_correction_bias[...])), -1)
    counts = np.bincount(chosen[:, : cfg.top_k].reshape(-1), minlength=cfg.n_experts)
    load = counts / (len(x_TD) * cfg.top_k)
    lse = np.log(np.exp(logits).sum(-1))
    return load, cfg.n_experts * np.sum(load * probs.mean(0)), np.mean(lse**2)


def shared_expert(moe, x):
    s = moe.shared_experts
    return np.maximum(x @ np.asarray(s.up_proj.kernel[...]), 0) ** 2 @ np.asarray(
        s.down_proj.kernel[...]
    )


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_padding_counts_in_no_statistic(router):
    cfg, moe = make(router=router, shared_ffn=6)
    x, mask = inputs((3, 7, 16), seed=2), padding_mask()
    y, aux = run(moe, jnp.asarray(x), jnp.asarray(mask))
    load, lb, z = numpy_stats(cfg, moe, x[mask])
    np.testing.assert_allclose(np.asarray(aux.expert_load), load, rtol=1e-6)  # float32
    np.testing.assert_allclose(float(aux.lb_loss), lb, rtol=1e-12)
    np.testing.assert_allclose(float(aux.z_loss), z, rtol=1e-12)
    assert float(aux.dropped_frac) == 0.0
    # the real tokens alone, unpadded: the same statistics and outputs
    y_real, aux_real = run(moe, jnp.asarray(x[mask][None]), None)
    assert_tree_close(aux, aux_real)
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(y_real)[0], rtol=1e-12)
    # padding is not routed: the shared expert is all it gets
    np.testing.assert_allclose(np.asarray(y)[~mask], shared_expert(moe, x[~mask]), rtol=1e-12)
    # without the mask the padding would have counted
    _, aux_all = run(moe, jnp.asarray(x), None)
    assert not np.allclose(np.asarray(aux_all.expert_load), load)


def test_all_padding_gives_zero_statistics():
    _, moe = make()
    _, aux = run(moe, jnp.asarray(inputs((2, 3, 16))), jnp.zeros((2, 3), bool))
    for value in aux:
        np.testing.assert_array_equal(np.asarray(value), 0.0)


def test_padding_takes_no_capacity():
    """Padding first in token order would fill the experts' capacity before the real tokens if it
    were routed; masked, the real tokens keep exactly what a python loop over them keeps."""
    cfg, moe = make(moe_dispatch="capacity", capacity_factor=0.5)
    x, mask = inputs((2, 10, 16), seed=4), padding_mask([0, 10], 10)
    y, aux = run(moe, jnp.asarray(x), jnp.asarray(mask))
    real = x[mask]
    routing = moe.gate(jnp.asarray(real))
    idx, w = np.asarray(routing.expert_idx), np.asarray(routing.weights)
    capacity = math.ceil(0.5 * x[..., 0].size * cfg.top_k / cfg.n_experts)  # of all 20 tokens
    fill, kept = [0] * cfg.n_experts, np.zeros(idx.shape, bool)
    for s in range(cfg.top_k):  # priority: first choices of every token, then second choices
        for t in range(len(real)):
            if fill[idx[t, s]] < capacity:
                fill[idx[t, s]] += 1
                kept[t, s] = True
    up, down = np.asarray(moe.experts.up_proj[...]), np.asarray(moe.experts.down_proj[...])
    want = np.zeros_like(real)
    for t, s in zip(*np.nonzero(kept)):
        want[t] += w[t, s] * (np.maximum(real[t] @ up[idx[t, s]], 0) ** 2 @ down[idx[t, s]])
    assert 0 < (~kept).sum() < kept.size
    np.testing.assert_allclose(float(aux.dropped_frac), (~kept).sum() / kept.size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y)[mask], want, rtol=1e-11, atol=1e-12)


AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit


@pytest.mark.parametrize(
    "shape, names, kind, lengths, rows",
    [
        ((8,), ("expert",), EXPLICIT, [5, 0, 2, 5, 1, 3, 4, 5], ("expert",)),
        ((2, 4), ("data", "expert"), AUTO, [5, 2, 0], ()),  # 15 tokens on 8 shards: padded to 16
    ],
)
def test_expert_parallel_with_padding_matches_single_device(shape, names, kind, lengths, rows):
    _, moe = make(moe_latent=8, shared_ffn=6, grouped_matmul="ragged_dot")
    x = inputs((len(lengths), 5, 16), seed=7)
    mask = jnp.asarray(padding_mask(lengths, 5))
    cot = np.random.default_rng(8).standard_normal(x.shape)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def f(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x, token_mask=mask)
        return jnp.sum(y * cot) + aux.lb_loss + 0.1 * aux.z_loss, (y, aux)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    want = fn(params, x)
    mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
    with jax.set_mesh(mesh):
        got = fn(params, jax.device_put(x, NamedSharding(mesh, P(rows))))
    assert_tree_close(got, want)
    _, aux_real = run(moe, jnp.asarray(x[np.asarray(mask)][None]), None)
    assert_tree_close(got[0][1][1], aux_real)


def test_trainer_masks_padding_rows_as_packing_would():
    """A padded batch through the trainer (segment id 0 = padding) gives the MoE statistics of
    its real tokens packed into one row without padding."""
    cfg = tiny(pattern="ME")
    graphdef, params, model_state = init_model(cfg, seed=0)
    losses = jax.jit(functools.partial(token_losses, graphdef))
    x = tokens(1, 2, 12)
    seg = jnp.asarray(np.where(padding_mask([12, 5], 12), [[1], [2]], 0), jnp.int32)
    batch = {"tokens": x, "targets": x, "segment_ids": seg}
    assert np.array_equal(real_tokens(batch), seg > 0)
    _, aux = losses(params, model_state, batch)
    packed = {
        "tokens": jnp.concatenate([x[:1], x[1:, :5]], 1),
        "segment_ids": jnp.asarray([[1] * 12 + [2] * 5]),
    }
    packed["targets"] = packed["tokens"]
    _, aux_packed = losses(params, model_state, packed)
    assert_tree_close(aux, aux_packed, tol=1e-10)
