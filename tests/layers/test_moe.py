"""MoE layer: transformers NemotronHMoE oracle, numpy oracles, aux losses, expert parallelism."""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hybridjax import sharding
from hybridjax.config import HybridConfig
from hybridjax.layers import moe_parallel
from hybridjax.layers.moe import (
    MoE,
    MoEAux,
    RouterBias,
    load_balancing_loss,
    update_router_bias,
    z_loss,
)
from hybridjax.train_step import moe_stats
from tests.tiny import tiny

F64 = {"dtype": "float64", "param_dtype": "float64", "initializer_range": 0.3}


def make(seed=0, bias_scale=0.1, **kw):
    base = {"d_model": 16, "n_experts": 8, "top_k": 2, "moe_ffn": 12, **F64}
    cfg = HybridConfig(pattern="E", **{**base, **kw})
    moe = MoE(cfg, rngs=nnx.Rngs(seed))
    bias = np.random.default_rng(seed + 100).standard_normal(cfg.n_experts) * bias_scale
    moe.gate.e_score_correction_bias[...] = jnp.asarray(bias)
    return cfg, moe


@nnx.jit
def run(moe, x):
    """One compiled call (eager nnx dispatches op by op: slow to compile on CPU)."""
    return moe(x)


def inputs(shape=(3, 7, 16), seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


# --- against transformers NemotronHMoE ----------------------------------------------------------
def hf_moe(cfg, moe):
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from _torch_f64 import set_linear, t
    from transformers import NemotronHConfig

    hf_cfg = NemotronHConfig(
        hidden_size=cfg.d_model,
        n_routed_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_ffn,
        moe_shared_expert_intermediate_size=cfg.shared_ffn,
        moe_latent_size=cfg.moe_latent,
        n_group=cfg.router_groups,
        topk_group=cfg.router_topk_groups,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        mlp_hidden_act=cfg.expert_act,
        mlp_bias=False,
    )
    hf_cfg._experts_implementation = "eager"
    hf = mod.NemotronHMoE(hf_cfg, layer_idx=0).double().eval()
    hf.gate.weight.data = t(moe.gate.weight[...])
    hf.gate.e_score_correction_bias.data = t(moe.gate.e_score_correction_bias[...])
    # nnx experts are (E, in, out); torch's (E, out, in).
    hf.experts.up_proj.data = t(moe.experts.up_proj[...]).transpose(1, 2).contiguous()
    hf.experts.down_proj.data = t(moe.experts.down_proj[...]).transpose(1, 2).contiguous()
    set_linear(hf.shared_experts.up_proj, moe.shared_experts.up_proj)
    set_linear(hf.shared_experts.down_proj, moe.shared_experts.down_proj)
    if cfg.moe_latent:
        set_linear(hf.fc1_latent_proj, moe.fc1_latent_proj)
        set_linear(hf.fc2_latent_proj, moe.fc2_latent_proj)
    return torch, hf


@contextlib.contextmanager
def router_float64(torch):
    """NemotronHTopkRouter casts with `.type(torch.float32)`: keep float64 there too."""
    orig = torch.Tensor.type

    def _type(self, dtype=None, *args, **kwargs):
        if dtype is torch.float32 and self.dtype == torch.float64:
            return self
        return orig(self) if dtype is None else orig(self, dtype, *args, **kwargs)

    torch.Tensor.type = _type
    try:
        yield
    finally:
        torch.Tensor.type = orig


HF_CASES = {
    "latent_shared_groups": {
        "moe_latent": 8,
        "shared_ffn": 10,
        "router_groups": 4,
        "router_topk_groups": 2,
        "routed_scaling_factor": 2.5,
    },
    "topk3_unnormalised": {
        "shared_ffn": 6,
        "top_k": 3,
        "norm_topk_prob": False,
        "router_groups": 2,
    },
}
DISPATCHES = {
    "ragged_dot": {"grouped_matmul": "ragged_dot"},
    "padded": {"grouped_matmul": "padded"},
    "capacity_no_drop": {"moe_dispatch": "capacity", "capacity_factor": 4.0},  # capacity = T
}


@pytest.mark.parametrize(
    "case, dispatch",
    [
        ("latent_shared_groups", "ragged_dot"),
        ("latent_shared_groups", "padded"),
        ("latent_shared_groups", "capacity_no_drop"),
        ("topk3_unnormalised", "ragged_dot"),
    ],
)
def test_matches_transformers(case, dispatch):
    cfg, moe = make(**HF_CASES[case], **DISPATCHES[dispatch])
    torch, hf = hf_moe(cfg, moe)
    from _torch_f64 import keep_float64, rel_err, t

    x = inputs()
    y, aux = run(moe, jnp.asarray(x))
    with keep_float64(), router_float64(torch), torch.no_grad():
        want = hf(t(x)).numpy()
    assert y.shape == x.shape and y.dtype == jnp.float64
    assert rel_err(y, want) < 1e-12
    assert float(aux.dropped_frac) == 0.0


# --- softmax router + swiglu against a numpy per-token loop -------------------------------------
def numpy_moe(cfg, moe, x):
    """Per-token loop of the layer's documented semantics (no latent projection)."""
    w_gate = np.asarray(moe.gate.weight[...])
    bias = np.asarray(moe.gate.e_score_correction_bias[...])
    up, down = np.asarray(moe.experts.up_proj[...]), np.asarray(moe.experts.down_proj[...])
    gate = np.asarray(moe.experts.gate_proj[...]) if moe.experts.gate_proj is not None else None
    silu = lambda v: v / (1 + np.exp(-v))
    e, g = cfg.n_experts, cfg.router_groups
    out = np.zeros_like(x)
    for i, tok in enumerate(x.reshape(-1, x.shape[-1])):
        logits = w_gate @ tok
        if cfg.router == "softmax":
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        choice = scores + bias
        group_score = np.sort(choice.reshape(g, e // g), axis=1)[:, -2:].sum(1)
        groups = np.argsort(-group_score)[: cfg.router_topk_groups]
        allowed = np.isin(np.arange(e) // (e // g), groups)
        choice = np.where(allowed, choice, -np.inf)
        chosen = np.argsort(-choice)[: cfg.top_k]
        weights = scores[chosen]
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum() + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        y = 0.0
        for ex, wt in zip(chosen, weights):
            h = tok @ up[ex]
            h = silu(tok @ gate[ex]) * h if gate is not None else np.maximum(h, 0) ** 2
            y = y + wt * (h @ down[ex])
        if moe.shared_experts is not None:
            s = moe.shared_experts
            h = tok @ np.asarray(s.up_proj.kernel[...])
            if s.gate_proj is not None:
                h = silu(tok @ np.asarray(s.gate_proj.kernel[...])) * h
            else:
                h = np.maximum(h, 0) ** 2
            y = y + h @ np.asarray(s.down_proj.kernel[...])
        out.reshape(-1, x.shape[-1])[i] = y
    return out


def test_softmax_router_swiglu_matches_numpy_loop():
    cfg, moe = make(
        router="softmax",
        expert_act="swiglu",
        shared_ffn=6,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        router_groups=2,
        router_topk_groups=1,
        top_k=3,
    )
    x = inputs((2, 5, 16), seed=3)
    y, _ = run(moe, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), numpy_moe(cfg, moe, x), rtol=1e-11, atol=1e-12)


# --- aux losses ---------------------------------------------------------------------------------
def test_load_balancing_loss_by_hand():
    # E=3, T=2, k=2: token 0 -> experts {0, 1}, token 1 -> {0, 2}.
    # f = (2/4, 1/4, 1/4); P = mean probs = (0.35, 0.25, 0.40)
    # E * sum f P = 3 * (0.5*0.35 + 0.25*0.25 + 0.25*0.40) = 3 * 0.3375 = 1.0125
    probs = jnp.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    idx = jnp.array([[0, 1], [0, 2]])
    np.testing.assert_allclose(float(load_balancing_loss(probs, idx)), 1.0125, rtol=1e-12)
    # E=2, T=2, k=1, both to expert 0: f = (1, 0), P = (0.55, 0.45) -> 2 * 0.55 = 1.1
    np.testing.assert_allclose(
        float(load_balancing_loss(jnp.array([[0.7, 0.3], [0.4, 0.6]]), jnp.array([[0], [0]]))),
        1.1,
        rtol=1e-12,
    )


def test_sigmoid_lb_loss_uses_normalised_scores_by_hand():
    # Router weight = identity, d_model = E = 2, k = 1. Tokens (ln 3, 0), (0, ln 3), (ln 3, 0):
    # sigmoid scores (0.75, 0.5) -> normalised (0.6, 0.4), choice expert 0; (0.4, 0.6) -> 1;
    # (0.6, 0.4) -> 0. f = (2/3, 1/3), P = (1.6/3, 1.4/3)
    # lb = 2 * (2/3 * 1.6/3 + 1/3 * 1.4/3) = 2 * 4.6 / 9 = 9.2 / 9
    cfg = HybridConfig(pattern="E", d_model=2, n_experts=2, top_k=1, moe_ffn=4, **F64)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    moe.gate.weight[...] = jnp.eye(2)
    ln3 = math.log(3.0)
    x = jnp.array([[[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    _, aux = run(moe, x)
    np.testing.assert_allclose(float(aux.lb_loss), 9.2 / 9, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(aux.expert_load), [2 / 3, 1 / 3], rtol=1e-6)
    # z-loss: logsumexp(ln 3, 0) = ln 4 for every token -> (ln 4)^2.
    np.testing.assert_allclose(float(aux.z_loss), math.log(4.0) ** 2, rtol=1e-12)


def test_z_loss_formula():
    # logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 = 2 ln 2 -> mean(ln2^2, 4 ln2^2) = 2.5 ln2^2
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    np.testing.assert_allclose(float(z_loss(logits)), 2.5 * math.log(2.0) ** 2, rtol=1e-12)
    _cfg, moe = make()
    x = inputs((2, 4, 16))
    _, aux = run(moe, jnp.asarray(x))
    logits = x.reshape(-1, 16) @ np.asarray(moe.gate.weight[...]).T
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux.z_loss), np.mean(lse**2), rtol=1e-12)
    assert isinstance(aux, MoEAux)
    assert aux.lb_loss.shape == aux.z_loss.shape == aux.dropped_frac.shape == ()
    assert aux.expert_load.shape == (8,)
    np.testing.assert_allclose(float(aux.expert_load.sum()), 1.0, rtol=1e-6)


def test_aux_loss_gradients_reach_the_router():
    _cfg, moe = make()
    x = jnp.asarray(inputs((2, 4, 16)))
    grads = nnx.jit(nnx.grad(lambda m: m(x)[1].lb_loss))(moe)
    assert np.abs(np.asarray(grads.gate.weight[...])).max() > 0


# --- capacity dispatch in the layer -------------------------------------------------------------
def test_capacity_dispatch_drops_match_python_loop():
    cfg, moe = make(moe_dispatch="capacity", capacity_factor=0.5, shared_ffn=6)
    x = inputs((2, 10, 16), seed=4)
    y, aux = run(moe, jnp.asarray(x))
    routing = moe.gate(jnp.asarray(x.reshape(-1, 16)))
    idx, w = np.asarray(routing.expert_idx), np.asarray(routing.weights)
    t_n, k, e = idx.shape[0], cfg.top_k, cfg.n_experts
    capacity = math.ceil(0.5 * t_n * k / e)  # = 3
    fill, kept = [0] * e, np.zeros((t_n, k), bool)
    for s in range(k):  # priority: first choices of every token, then second choices
        for t in range(t_n):
            if fill[idx[t, s]] < capacity:
                fill[idx[t, s]] += 1
                kept[t, s] = True
    up, down = np.asarray(moe.experts.up_proj[...]), np.asarray(moe.experts.down_proj[...])
    sh = moe.shared_experts
    want = np.zeros((t_n, 16))
    for t, tok in enumerate(x.reshape(-1, 16)):
        for s in range(k):
            if kept[t, s]:
                want[t] += w[t, s] * (np.maximum(tok @ up[idx[t, s]], 0) ** 2 @ down[idx[t, s]])
        want[t] += np.maximum(tok @ np.asarray(sh.up_proj.kernel[...]), 0) ** 2 @ np.asarray(
            sh.down_proj.kernel[...]
        )
    assert 0 < (~kept).sum() < kept.size
    np.testing.assert_allclose(float(aux.dropped_frac), (~kept).sum() / kept.size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), want, rtol=1e-11, atol=1e-12)


# --- aux-loss-free bias update ------------------------------------------------------------------
def test_update_router_bias_direction():
    cfg, moe = make(bias_scale=0.0)
    load = jnp.array([0.25, 0.125, 0.125, 0.0, 0.125, 0.125, 0.125, 0.125])  # mean 0.125
    new = update_router_bias(moe, load, 0.01)
    want = [-0.01, 0, 0, 0.01, 0, 0, 0, 0]  # over-loaded expert 0 down, idle expert 3 up
    np.testing.assert_allclose(np.asarray(moe.gate.e_score_correction_bias[...]), want)
    np.testing.assert_allclose(np.asarray(new), want)
    # A bare array, stacked over layers (R, E): returned, per row.
    stacked = update_router_bias(jnp.zeros((2, 4)), jnp.array([[0.1, 0.2, 0.3, 0.4]] * 2), 1.0)
    np.testing.assert_allclose(np.asarray(stacked), [[1, 1, -1, -1]] * 2)
    # The bias is state, not a parameter: an optimizer over nnx.Param never sees it.
    assert isinstance(moe.gate.e_score_correction_bias, RouterBias)
    params = nnx.state(moe, nnx.Param)
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(params))
    # A large bias makes its expert chosen by every token (choice only: weights stay scores).
    moe.gate.e_score_correction_bias[...] = jnp.zeros(8).at[3].set(10.0)
    _, aux = run(moe, jnp.asarray(inputs((2, 4, 16))))
    np.testing.assert_allclose(np.asarray(aux.expert_load)[3], 1 / cfg.top_k)


# --- expert parallelism on the 8 CPU devices ----------------------------------------------------
def loss_grads(moe, x, cot, mesh=None, batch_axes=()):
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def f(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * cot) + aux.lb_loss + 0.1 * aux.z_loss, (y, aux)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return fn(params, x)
    with jax.set_mesh(mesh):
        x = jax.device_put(x, NamedSharding(mesh, P(batch_axes)))
        return fn(params, x)


def assert_tree_close(a, b, tol=1e-12):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol * max(1.0, np.abs(v).max()))


AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
MESHES = {
    "data2_expert4": ((2, 4), ("data", "expert"), AUTO),
    "expert8_explicit": ((8,), ("expert",), EXPLICIT),
    "fsdp2_expert2_tensor2": ((2, 2, 2), ("fsdp", "expert", "tensor"), AUTO),
    "data8_no_ep": ((8,), ("data",), AUTO),
    "data2_context2_tensor2": ((2, 2, 2), ("data", "context", "tensor"), AUTO),
}


@functools.cache
def ep_case():
    """The model, inputs and single-device loss/grads shared by the mesh parametrizations."""
    _cfg, moe = make(moe_latent=8, shared_ffn=6, router_groups=2, grouped_matmul="ragged_dot")
    x = inputs((8, 5, 16), seed=7)
    cot = np.random.default_rng(8).standard_normal(x.shape)
    return moe, x, cot, loss_grads(moe, x, cot)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_expert_parallel_matches_single_device(mesh_name):
    shape, names, kind = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
    batch_axes = tuple(a for a in moe_parallel.TOKEN_AXES if a in names)
    moe, x, cot, ((l0, (y0, aux0)), g0) = ep_case()
    (l1, (y1, aux1)), g1 = loss_grads(moe, x, cot, mesh, batch_axes)
    assert_tree_close((l1, y1, aux1), (l0, y0, aux0))
    assert_tree_close(g1, g0)
    assert float(aux1.dropped_frac) == 0.0


def test_expert_parallel_pads_indivisible_tokens():
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AUTO, AUTO))
    _cfg, moe = make(expert_act="swiglu")
    x = inputs((3, 5, 16), seed=9)  # 15 tokens on 8 batch shards: padded to 16
    cot = np.random.default_rng(10).standard_normal(x.shape)
    (_, (y0, _)), g0 = loss_grads(moe, x, cot)
    (_, (y1, aux1)), g1 = loss_grads(moe, x, cot, mesh, ())
    assert_tree_close((y1, g1), (y0, g0))
    assert float(aux1.dropped_frac) == 0.0


def ep_bound_drops(idx_TK, n_shards, n_ep, n_experts, factor):
    """Assignments that the expert-parallel buffer bound drops, counted as moe_parallel's doc
    states: tokens padded to a multiple of the shards and split into contiguous blocks of T_l; each
    (source shard, destination device) buffer holds C = min(T_l min(k, E/n), ceil(f T_l k / n))."""
    t, k = idx_TK.shape
    t_l, e_local = -(-t // n_shards), n_experts // n_ep
    cap = min(t_l * min(k, e_local), math.ceil(factor * t_l * k / n_ep))
    per_dest = [
        np.bincount(idx_TK[s * t_l : (s + 1) * t_l].reshape(-1) // e_local, minlength=n_ep)
        for s in range(n_shards)
    ]
    return int(np.maximum(np.stack(per_dest) - cap, 0).sum())


def test_ep_capacity_factor_drops_are_counted_over_all_devices():
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AUTO, AUTO))
    x = jnp.asarray(inputs((5, 9, 16), seed=12))  # 45 tokens: padded to 48, 6 per device
    _, exact = make(expert_act="swiglu")
    _, tight = make(expert_act="swiglu", ep_capacity_factor=0.5)  # same weights (seed)
    with jax.set_mesh(mesh):
        (y1, aux1), (_, aux2) = (jax.jit(lambda m, x: m(x))(m, x) for m in (exact, tight))
    y0, _ = run(exact, x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    assert float(aux1.dropped_frac) == 0.0
    idx = np.asarray(exact.gate(x.reshape(-1, 16)).expert_idx)
    want = ep_bound_drops(idx, n_shards=8, n_ep=4, n_experts=8, factor=0.5) / idx.size
    assert 0 < want < 1
    np.testing.assert_allclose(float(aux2.dropped_frac), want, rtol=1e-6)
    np.testing.assert_allclose(float(moe_stats(aux2)["moe/dropped_frac"]), want, rtol=1e-6)
    with pytest.raises(ValueError, match="ep_capacity_factor: must be > 0"):
        make(ep_capacity_factor=0.0)


def test_capacity_dispatch_is_per_device_under_a_mesh():
    """With the batch split, capacity applies to each device's tokens (GShard groups)."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AUTO, AUTO))
    _cfg, moe = make(moe_dispatch="capacity", capacity_factor=0.75, shared_ffn=6)
    x = inputs((8, 4, 16), seed=11)  # 32 tokens -> 4 per device
    with jax.set_mesh(mesh):
        y, aux = jax.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
    # Oracle: the single-device layer on each device's 4 tokens (one batch row each).
    parts = [run(moe, jnp.asarray(x[i : i + 1])) for i in range(8)]
    want = np.concatenate([np.asarray(p[0]) for p in parts])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-12, atol=1e-12)
    dropped = np.mean([float(p[1].dropped_frac) for p in parts])
    assert dropped > 0
    np.testing.assert_allclose(float(aux.dropped_frac), dropped, rtol=1e-6)


def test_expert_axis_must_divide_experts():
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(AUTO,))
    _cfg, moe = make(n_experts=6, top_k=2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="n_experts: 6"):
        jax.jit(lambda m, x: m(x))(moe, jnp.asarray(inputs((8, 2, 16))))


# --- tensor-parallel experts --------------------------------------------------------------------
def on_mesh(moe, mesh):
    """A copy of `moe` with its expert weights placed by hybridjax.sharding's rules."""
    moe = nnx.clone(moe)
    for name in ("up_proj", "gate_proj", "down_proj"):
        var = getattr(moe.experts, name)
        if var is not None:
            spec = sharding.param_spec(f"experts.{name}", var.shape, mesh)
            var[...] = jax.device_put(var[...], NamedSharding(mesh, spec))
    return moe


@functools.cache
def tp_case(act, dispatch, moe_ffn):
    """Model, inputs and single-device loss/grads; capacity_factor 4 keeps capacity dispatch
    dropless on every split of the batch, so it too equals the single-device run."""
    cfg = tiny(
        pattern="E",
        expert_act=act,
        moe_dispatch=dispatch,
        capacity_factor=4.0,
        moe_ffn=moe_ffn,
        initializer_range=0.3,
        grouped_matmul="ragged_dot",
    )
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = inputs((4, 6, 32), seed=13)
    cot = np.random.default_rng(14).standard_normal(x.shape)
    return moe, x, cot, loss_grads(moe, x, cot)


@pytest.mark.parametrize(
    "sizes, act, dispatch, moe_ffn",
    [
        ({"data": 2, "expert": 2, "tensor": 2}, "relu2", "dropless", 16),
        ({"data": 2, "expert": 2, "tensor": 2}, "swiglu", "dropless", 16),
        ({"data": 2, "expert": 2, "tensor": 2}, "swiglu", "capacity", 16),
        ({"data": 1, "tensor": 8}, "relu2", "dropless", 16),
        ({"data": 1, "tensor": 8}, "swiglu", "dropless", 16),
        ({"data": 1, "tensor": 8}, "relu2", "capacity", 16),
        ({"data": 1, "fsdp": 2, "tensor": 4}, "relu2", "dropless", 16),
        ({"data": 1, "fsdp": 2, "tensor": 4}, "swiglu", "dropless", 16),
        ({"data": 2, "tensor": 4}, "relu2", "dropless", 10),  # 4 does not divide 10: replicated
    ],
)
def test_tensor_parallel_experts_match_single_device(sizes, act, dispatch, moe_ffn):
    moe, x, cot, ((l0, (y0, aux0)), g0) = tp_case(act, dispatch, moe_ffn)
    mesh = sharding.make_mesh(**sizes)
    (l1, (y1, aux1)), g1 = loss_grads(on_mesh(moe, mesh), x, cot, mesh, sharding.BATCH_AXES)
    assert_tree_close((l1, y1, aux1), (l0, y0, aux0))
    assert_tree_close(g1, g0)  # input and every parameter, expert weights included
    assert float(aux1.dropped_frac) == 0.0


# --- lowering under the mesh --------------------------------------------------------------------
COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|collective-permute"
    r"|all-to-all)(?:-start)?\("
)


def token_collectives(hlo: str, n_tokens: int, k: int, d: int) -> list[str]:
    """Collectives of a compiled HLO module, other than all-to-all, that move token data of the
    whole batch: arrays with all tokens (T) or all assignments (T k) as leading dimension and
    nothing, k or d after it (token rows, expert ids, routing weights). The router's (T, E)
    scores do not count: XLA's top-k partitioning gathers them, outside the dispatch."""
    found = []
    for result, op in COLLECTIVE.findall(hlo):
        for dims in re.findall(r"\[([\d,]*)\]", result):
            shape = tuple(int(n) for n in dims.split(",") if n)
            if (
                op != "all-to-all"
                and shape[:1] in ((n_tokens,), (n_tokens * k,))
                and shape[1:] in ((), (k,), (d,), (k, d))
            ):
                found.append(f"{op} {shape}")
    return found


@pytest.mark.parametrize("shard_map", [True, False])
def test_grouped_matmul_runs_on_local_tokens(shard_map, monkeypatch):
    """Under a (data 2, expert 2, tensor 2) mesh the dispatch and the grouped matmul run per
    device: tokens cross devices only through the all-to-alls, and each device holds its
    (E/2, d, f/2) slice of the expert weights. The negative control (the shard_map removed, XLA
    left to partition the global sort and gathers) shows that the check sees the difference."""
    cfg = tiny(pattern="E", grouped_matmul="ragged_dot")
    mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
    moe = on_mesh(MoE(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x = np.zeros((8, 12, cfg.d_model))  # 96 tokens, 24 per device

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y**2) + aux.lb_loss

    if not shard_map:
        monkeypatch.setattr(moe_parallel, "mesh_layout", lambda: (None, (), 1, 1, 1))
    with jax.set_mesh(mesh):
        x = jax.device_put(x, sharding.batch_sharding(mesh))
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x)
        hlo = lowered.compile().as_text()
    found = token_collectives(hlo, 96, cfg.top_k, cfg.d_model)
    if not shard_map:
        assert found, "the check must see the gathers of the unsharded dispatch"
        return
    assert found == []
    assert "all-to-all" in hlo
    e, d, f = cfg.n_experts // 2, cfg.d_model, cfg.moe_ffn // 2  # one device's expert weights
    assert re.search(rf"sdy.manual_computation.*tensor<{e}x{d}x{f}xf64>", lowered.as_text())
