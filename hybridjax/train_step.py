"""The train state and the jitted train and eval steps.

The state is a plain pytree (pure dicts of arrays, optax's state, a step counter and a raw PRNG
key), so orbax saves and restores it exactly and `nnx.merge` rebuilds the model inside the step.
Only `nnx.Param` leaves are optimised; other model variables (the MoE routers' correction biases)
are carried in `model_state` and changed only by the aux-loss-free bias update.

Loss = masked cross-entropy + lb_coef * load-balancing loss + z_coef * router z-loss. The
cross-entropy never forms the (B, L, vocab) logits: `hybridjax.ops.cross_entropy` takes the final
hidden states through the head `config.loss_chunk_size` tokens at a time (logits in float32, or
float64 for a float64 model). The train step takes the masked sum (`masked_loss_sum_from`),
whose gradient is formed chunk by chunk in the forward pass, so each chunk's logits are computed
once; `token_losses` gives per-token losses, and the eval step computes only the answer
positions. Padding (segment id 0) is neither routed to experts nor counted in the MoE losses and
load statistics (`real_tokens`), so a short MQAR row's padding does not steer the router bias.

With `grad_accum` > 1 the batch is split into micro-batches that a `lax.scan` runs one after
another, summing gradients; each micro-batch's cross-entropy is divided by the whole batch's
token count, so the summed gradient equals the whole batch's.

State passing (`trainer.state_passing`, truncated BPTT): `TrainState.carry` holds, per training
length ("seq_len=<L>"), the recurrent states each batch row ended its last chunk with
(`HybridLM.init_states`, float32, rows split like the batch's). The step starts every row from
its carried state, zeroed where the batch's "continues" is 0 (the row starts a new document) and
cut from the gradient (`hybridjax.model.continue_states`), and carries the states after the
chunk to the next step of that length. The carry is part of the state, so checkpoints keep it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.model import HybridLM, continue_states
from hybridjax.ops.cross_entropy import (
    chunked_answer_losses,
    chunked_cross_entropy,
    chunked_cross_entropy_sum,
)

MODEL_INPUTS = ("tokens", "targets", "loss_mask", "segment_ids", "continues")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of the model's nnx.Param values (master dtype)
    model_state: Any  # pure dict of the other model variables (router biases)
    opt_state: Any
    rng: jax.Array  # uint32[2], split once per step (for stochastic layers)
    carry: Any = None  # state passing: {"seq_len=<L>": recurrent states per row}, else None


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


def carry_key(seq_len: int) -> str:
    """The name of one training length's carried states in `TrainState.carry`."""
    return f"seq_len={seq_len}"


def init_carry(graphdef, state: TrainState, shapes, mesh=None) -> dict:
    """Zero carried states for state passing: {carry_key(L): states of B rows} for each
    (seq_len L, batch_size B) of `shapes`; on a `mesh` the rows are split like a batch's."""
    from jax.sharding import NamedSharding, PartitionSpec

    def zeros(batch):
        model = nnx.merge(graphdef, state.params, state.model_state)
        return model.init_states(batch)

    rows = None  # (repeats, B, ...): rows split over the mesh's batch axes
    if mesh is not None:
        from hybridjax.sharding import batch_axes

        rows = NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh)))
    carry = {}
    for seq_len, batch in shapes:
        abstract = jax.eval_shape(functools.partial(zeros, batch))
        shardings = None if rows is None else jax.tree.map(lambda _: rows, abstract)
        make = functools.partial(jax.tree.map, lambda x: jnp.zeros(x.shape, x.dtype), abstract)
        carry[carry_key(seq_len)] = jax.jit(make, out_shardings=shardings)()
    return carry


def batch_shardings(mesh, batch: dict) -> dict:
    """{key: sharding} of a batch on `mesh`: (B, L, ...) arrays by `batch_sharding` (rows and
    sequence), per-row (B,) arrays ("continues", "bucket") by rows alone."""
    from jax.sharding import NamedSharding, PartitionSpec

    from hybridjax.sharding import batch_axes, batch_sharding

    rows = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    return {k: rows if jnp.ndim(v) == 1 else batch_sharding(mesh) for k, v in batch.items()}


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
    h, head, aux, _, how = _hidden_from(graphdef, params, model_state, batch, None)
    with jax.named_scope("loss"):
        return chunked_cross_entropy(h, head, batch["targets"], **how), aux


def masked_loss_sum_from(graphdef, params, model_state, batch, states):
    """sum(loss_mask * cross-entropy) over the batch -> (that sum, ModelAux, the states after the
    batch or None). With state passing each row starts from `states` (None: a fresh sequence),
    zeroed where batch["continues"] is 0 and cut from the gradient. The gradient is formed in
    the forward pass (`chunked_cross_entropy_sum`), so the head's matmul runs once."""
    h, head, aux, states, how = _hidden_from(graphdef, params, model_state, batch, states)
    mask = batch["loss_mask"].astype(jnp.float32)
    with jax.named_scope("loss"):
        ce_sum = chunked_cross_entropy_sum(h, head, batch["targets"], mask, **how)
    return ce_sum, aux, states


def _hidden_from(graphdef, params, model_state, batch, states):
    """The model up to its head, for the losses: -> (final hidden states, head, ModelAux, the
    states after the batch or None, the chunked losses' keywords (vocab_major, chunk_size))."""
    model = nnx.merge(graphdef, params, model_state)
    inputs = (batch["tokens"], batch.get("segment_ids"))
    if states is None:
        h, aux = model.hidden(*inputs, token_mask=real_tokens(batch))
    else:
        states = continue_states(states, batch["continues"])
        h, aux, states = model.hidden_from(states, *inputs, token_mask=real_tokens(batch))
        states = jax.lax.stop_gradient(states)
    head, vocab_major = model.head()
    how = {"vocab_major": vocab_major, "chunk_size": model.config.loss_chunk_size}
    return h, head, aux, states, how


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

    def micro_loss(params, model_state, micro, total_tokens, states):
        ce_sum, aux, states = masked_loss_sum_from(graphdef, params, model_state, micro, states)
        loss = ce_sum / total_tokens + (lb_coef * aux.lb_loss + z_coef * aux.z_loss) / grad_accum
        return loss, (ce_sum, aux, states)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict):
        batch = model_batch(batch)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        key = carry_key(batch["tokens"].shape[1])
        states = None if state.carry is None else state.carry[key]
        if grad_accum == 1:
            grads, (ce_sum, aux, states) = grad_fn(
                state.params, state.model_state, batch, total_tokens, states
            )
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )
            micro_states = jax.tree.map(_split_rows(grad_accum), states)

            def accumulate(carry, xs):
                mb, ms = xs
                g, (c, a, ms) = grad_fn(state.params, state.model_state, mb, total_tokens, ms)
                carry = jax.tree.map(jnp.add, carry, (g, c, a))
                return carry, ms

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(
                    grad_fn,
                    state.params,
                    state.model_state,
                    jax.tree.map(lambda x: x[0], micro),
                    total_tokens,
                    jax.tree.map(lambda x: x[0], micro_states),
                ),
            )
            (grads, ce_sum, aux), micro_states = jax.lax.scan(
                accumulate, (zeros[0], *zeros[1][:2]), (micro, micro_states)
            )
            states = jax.tree.map(_join_rows, micro_states)
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
            carry=None if state.carry is None else {**state.carry, key: states},
        )
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    from jax.sharding import NamedSharding, PartitionSpec

    from hybridjax.sharding import batch_axes, batch_sharding

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_in = batch_sharding(mesh)
    if state.carry is not None:  # state passing: batches have "continues" (B,) too
        rows = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
        batch_in = {k: rows if k == "continues" else batch_in for k in MODEL_INPUTS}
    return jax.jit(
        step,
        donate_argnums=donate_argnums,
        in_shardings=(state_shardings, batch_in),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
    )


def _split_rows(n: int):
    """(repeats, B, ...) -> (n, repeats, B / n, ...): carried states per micro-batch."""

    def split(x):
        x = x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    return split


def _join_rows(x):
    """Inverse of `_split_rows`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


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
