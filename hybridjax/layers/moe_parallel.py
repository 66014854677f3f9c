"""The routed experts: local execution and the sharded / expert-parallel path.

`routed_experts(...)` is what `MoE` calls after routing. It picks:

* no mesh (or every token axis, "expert" and "tensor" of size 1): `local_experts` on all tokens.
* a mesh whose token axes ("data", "fsdp", "expert", "context", those present) hold more than
  one device, or whose "tensor" axis does: `jax.shard_map` over the mesh with tokens sharded over
  the token axes, so every sort, gather and scatter of the dispatch is device-local. Experts'
  stacked weights (E, ...) are sharded over "expert" when the mesh has it (an fsdp-sharded weight
  is gathered: FSDP).
* tensor parallelism (Megatron): with a "tensor" axis of size m > 1 that divides moe_ffn, up and
  gate (E, d, f) are split over "tensor" along f, and so is down (E, f, d). Tokens are replicated
  over "tensor"; each tensor shard runs its f/m slice of every expert MLP (relu2 and swiglu act
  elementwise on f) and the partial outputs are summed with `psum` over "tensor" once, on the
  combined (T, d) output. When m does not divide moe_ffn the weights stay whole and every tensor
  shard repeats the expert work.
* with an "expert" axis of size n > 1, device j owns experts [j E/n, (j+1) E/n) and each device
  exchanges tokens with `all_to_all` (expert parallelism):
    1. each (token, slot) assignment goes to the device owning its expert, packed into a send
       buffer (n, C, d): row block j goes to device j, in (expert, token) order;
    2. `all_to_all` over "expert" (received block i came from device i);
    3. received rows are sorted by local expert and run through the grouped-matmul expert MLP
       (padding rows sit past sum(group_sizes), so they give zero), un-sorted;
    4. `all_to_all` back; each assignment's output is gathered, weighted, summed over k.
  Static shapes come from the fixed buffer size C per (source, destination) pair:
    worst case (config.ep_capacity_factor None, the default): C = T_l * min(k, E/n) for T_l local
      tokens — a token's k experts are distinct, so at most min(k, E/n) of them live on one
      device. Nothing is dropped: expert parallelism is dropless, at n * min(k, E/n) / k times
      the routed activations in buffer memory and all-to-all traffic.
    ep_capacity_factor f: C = min(worst case, ceil(f * T_l * k / n)); assignments past C (in
      expert-then-token order per destination) are dropped. Every device counts its drops and
      the counts are summed over the mesh, so `MoEAux.dropped_frac` is the global fraction.

A token count that the token axes do not divide (e.g. decoding a small batch) runs with tokens
replicated (still tensor parallel) and without expert parallelism, or with it padded with tokens
routed to the sentinel expert n_experts, as `MoE` routes masked (padding) tokens: never sent, run
or counted.

Capacity dispatch under a mesh is applied per device on its local tokens (GShard's "groups"):
capacity = ceil(capacity_factor * T_l * k / E). It equals the single-device run only when the
batch is not split; dropless dispatch equals it always.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybridjax.ops import moe_dispatch
from hybridjax.ops.grouped_matmul import grouped_matmul
from hybridjax.sharding import BATCH_AXES, SEQUENCE_AXIS

# Mesh axes that split tokens: tokens are independent, so any data-like or sequence axis does.
TOKEN_AXES = (*BATCH_AXES, SEQUENCE_AXIS)


# ---------------------------------------------------------------------------------- expert MLP
def expert_mlp_grouped(weights: dict, x_AD, group_sizes, act_fn, impl: str):
    """The expert MLP over expert-contiguous rows (A, d) with grouped matmuls -> (A, d).

    weights: {"up_proj" (E, d, f), "down_proj" (E, f, d)[, "gate_proj" (E, d, f)]}.
    Rows past sum(group_sizes) give zero."""
    h = grouped_matmul(x_AD, weights["up_proj"], group_sizes, impl)
    if "gate_proj" in weights:
        h = act_fn(grouped_matmul(x_AD, weights["gate_proj"], group_sizes, impl)) * h
    else:
        h = act_fn(h)
    return grouped_matmul(h, weights["down_proj"], group_sizes, impl)


def expert_mlp_batched(weights: dict, x_ECD, act_fn):
    """The expert MLP on a capacity buffer (E, C, d) -> (E, C, d): batched matmuls."""
    h = jnp.einsum("ecd,edf->ecf", x_ECD, weights["up_proj"])
    if "gate_proj" in weights:
        h = act_fn(jnp.einsum("ecd,edf->ecf", x_ECD, weights["gate_proj"])) * h
    else:
        h = act_fn(h)
    return jnp.einsum("ecf,efd->ecd", h, weights["down_proj"])


# ------------------------------------------------------------------------------------ dispatch
def mesh_layout():
    """(mesh or None, token axes, token-axis device count, expert-axis size, tensor-axis size)
    of the abstract mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, (), 1, 1, 1
    size = mesh.shape
    token_axes = tuple(a for a in TOKEN_AXES if a in size)
    return (
        mesh,
        token_axes,
        math.prod(size[a] for a in token_axes),
        size.get("expert", 1),
        size.get("tensor", 1),
    )


def routed_experts(
    x_TD,
    expert_idx_TK,
    weights_TK,
    expert_weights: dict,
    *,
    act_fn,
    impl: str = "auto",
    dispatch: str = "dropless",
    capacity_factor: float = 1.25,
    ep_capacity_factor: float | None = None,
):
    """sum_k weights * expert_k(x): (T, d_out) in the promoted dtype, and the number of
    assignments dropped over all devices (() int32).

    x (T, d) tokens (already latent-projected); expert_idx, weights (T, k) from the router;
    expert_weights {name: (E, ...)} in compute dtype; act_fn the expert activation; impl the
    grouped matmul; dispatch "dropless" | "capacity"; ep_capacity_factor see the module doc.
    """
    mesh, token_axes, n_tok, n_ep, n_tp = mesh_layout()
    t, _k = expert_idx_TK.shape
    n_experts, _, ffn = expert_weights["up_proj"].shape
    kw = {
        "act_fn": act_fn,
        "impl": impl,
        "dispatch": dispatch,
        "capacity_factor": capacity_factor,
        "ep_capacity_factor": ep_capacity_factor,
        "n_ep": n_ep,
    }
    if n_ep > 1 and n_experts % n_ep:
        raise ValueError(
            f"n_experts: {n_experts} must be a multiple of the mesh's expert axis "
            f"({n_ep}) for expert parallelism"
        )
    tp = n_tp > 1 and ffn % n_tp == 0
    pad = -t % n_tok
    split = n_tok > 1 and (not pad or n_ep > 1)  # tokens split over the token axes
    if not split and not tp:  # nothing to split (or tokens that cannot be)
        out, dropped = local_experts(x_TD, expert_idx_TK, weights_TK, expert_weights, **kw)
        return out, dropped[0]
    if split and pad:  # expert parallel on a token count the token axes do not divide:
        # pad with tokens routed to the sentinel expert n_experts, which are never sent.
        x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
        expert_idx_TK = jnp.pad(expert_idx_TK, ((0, pad), (0, 0)), constant_values=n_experts)
        weights_TK = jnp.pad(weights_TK, ((0, pad), (0, 0)))

    def local(x, idx, w, ew):
        if not tp:
            return local_experts(x, idx, w, ew, **kw)
        # x varies over "tensor" from the start, so its gradient is summed over "tensor" once,
        # on (T_l, d), not on the larger dispatched rows where it meets the split weights.
        x = jax.lax.pcast(x, "tensor", to="varying")
        out, dropped = local_experts(x, idx, w, ew, **kw)
        return jax.lax.psum(out, "tensor"), dropped

    tok = P(token_axes) if split else P()
    ex = "expert" if n_ep > 1 else None
    f_axis = "tensor" if tp else None
    w_specs = {
        name: P(ex, f_axis, None) if name == "down_proj" else P(ex, None, f_axis)
        for name in expert_weights
    }
    specs = (tok, tok, tok, w_specs)
    explicit = all(a == jax.sharding.AxisType.Explicit for a in mesh.axis_types)
    args = (x_TD, expert_idx_TK, weights_TK, expert_weights)
    x_spec = jax.typeof(x_TD).sharding.spec if explicit else None
    args = jax.tree.map(lambda a, s: _constrain(a, s, explicit), args, specs)
    out, dropped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(tok, tok))(*args)
    out = out[:t]
    if explicit:  # hand the output back in the caller's layout
        out = jax.sharding.reshard(out, x_spec)
    return out, jnp.sum(dropped)


def _constrain(x, spec, explicit):
    """Put x in the layout shard_map expects: reshard on explicit meshes, a constraint else."""
    return jax.sharding.reshard(x, spec) if explicit else jax.lax.with_sharding_constraint(x, spec)


def local_experts(
    x_TD, idx_TK, w_TK, ew, *, act_fn, impl, dispatch, capacity_factor, ep_capacity_factor, n_ep
):
    """One device's routed experts (see the module doc). Returns (out (T, d), dropped (1,)).

    Assignments to the sentinel expert n_experts (padding, masked tokens; zero weight) run
    nowhere and are never counted as dropped: they sort after every real one, so they take no
    capacity, and their rows lie past the grouped matmul's groups or outside the buffer."""
    t, k = idx_TK.shape
    n_experts = next(iter(ew.values())).shape[0] * n_ep  # ew holds this device's experts
    capacity = (
        moe_dispatch.expert_capacity(t, k, n_experts, capacity_factor)
        if dispatch == "capacity"
        else None
    )
    real = idx_TK < n_experts
    if n_ep == 1:
        if dispatch == "capacity":
            x_ECD, plan = moe_dispatch.capacity_dispatch(x_TD, idx_TK, n_experts, capacity)
            y_ECD = expert_mlp_batched(ew, x_ECD, act_fn)
            out = moe_dispatch.capacity_combine(y_ECD, plan, w_TK)
            return out, jnp.sum(real & ~plan.keep).astype(jnp.int32).reshape(1)
        x_AD, plan = moe_dispatch.dropless_dispatch(x_TD, idx_TK, n_experts)
        y_AD = expert_mlp_grouped(ew, x_AD, plan.group_sizes, act_fn, impl)
        return moe_dispatch.dropless_combine(y_AD, plan, w_TK), jnp.zeros((1,), jnp.int32)

    e_local = n_experts // n_ep
    cap = t * min(k, e_local)
    real = real.reshape(-1)
    if capacity is not None:  # kept assignments per expert never exceed its capacity
        cap = min(cap, e_local * capacity)
        keep = moe_dispatch.capacity_plan(idx_TK, n_experts, capacity).keep.reshape(-1) & real
        dropped_cap = jnp.sum(real & ~keep)
    else:
        keep, dropped_cap = real, 0
    if ep_capacity_factor is not None:
        cap = min(cap, max(1, math.ceil(ep_capacity_factor * t * k / n_ep)))
    out, dropped = _exchange(
        x_TD, idx_TK, w_TK, keep, ew, n=n_ep, e_local=e_local, cap=cap, act_fn=act_fn, impl=impl
    )
    return out, dropped + dropped_cap


def _exchange(x_TD, idx_TK, w_TK, keep_A, ew, *, n, e_local, cap, act_fn, impl):
    """Expert-parallel all-to-all round trip (steps 1-4 of the module doc)."""
    t, d = x_TD.shape
    k = idx_TK.shape[1]
    a = t * k
    flat_e = idx_TK.reshape(-1).astype(jnp.int32)
    dest = flat_e // e_local
    # Rank within destination in (expert, token) order; assignments not sent sort last.
    order = jnp.argsort(jnp.where(keep_A, flat_e, n * e_local), stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(a, dtype=order.dtype))
    per_dest = jnp.bincount(jnp.where(keep_A, dest, n), length=n + 1)
    pos = rank - (jnp.cumsum(per_dest) - per_dest)[dest]
    ok = keep_A & (pos < cap)
    slot = jnp.where(ok, dest * cap + pos, n * cap)  # n * cap: not sent
    # Buffer row -> assignment (a = empty row).
    src = (
        jnp.full((n * cap,), a, jnp.int32).at[slot].set(jnp.arange(a, dtype=jnp.int32), mode="drop")
    )
    filled = src < a
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])
    send_x = x_pad[jnp.where(filled, src // k, t)].reshape(n, cap, d)
    row_dest = jnp.arange(n * cap, dtype=jnp.int32) // cap
    flat_e_pad = jnp.concatenate([flat_e, jnp.zeros((1,), jnp.int32)])
    send_e = jnp.where(filled, flat_e_pad[src] - row_dest * e_local, e_local).reshape(n, cap)

    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)

    # Local experts: sort received rows by local expert; padding (id e_local) goes last.
    le = recv_e.reshape(-1)
    order = jnp.argsort(le, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * cap, dtype=order.dtype))
    group_sizes = jnp.bincount(le, length=e_local + 1)[:e_local].astype(jnp.int32)
    y_sorted = expert_mlp_grouped(ew, recv_x.reshape(n * cap, d)[order], group_sizes, act_fn, impl)
    y_recv = y_sorted[inverse].reshape(n, cap, -1)

    y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0, tiled=True)
    d_out = y_back.shape[-1]
    y_flat = jnp.concatenate([y_back.reshape(n * cap, d_out), jnp.zeros((1, d_out), y_back.dtype)])
    out = moe_dispatch.weighted_sum(y_flat[slot].reshape(t, k, d_out), w_TK)
    return out, jnp.sum(keep_A & ~ok).astype(jnp.int32).reshape(1)
