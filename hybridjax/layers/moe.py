"""Sparse mixture-of-experts layer (transformers NemotronH `NemotronHMoE` semantics).

    y, aux = MoE(config, rngs=rngs)(x)          x (..., d_model) -> y (..., d_model), MoEAux

Forward, as NemotronHMoE:
    logits = x Wᵀ (float32; `gate.weight` (E, d_model))
    router "sigmoid": scores = sigmoid(logits); choice = scores + e_score_correction_bias
    router "softmax": scores = softmax(logits);  choice = scores + e_score_correction_bias
        (the bias is zero unless `update_router_bias` moved it)
    group-limited choice (router_groups > 1): a group's score is the sum of its top-2 choice
        values; only experts in the router_topk_groups best groups may be chosen
    top-k experts by choice; weights = scores (without the bias) at those experts;
        norm_topk_prob: weights /= sum(weights) + 1e-20; then weights *= routed_scaling_factor
    h = fc1_latent_proj(x) if moe_latent else x
    routed = sum_k weights_k * expert_{e_k}(h)      relu2: down(relu(up h)^2)
                                                    swiglu: down(silu(gate h) * up h)
    y = fc2_latent_proj(routed) if moe_latent else routed
    y += shared_experts(x)                          when shared_ffn > 0 (MLP, act = expert_act)

Parameters (nnx paths; kernels (in, out), the transpose of torch's (out, in)):
    gate.weight (E, d_model)                  = HF gate.weight (same layout)
    gate.e_score_correction_bias (E,)         RouterBias, not an nnx.Param: optimizers built
                                              on nnx.Param skip it; float32 (float64 under f64)
    experts.up_proj (E, d_e, moe_ffn)         = HF experts.up_proj (E, moe_ffn, d_e) transposed
    experts.gate_proj (E, d_e, moe_ffn)       swiglu only
    experts.down_proj (E, moe_ffn, d_e)       = HF experts.down_proj (E, d_e, moe_ffn) transposed
    fc1_latent_proj.kernel (d_model, latent), fc2_latent_proj.kernel (latent, d_model)
    shared_experts.{up,down,gate}_proj.kernel (hybridjax.layers.mlp.MLP)
  (d_e = moe_latent or d_model)

Padding: `token_mask` (x.shape[:-1] bool, None = all real) marks the real tokens. The others are
not routed at all (their routed output is zero; shared experts still run): they take no expert
capacity and no expert-parallel buffer space from real tokens, and every statistic below counts
real tokens only, so a padded batch gives the statistics of its real tokens alone.

Aux outputs (MoEAux; coefficients are the trainer's business), over the T real tokens:
    lb_loss      Switch load balancing E * sum_i f_i * P_i. f_i = fraction of the T*k routed
                 (token, slot) assignments that chose expert i (before any capacity drop);
                 P_i = mean over tokens of the router probability of expert i: softmax
                 probabilities, or for "sigmoid" the scores normalised to sum to one per token
                 (s_i / sum_j s_j), so that sum_i P_i = 1 and the loss is 1 at perfect balance for
                 both routers. Gradient flows through P only.
    z_loss       mean over tokens of logsumexp(logits)^2 (ST-MoE router z-loss; NemotronH and
                 DeepSeek-V3 train their sigmoid routers without it, hence the trainer's default
                 coefficient 0).
    expert_load  (E,) f_i above, no gradient; sums to 1 (0 without real tokens). Feed it to
                 `update_router_bias`.
    dropped_frac fraction of the T*k assignments dropped (capacity dispatch, or an
                 expert-parallel buffer smaller than the worst case); 0 for dropless.

Aux-loss-free balancing (DeepSeek-V3): after each step the trainer calls
    update_router_bias(moe, aux.expert_load, rate)
which does bias += rate * sign(mean(load) - load): under-loaded experts become likelier to be
chosen; the bias changes choice only, never the weights.

Dispatch (config.moe_dispatch): "dropless" sorts assignments by expert and runs
`grouped_matmul(impl=config.grouped_matmul)`; "capacity" runs one (E, capacity, d) batched
matmul and drops overflow (hybridjax.ops.moe_dispatch). Under a mesh (`jax.set_mesh`) whose
token axes or "tensor" axis hold several devices the dispatch runs per device under
`jax.shard_map`: with an "expert" axis larger than 1 the experts run expert-parallel with
all-to-all token exchange (dropless unless config.ep_capacity_factor bounds the buffers), and
with a "tensor" axis each device runs a slice of every expert's ffn, summed over "tensor"
(Megatron; hybridjax.layers.moe_parallel). The router and the aux statistics always see the
whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.mlp import MLP, activation, is_gated, linear
from hybridjax.layers.moe_parallel import routed_experts
from hybridjax.ops.remat_names import saved_kernel_output


class RouterBias(nnx.Variable):
    """The router's e_score_correction_bias: state, not a trainable parameter."""


class MoEAux(NamedTuple):
    lb_loss: jax.Array  # () load-balancing loss, E * sum f_i P_i
    z_loss: jax.Array  # () router z-loss, mean logsumexp(logits)^2
    expert_load: jax.Array  # (E,) fraction of routed assignments per expert
    dropped_frac: jax.Array  # () fraction of assignments dropped


class Routing(NamedTuple):
    logits: jax.Array  # (T, E) router dtype
    probs: jax.Array  # (T, E) per-token distribution used by the load-balancing loss
    expert_idx: jax.Array  # (T, k) int32
    weights: jax.Array  # (T, k) router dtype, normalised and scaled


def router_dtype(config: HybridConfig):
    """float32, or float64 when the model computes in float64 (tests)."""
    return jnp.promote_types(jnp.float32, jnp.dtype(config.dtype))


def route(
    logits_TE,
    bias_E,
    *,
    router: str,
    top_k: int,
    n_groups: int = 1,
    topk_groups: int = 1,
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> Routing:
    """Top-k routing from router logits (T, E), as NemotronHTopkRouter (module docstring)."""
    t, e = logits_TE.shape
    if router == "sigmoid":
        scores = jax.nn.sigmoid(logits_TE)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    elif router == "softmax":
        scores = probs = jax.nn.softmax(logits_TE, axis=-1)
    else:
        raise ValueError(f"router: {router!r} is not allowed; choose from 'sigmoid', 'softmax'")
    choice = jax.lax.stop_gradient(scores + bias_E.astype(scores.dtype))
    if n_groups > 1:
        grouped = choice.reshape(t, n_groups, e // n_groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, e // n_groups))[0], axis=-1)
        _, top_groups = jax.lax.top_k(group_scores, topk_groups)
        group_mask = jnp.any(top_groups[..., None] == jnp.arange(n_groups), axis=1)  # (T, G)
        choice = jnp.where(jnp.repeat(group_mask, e // n_groups, axis=1), choice, -jnp.inf)
    # Kept by the matmul-saving remat policies, so that the backward does not route again.
    expert_idx = saved_kernel_output(jax.lax.top_k(choice, top_k)[1].astype(jnp.int32))
    weights = jnp.take_along_axis(scores, expert_idx, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * scaling
    return Routing(logits_TE, probs, expert_idx, weights)


def token_mean(values_T, mask_T=None):
    """Mean over the leading (token) axis; with mask_T (T,) bool over the True tokens only
    (0 when there are none)."""
    if mask_T is None:
        return jnp.mean(values_T, axis=0)
    mask = mask_T.reshape(mask_T.shape + (1,) * (values_T.ndim - 1))
    return jnp.sum(jnp.where(mask, values_T, 0), axis=0) / jnp.maximum(jnp.sum(mask_T), 1).astype(
        values_T.dtype
    )


def expert_load(expert_idx_TK, n_experts: int, dtype=jnp.float32, mask_T=None):
    """(E,) fraction of the T*k assignments per expert, over the tokens of mask_T (T,) if given."""
    # A fused compare-and-sum rather than a scatter (bincount): safe on sharded tokens.
    hits = expert_idx_TK[..., None] == jnp.arange(n_experts, dtype=expert_idx_TK.dtype)
    return token_mean(jnp.sum(hits, axis=1, dtype=dtype), mask_T) / expert_idx_TK.shape[1]


def load_balancing_loss(probs_TE, expert_idx_TK, mask_T=None):
    """Switch-form E * sum_i f_i * P_i (f from the hard routing, gradient through P), over the
    tokens of mask_T (T,) if given."""
    e = probs_TE.shape[-1]
    f = jax.lax.stop_gradient(expert_load(expert_idx_TK, e, probs_TE.dtype, mask_T))
    return e * jnp.sum(f * token_mean(probs_TE, mask_T))


def z_loss(logits_TE, mask_T=None):
    """mean over tokens (those of mask_T (T,) if given) of logsumexp(logits)^2."""
    return token_mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)), mask_T)


def update_router_bias(target, expert_load_E, rate: float):
    """Aux-loss-free balancing step: bias += rate * sign(mean(load) - load) (DeepSeek-V3).

    target: an MoE module, its Router (`gate`), a RouterBias variable (updated in place), or a
    plain array. expert_load (..., E), e.g. MoEAux.expert_load, possibly stacked over layers
    (..., matching the bias). Returns the new bias value.
    """
    if isinstance(target, MoE):
        target = target.gate
    if isinstance(target, Router):
        target = target.e_score_correction_bias
    load = jnp.asarray(expert_load_E)
    step = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    if isinstance(target, nnx.Variable):
        target[...] = (target[...] + step).astype(target[...].dtype)
        return target[...]
    return (target + step).astype(jnp.asarray(target).dtype)


class Router(nnx.Module):
    """HF `gate`: weight (E, d_model) and the non-trainable e_score_correction_bias (E,)."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = jax.nn.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(
            init(rngs.params(), (config.n_experts, config.d_model), jnp.dtype(config.param_dtype))
        )
        self.e_score_correction_bias = RouterBias(
            jnp.zeros((config.n_experts,), router_dtype(config))
        )

    def __call__(self, x_TD) -> Routing:
        c = self.config
        dt = router_dtype(c)
        logits = jnp.dot(
            x_TD.astype(dt), self.weight[...].astype(dt).T, precision=jax.lax.Precision.HIGHEST
        )
        return route(
            logits,
            self.e_score_correction_bias[...],
            router=c.router,
            top_k=c.top_k,
            n_groups=c.router_groups,
            topk_groups=c.router_topk_groups,
            norm_topk_prob=c.norm_topk_prob,
            scaling=c.routed_scaling_factor,
        )


class Experts(nnx.Module):
    """HF `experts`: stacked expert weights, (in, out) per expert."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.act = config.expert_act
        self.act_fn = activation(config.expert_act)
        self.dtype = jnp.dtype(config.dtype)
        e, f = config.n_experts, config.moe_ffn
        d = config.moe_latent or config.d_model
        init = jax.nn.initializers.normal(config.initializer_range)
        pdt = jnp.dtype(config.param_dtype)
        self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), pdt))
        self.gate_proj = (
            nnx.Param(init(rngs.params(), (e, d, f), pdt)) if is_gated(config.expert_act) else None
        )
        self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), pdt))

    def weights(self) -> dict:
        """The stacked weights (leading expert axis) in compute dtype, by name."""
        w = {"up_proj": self.up_proj[...], "down_proj": self.down_proj[...]}
        if self.gate_proj is not None:
            w["gate_proj"] = self.gate_proj[...]
        return {k: v.astype(self.dtype) for k, v in w.items()}


class MoE(nnx.Module):
    """NemotronH MoE mixer. __call__(x (..., d_model)) -> (y (..., d_model), MoEAux).

    config.ep_capacity_factor: expert-parallel only. None (default) sizes the all-to-all buffers
    for the worst case, so expert parallelism drops nothing; a float f bounds each (source,
    destination) buffer to ceil(f * local_tokens * k / ep_size) rows (less memory and traffic) and
    reports what it drops, over all devices, in dropped_frac.
    """

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        if config.moe_latent:
            self.fc1_latent_proj = linear(config, config.d_model, config.moe_latent, rngs=rngs)
            self.fc2_latent_proj = linear(config, config.moe_latent, config.d_model, rngs=rngs)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.shared_experts = (
            MLP(config, rngs=rngs, d_ff=config.shared_ffn, act=config.expert_act)
            if config.shared_ffn > 0
            else None
        )

    def __call__(self, x, *, segment_ids=None, positions=None, token_mask=None):
        """x (..., d_model), token_mask (...) bool | None (module doc) -> (y (..., d_model) in
        config.dtype, MoEAux). segment_ids and positions are accepted for the mixer call
        contract and unused."""
        del segment_ids, positions
        c = self.config
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1]).astype(self.dtype)
        routing = self.gate(x_TD)
        h_TD = self.fc1_latent_proj(x_TD) if self.fc1_latent_proj is not None else x_TD
        k, e = c.top_k, c.n_experts
        mask_T = None if token_mask is None else token_mask.reshape(-1).astype(bool)
        expert_idx, weights = routing.expert_idx, routing.weights
        if mask_T is not None:  # padding goes to the sentinel expert e, which nothing runs
            expert_idx = jnp.where(mask_T[:, None], expert_idx, e)
            weights = jnp.where(mask_T[:, None], weights, 0)
        n_real = x_TD.shape[0] if mask_T is None else jnp.maximum(jnp.sum(mask_T), 1)

        routed, dropped = routed_experts(
            h_TD,
            expert_idx,
            weights,
            self.experts.weights(),
            act_fn=self.experts.act_fn,
            impl=c.grouped_matmul,
            dispatch=c.moe_dispatch,
            capacity_factor=c.capacity_factor,
            ep_capacity_factor=c.ep_capacity_factor,
        )
        routed = routed.astype(self.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        y = routed
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        aux = MoEAux(
            lb_loss=load_balancing_loss(routing.probs, expert_idx, mask_T),
            z_loss=z_loss(routing.logits, mask_T),
            expert_load=jax.lax.stop_gradient(expert_load(expert_idx, e, mask_T=mask_T)),
            dropped_frac=dropped.astype(jnp.float32) / (n_real * k),
        )
        return y.astype(self.dtype).reshape(shape), aux
