"""MoE token dispatch: routed (token, slot) pairs -> expert-contiguous rows -> back, weighted.

Two schemes, both pure functions of the routing (`expert_idx_TK`: each token's k distinct experts):

dropless (default)
    `dropless_dispatch` flattens the T*k assignments, stable-sorts them by expert and gathers the
    token rows into that order (A = T*k rows, expert e's rows contiguous, `group_sizes[e]` of
    them) for one grouped matmul per expert weight; `dropless_combine` gathers the expert outputs
    back to (T, k), multiplies by the routing weights and sums over k. Nothing is dropped.

capacity
    Each expert takes at most `capacity = ceil(capacity_factor * T * k / E)` rows.
    `capacity_dispatch` gives every assignment a slot in an (E, capacity, D) buffer; when an
    expert is over capacity, assignments are kept in priority order *slot first, then token*:
    every token's first choice (s = 0) in token order, then every second choice, and so on
    (GShard-style: a top-1 choice never loses its place to someone's top-2 choice). Assignments
    past the capacity are dropped: they contribute zero (the shared expert, applied by the
    layer, still reaches the token). `capacity_combine` gathers the (E, capacity, D) outputs back.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybridjax.ops.remat_names import saved_kernel_output
from hybridjax.ops.varying import same_varying_axes


class DroplessPlan(NamedTuple):
    order: jax.Array  # (A,) flat assignment index (t * k + s) of each sorted row
    inverse: jax.Array  # (A,) sorted row of each flat assignment
    group_sizes: jax.Array  # (E,) int32 rows per expert
    top_k: int


class CapacityPlan(NamedTuple):
    slot: jax.Array  # (T, k) int32 row of the flattened (E * capacity) buffer; E*capacity = dropped
    keep: jax.Array  # (T, k) bool: the assignment got a slot
    capacity: int


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * tokens * top_k / n_experts): rows each expert takes (>= 1)."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def rank_within_groups(keys, n_groups: int):
    """For each element of keys (N,) in [0, n_groups]: its rank among equal keys, in order of
    appearance (a stable sort), and the count per key in [0, n_groups). Key n_groups = ignored."""
    order = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(keys.shape[0], dtype=order.dtype))
    counts = jnp.bincount(keys, length=n_groups + 1).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    return (inverse - starts[keys]).astype(jnp.int32), counts[:n_groups]


# ------------------------------------------------------------------------------------ dropless
def dropless_dispatch(x_TD, expert_idx_TK, n_experts: int):
    """x (T, D), expert_idx (T, k) -> rows (T*k, D) sorted by expert, DroplessPlan."""
    t, k = expert_idx_TK.shape
    flat = expert_idx_TK.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    # Kept by the matmul-saving remat policies: the backward needs the rows (the up and gate
    # weight gradients) and the permutations, which would cost a second sort and gather.
    order, inverse, group_sizes = map(saved_kernel_output, (order, inverse, group_sizes))
    plan = DroplessPlan(order, inverse, group_sizes, k)
    return saved_kernel_output(_sort_rows(x_TD, order, inverse, k)), plan


def dropless_combine(y_AD, plan: DroplessPlan, weights_TK):
    """Sorted expert outputs (T*k, D) -> sum_k weights * output: (T, D) in the promoted dtype."""
    y_AD, weights_TK = same_varying_axes(y_AD, weights_TK)
    return _combine_rows(y_AD, plan.order, plan.inverse, weights_TK)


# Both directions are gathers, forward and backward: autodiff would transpose each gather into a
# scatter-add over (T*k, D) rows, which GPUs serialise on colliding rows; the plan already holds
# the inverse permutation that turns each backward into a gather.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sort_rows(x_TD, order, inverse, k: int):
    """x (T, D) -> (T*k, D): row a is token order[a] // k."""
    return x_TD[order // k]


def _sort_rows_fwd(x_TD, order, inverse, k):
    return x_TD[order // k], inverse  # the backward needs the inverse permutation alone


def _sort_rows_bwd(k, inverse, dy_AD):
    dx = dy_AD[inverse].reshape(-1, k, dy_AD.shape[-1])  # each token's k copies
    dx = dx.sum(1, dtype=jnp.promote_types(dy_AD.dtype, jnp.float32)).astype(dy_AD.dtype)
    return dx, None, None


_sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


# Gather and weighted sum in one expression each way, so XLA may fuse them and need not form the
# (T, k, D) unsorted outputs (403 MB a layer at the MoE preset), which the backward no longer
# keeps; autodiff would also turn the gather into a scatter-add.
@jax.custom_vjp
def _combine_rows(y_AD, order, inverse, weights_TK):
    """out[t] = sum_s weights[t, s] * y[inverse[t * k + s]]."""
    return weighted_sum(_unsorted(y_AD, inverse, weights_TK.shape[1]), weights_TK)


def _unsorted(y_AD, inverse, k):
    return y_AD[inverse].reshape(-1, k, y_AD.shape[-1])


def _combine_rows_fwd(y_AD, order, inverse, weights_TK):
    return _combine_rows(y_AD, order, inverse, weights_TK), (y_AD, order, inverse, weights_TK)


def _combine_rows_bwd(res, d_out_TD):
    y_AD, order, inverse, weights_TK = res
    k = weights_TK.shape[1]
    dtype = d_out_TD.dtype
    # d weights[t, s] = <d_out[t], y[inverse[t * k + s]]>; d y[a] = weights * d_out at a's token
    d_weights = jnp.sum(_unsorted(y_AD, inverse, k).astype(dtype) * d_out_TD[:, None], axis=-1)
    w_A = weights_TK.reshape(-1)[order].astype(dtype)
    d_y = (d_out_TD[order // k] * w_A[:, None]).astype(y_AD.dtype)
    return d_y, None, None, d_weights.astype(weights_TK.dtype)


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def weighted_sum(y_TKD, weights_TK):
    """sum_k weights * y: (T, D) in the promoted dtype. A product and a sum, which XLA can fuse
    with the gather that forms y; as an einsum it would be a batched matmul of width one."""
    dtype = jnp.promote_types(y_TKD.dtype, weights_TK.dtype)
    return jnp.sum(y_TKD.astype(dtype) * weights_TK[..., None].astype(dtype), axis=1)


# ------------------------------------------------------------------------------------ capacity
def capacity_plan(expert_idx_TK, n_experts: int, capacity: int) -> CapacityPlan:
    """Slots in the (E, capacity) buffer; priority slot-major then token order (module doc)."""
    t, k = expert_idx_TK.shape
    flat_sm = expert_idx_TK.T.reshape(-1).astype(jnp.int32)  # slot-major: j = s * T + t
    pos, _ = rank_within_groups(flat_sm, n_experts)
    keep = pos < capacity
    slot = jnp.where(keep, flat_sm * capacity + pos, n_experts * capacity)
    return CapacityPlan(slot.reshape(k, t).T, keep.reshape(k, t).T, capacity)


def capacity_dispatch(x_TD, expert_idx_TK, n_experts: int, capacity: int):
    """x (T, D) -> buffer (E, capacity, D) (empty rows zero), CapacityPlan."""
    t, d = x_TD.shape
    plan = capacity_plan(expert_idx_TK, n_experts, capacity)
    k = expert_idx_TK.shape[1]
    token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
    # Inverse map buffer row -> token (t = the zero pad row): a gather forward and backward.
    src = (
        jnp.full((n_experts * capacity,), t, jnp.int32)
        .at[plan.slot.reshape(-1)]
        .set(token.reshape(-1), mode="drop")
    )
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])
    return x_pad[src].reshape(n_experts, capacity, d), plan


def capacity_combine(y_ECD, plan: CapacityPlan, weights_TK):
    """Buffer outputs (E, capacity, D) -> (T, D); dropped assignments contribute zero."""
    e, c, d = y_ECD.shape
    y_flat = jnp.concatenate([y_ECD.reshape(e * c, d), jnp.zeros((1, d), y_ECD.dtype)])
    return weighted_sum(y_flat[plan.slot], weights_TK)
