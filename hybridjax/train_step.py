"""The train state and the jitted train and eval steps.

The state is a plain pytree (pure dicts of arrays, optax's state, a step counter and a raw PRNG
key), so orbax saves and restores it exactly and `nnx.merge` rebuilds the model inside the step.
Only `nnx.Param` leaves are optimised; other model variables (the MoE routers' correction biases)
are carried in `model_state` and changed only by the aux-loss-free bias update.

Loss = masked cross-entropy + lb_coef * load-balancing loss + z_coef * router z-loss. The
cross-entropy never forms the (B, L, vocab) logits: `hybridjax.ops.cross_entropy` takes the final
hidden states through the head `config.loss_chunk_size` tokens at a time (logits in float32, or
float64 for a float64 model), and the eval step computes only the answer positions. Padding
(segment id 0) is neither routed to experts nor counted in the MoE losses and load statistics
(`real_tokens`), so a short MQAR row's padding does not steer the router bias.

With `grad_accum` > 1 the batch is split into micro-batches that a `lax.scan` runs one after
another, summing gradients; each micro-batch's cross-entropy is divided by the whole batch's
token count, so the summed gradient equals the whole batch's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.model import HybridLM
from hybridjax.ops.cross_entropy import chunked_answer_losses, chunked_cross_entropy

MODEL_INPUTS = ("tokens", "targets", "loss_mask", "segment_ids")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of the model's nnx.Param values (master dtype)
    model_state: Any  # pure dict of the other model variables (router biases)
    opt_state: Any
    rng: jax.Array  # uint32[2], split once per step (for stochastic layers)


def init_model(config: HybridConfig, seed: int):
    """(graphdef, params, model_state): a fresh model, split into its static graph and pure
    dicts."""
    model = HybridLM(config, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(config: HybridConfig, tx: optax.GradientTransformation, seed: int, mesh=None):
    """(graphdef, TrainState) at step 0. On a `mesh` the state is created inside one jit whose
    outputs are laid out by `hybridjax.sharding` (parameters and optimizer moments split as the
    rules say, the rest replicated), so no device ever holds the whole unsharded state."""

    def fresh():
        _, params, model_state = init_model(config, seed)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed + 1),
        )

    graphdef = nnx.split(
        nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(seed))), nnx.Param, ...
    )[0]
    if mesh is None:
        return graphdef, fresh()
    from hybridjax.sharding import tree_shardings, warn_placement

    abstract = jax.eval_shape(fresh)
    warn_placement(abstract.params, mesh)
    return graphdef, jax.jit(fresh, out_shardings=tree_shardings(abstract, mesh))()


def model_batch(batch: dict) -> dict:
    """The arrays the model and loss read (drops e.g. the eval-only "bucket")."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def real_tokens(batch: dict):
    """(B, L) bool: the tokens that are not padding (segment id > 0, the data pipeline's
    contract), or None for a batch without segment_ids. The MoE layers route and count only
    these."""
    segment_ids = batch.get("segment_ids")
    return None if segment_ids is None else segment_ids > 0


def token_losses(graphdef, params, model_state, batch):
    """(per-token cross-entropy (B, L) in >= float32, ModelAux), chunk by chunk over tokens."""
    model = nnx.merge(graphdef, params, model_state)
    h, aux = model.hidden(
        batch["tokens"], segment_ids=batch.get("segment_ids"), token_mask=real_tokens(batch)
    )
    head, vocab_major = model.head()
    with jax.named_scope("loss"):
        ce = chunked_cross_entropy(
            h,
            head,
            batch["targets"],
            vocab_major=vocab_major,
            chunk_size=model.config.loss_chunk_size,
        )
    return ce, aux


def make_train_step(
    graphdef,
    tx,
    schedule,
    *,
    lb_coef: float,
    z_coef: float,
    router_bias_rate: float,
    grad_accum: int = 1,
    has_moe: bool = False,
    donate: bool = False,
    mesh=None,
    state: TrainState | None = None,
):
    """A jitted `step(state, batch) -> (state, metrics)` (metrics: dict of device scalars).

    On a `mesh`, the step's inputs and outputs are pinned: the state keeps the layout of `state`
    (from `init_state`), batches are split by `batch_sharding`, metrics are replicated.
    """

    def micro_loss(params, model_state, micro, total_tokens):
        ce, aux = token_losses(graphdef, params, model_state, micro)
        mask = micro["loss_mask"].astype(jnp.float32)
        ce_sum = jnp.sum(ce * mask)
        loss = ce_sum / total_tokens + (lb_coef * aux.lb_loss + z_coef * aux.z_loss) / grad_accum
        return loss, (ce_sum, aux)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict):
        batch = model_batch(batch)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if grad_accum == 1:
            grads, (ce_sum, aux) = grad_fn(state.params, state.model_state, batch, total_tokens)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def accumulate(carry, mb):
                g, (c, a) = grad_fn(state.params, state.model_state, mb, total_tokens)
                carry = jax.tree.map(jnp.add, carry, (g, c, a))
                return carry, None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(
                    grad_fn,
                    state.params,
                    state.model_state,
                    jax.tree.map(lambda x: x[0], micro),
                    total_tokens,
                ),
            )
            (grads, ce_sum, aux), _ = jax.lax.scan(accumulate, (zeros[0], *zeros[1]), micro)
            aux = jax.tree.map(lambda x: x / grad_accum, aux)  # sums of means -> means

        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        model_state = state.model_state
        if has_moe and router_bias_rate > 0:
            model = nnx.merge(graphdef, params, model_state)
            model.update_router_bias(aux.expert_load, router_bias_rate)
            model_state = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        rng, _ = jax.random.split(state.rng)

        ce_mean = ce_sum / total_tokens
        metrics = {
            "loss": ce_mean + lb_coef * aux.lb_loss + z_coef * aux.z_loss,
            "ce": ce_mean,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": total_tokens,
        }
        if has_moe:
            metrics.update(moe_stats(aux))
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=rng,
        )
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    from jax.sharding import NamedSharding, PartitionSpec

    from hybridjax.sharding import batch_sharding

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        step,
        donate_argnums=donate_argnums,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
    )


def moe_stats(aux) -> dict:
    """Load statistics of the MoE layers: per-layer max and min expert load relative to uniform
    (1.0 = perfectly balanced), averaged over layers; losses; dropped fraction."""
    n_experts = aux.expert_load.shape[-1]
    relative = aux.expert_load * n_experts
    return {
        "moe/lb_loss": aux.lb_loss,
        "moe/z_loss": aux.z_loss,
        "moe/load_max": jnp.mean(jnp.max(relative, axis=-1)),
        "moe/load_min": jnp.mean(jnp.min(relative, axis=-1)),
        "moe/dropped_frac": aux.dropped_frac,
    }


def make_eval_step(graphdef, num_buckets: int = 1):
    """A jitted `eval_step(params, model_state, batch) -> sums` over answer positions (loss_mask):
    {"loss_sum", "weight_sum"} (cross-entropy) and {"correct", "total"} (num_buckets,) per
    difficulty bucket (argmax prediction == target), the inputs of hybridjax.eval's metrics.
    Only the answer positions go through the head, chunk by chunk."""
    from hybridjax.eval import loss_sums, recall_counts

    @jax.jit
    def eval_step(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state)
        h, _ = model.hidden(
            batch["tokens"], segment_ids=batch.get("segment_ids"), token_mask=real_tokens(batch)
        )
        head, vocab_major = model.head()
        ce, predictions = chunked_answer_losses(
            h,
            head,
            batch["targets"],
            batch["loss_mask"],
            vocab_major=vocab_major,
            chunk_size=model.config.loss_chunk_size,
        )
        loss_sum, weight_sum = loss_sums(ce, batch["loss_mask"])
        correct, total = recall_counts(predictions, batch, num_buckets)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct, "total": total}

    return eval_step
