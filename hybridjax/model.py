"""HybridLM: a layer pattern turned into a stack of pre-norm residual blocks.

Each letter of `HybridConfig.pattern` is one block `x + mixer(RMSNorm(x))` (M Mamba-2, 3 Mamba-3,
* attention, E MoE, - dense MLP), then a final `norm_f` and an untied (or tied) `lm_head` — the
NemotronH layout.

A pattern that repeats a shorter period (e.g. "M-M*" * 6) is built once per period and its
parameters are stacked over the repeats, so `nnx.scan` runs the stack and compile time does not
grow with depth. `remat` checkpoints each period ("full", "dots", "dots_no_batch"), each block
("block", "offload") or both ("nested"): per block, the backward pass holds one block's internals
at a time besides the block inputs, which is what long sequences need.

Losses do not need the (B, L, vocab) logits: `hidden` gives the final normed hidden states and
`head` the output projection, for the chunked losses of `hybridjax.ops.cross_entropy`.

State passing (truncated backpropagation through time): `hidden_from(states, tokens, ...)` runs a
chunk from the recurrent states the previous chunk of each row ended with (`init_states`: the
Mamba-2 and Mamba-3 layers' decode caches, stacked over repeats) and also returns the states
after it; attention layers see the chunk alone.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hybridjax.config import HybridConfig
from hybridjax.layers.attention import Attention
from hybridjax.layers.mamba2 import Mamba2Mixer
from hybridjax.layers.mamba3 import Mamba3Mixer, scan_chunk
from hybridjax.layers.mlp import MLP
from hybridjax.layers.moe import MoE, update_router_bias
from hybridjax.layers.norm import RMSNorm
from hybridjax.ops.cross_entropy import head_logits
from hybridjax.ops.remat_names import KERNEL_OUTPUT
from hybridjax.ops.segments import document_positions
from hybridjax.sharding import constrain_batch, replicate

log = logging.getLogger(__name__)

MIXERS = {"M": Mamba2Mixer, "3": Mamba3Mixer, "*": Attention, "E": MoE, "-": MLP}
# jax name scopes: profiles
SCOPES = {"M": "mamba2", "3": "mamba3", "*": "attention", "E": "moe", "-": "mlp"}
CACHED = ("M", "3", "*")  # letters whose mixers carry decode state
RECURRENT = ("M", "3")  # letters whose state `hidden_from` carries from chunk to chunk
# letters whose mixers apply the block's norm themselves, inside their layer chunks
PRENORM = ("M", "3", "-")

# `HybridConfig.remat` values that checkpoint each period, and their jax.checkpoint policies; the
# matmul-saving ones keep the tagged kernel outputs as well (hybridjax.ops.remat_names).
_KERNEL_OUTPUTS = jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUT)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _KERNEL_OUTPUTS
    ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _KERNEL_OUTPUTS
    ),
}
BLOCK_INPUT = "block_input"  # checkpoint_name of every block's input


class ModelAux(NamedTuple):
    """Auxiliary outputs of a forward pass (zeros when the pattern has no MoE layer)."""

    lb_loss: jax.Array  # load-balancing loss, mean over MoE layers
    z_loss: jax.Array  # router z-loss, mean over MoE layers
    expert_load: jax.Array  # (n_moe_layers, n_experts) fraction of routed slots per expert
    dropped_frac: jax.Array  # fraction of routed slots dropped (capacity mode), mean over layers


def dtype_of(name: str):
    return jnp.dtype(name)


def pattern_period(pattern: str) -> str:
    """The shortest string whose repeats make `pattern`."""
    n = len(pattern)
    for p in range(1, n + 1):
        if n % p == 0 and pattern[:p] * (n // p) == pattern:
            return pattern[:p]
    return pattern


def make_pattern(
    n_mixers: int,
    *,
    attn_every: int | None = None,
    attn_fraction: float | None = None,
    ffn: str = "",
) -> str:
    """A hybrid layer pattern from an SSM-to-attention ratio.

    `n_mixers` sequence-mixing layers, of which attention is either every `attn_every`-th layer or
    a fraction `attn_fraction` spread evenly (centred in equal groups); `ffn` ("E", "-" or "")
    is inserted after every mixer, as in NemotronH where MoE/MLP layers sit between mixers.
    """
    if n_mixers <= 0:
        raise ValueError(f"n_mixers: must be > 0, got {n_mixers}")
    if (attn_every is None) == (attn_fraction is None):
        raise ValueError("make_pattern: give exactly one of attn_every or attn_fraction")
    if ffn not in ("", "E", "-"):
        raise ValueError(f"ffn: {ffn!r} is not allowed; choose from '', 'E', '-'")
    if attn_every is not None:
        if attn_every <= 0:
            raise ValueError(f"attn_every: must be > 0, got {attn_every}")
        attn_at = {i for i in range(n_mixers) if (i + 1) % attn_every == 0}
    else:
        if not 0.0 <= attn_fraction <= 1.0:
            raise ValueError(f"attn_fraction: must be in [0, 1], got {attn_fraction}")
        k = round(attn_fraction * n_mixers)
        attn_at = {int((i + 0.5) * n_mixers / k) for i in range(k)}
    return "".join(("*" if i in attn_at else "M") + ffn for i in range(n_mixers))


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, letter: str, config: HybridConfig, *, rngs: nnx.Rngs):
        self.letter = letter
        self.norm = RMSNorm(
            config.d_model,
            eps=config.norm_eps,
            dtype=dtype_of(config.dtype),
            param_dtype=dtype_of(config.param_dtype),
        )
        self.mixer = MIXERS[letter](config, rngs=rngs)

    def __call__(self, x, segment_ids, positions, token_mask=None, state=None):
        """-> (output, MoE aux or None, recurrent state after x or None). `state`: the one a
        RECURRENT block starts from (`HybridLM.hidden_from`), None for a fresh sequence."""
        x = checkpoint_name(x, BLOCK_INPUT)  # what remat="offload" moves to host memory
        kw = {"token_mask": token_mask} if self.letter == "E" else {}
        if state is not None:
            kw["state"] = state
        with jax.named_scope(SCOPES[self.letter]):
            inputs = x
            if self.letter in PRENORM:  # the mixer normalises each layer chunk itself
                kw["norm"] = self.norm
            else:
                inputs = self.norm(x)
            y = self.mixer(inputs, segment_ids=segment_ids, positions=positions, **kw)
        aux = None
        if self.letter == "E":
            y, aux = y
        elif state is not None:
            y, state = y
        return x + y, aux, state

    def step(self, x, cache, prefill: bool):
        """Prefill (whole prompt) or decode (one token) through the block, updating its cache."""
        h = self.norm(x)
        if self.letter in CACHED:
            run = self.mixer.prefill if prefill else self.mixer.decode
            y, cache = run(h, cache)
        elif self.letter == "E":
            y, _ = self.mixer(h)
        else:
            y = self.mixer(h)
        return x + y, cache


class Period(nnx.Module):
    """One period of the pattern: its blocks in order."""

    def __init__(self, letters: str, config: HybridConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(c, config, rngs=rngs) for c in letters])

    def __call__(self, x, segment_ids, positions, token_mask=None, states=None, run_block=None):
        """-> (x, MoE auxs, states after x or None). `states`: one per block (None for blocks
        without one), or None. `run_block(block, x, segment_ids, positions, token_mask, state)`
        replaces `Block.__call__` (per-block remat); a default of None, not a function, as
        nnx.remat passes defaults to jax."""
        run_block = run_block or Block.__call__
        auxs, new_states = [], []
        for i, block in enumerate(self.blocks):
            state = None if states is None else states[i]
            x, aux, state = run_block(block, x, segment_ids, positions, token_mask, state)
            new_states.append(state)
            if aux is not None:
                auxs.append(aux)
        return x, tuple(auxs), None if states is None else tuple(new_states)

    def step(self, x, caches, prefill: bool):
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, cache, prefill)
            new.append(cache)
        return x, tuple(new)


class HybridLM(nnx.Module):
    """The hybrid language model: `model(tokens, segment_ids=None) -> logits (B, L, vocab)`.

    `model(tokens, return_aux=True)` also returns a `ModelAux` (MoE losses and load statistics).
    Training and eval use `hidden` and `head` instead, never forming the logits. `token_mask`
    (B, L) bool marks the real tokens (None: all); the MoE layers route no other token and leave
    them out of every statistic (`hybridjax.layers.moe.MoE`). The trainer masks padding.
    """

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        init = nnx.initializers.normal(config.initializer_range)
        self.embeddings = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            rngs=rngs,
        )
        self.period = pattern_period(config.pattern) if config.scan_layers else config.pattern
        self.repeats = config.n_layers // len(self.period)

        @nnx.split_rngs(splits=self.repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_periods(rngs):
            return Period(self.period, config, rngs=rngs)

        self.periods = make_periods(rngs)  # parameters stacked over the repeats (leading axis)
        self.norm_f = RMSNorm(
            config.d_model, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=init,
                rngs=rngs,
            )
        )

    # --- forward ----------------------------------------------------------------------------
    def __call__(self, tokens, segment_ids=None, *, token_mask=None, return_aux: bool = False):
        h, aux = self.hidden(tokens, segment_ids, token_mask=token_mask)
        logits = self.logits(h)
        return (logits, aux) if return_aux else logits

    def hidden(self, tokens, segment_ids=None, *, token_mask=None):
        """(final normed hidden states (B, L, d_model) in the compute dtype, ModelAux): the
        forward pass short of the output head. token_mask: see the class docstring."""
        h, aux, _ = self._hidden(tokens, segment_ids, token_mask, None)
        return h, aux

    def hidden_from(self, states, tokens, segment_ids=None, *, token_mask=None):
        """`hidden` continuing each row from `states` (`init_states`' structure): the Mamba-2 and
        Mamba-3 layers start from the state the row's previous chunk ended with (a new document
        in the chunk resets them, as always); attention sees this chunk alone.
        -> (hidden states, ModelAux, the states after this chunk)."""
        return self._hidden(tokens, segment_ids, token_mask, states)

    def init_states(self, batch: int):
        """Zero states for `hidden_from`: per block of the period the decode cache of RECURRENT
        blocks (Mamba-2: conv window and SSM state; Mamba-3: angle, SSM state, last k and v; all
        float32, float64 for a float64 model), None for the others; stacked over repeats like
        the parameters."""

        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(period):
            return tuple(
                b.mixer.init_cache(batch, None, b.mixer.acc_dtype)
                if b.letter in RECURRENT
                else None
                for b in period.blocks
            )

        return make(self.periods)

    def _hidden(self, tokens, segment_ids, token_mask, states):
        positions = document_positions(segment_ids, *tokens.shape)
        table = replicate(self.embeddings.embedding[...].astype(dtype_of(self.config.dtype)))
        x = constrain_batch(jnp.take(table, tokens, axis=0))
        run_period = _remat_period(self.config.remat)

        @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, 0), out_axes=(nnx.Carry, 0, 0))
        def run_stack(period, x, segment_ids, positions, token_mask, states):
            x, aux, states = run_period(period, x, segment_ids, positions, token_mask, states)
            return constrain_batch(x), aux, states

        x, auxs, states = run_stack(self.periods, x, segment_ids, positions, token_mask, states)
        return self.norm_f(x), self._collect_aux(auxs), states

    def head(self) -> tuple[jax.Array, bool]:
        """(weight, vocab_major): the output projection in the compute dtype, read in place by
        `head_logits` and the chunked losses: the lm_head kernel (d_model, vocab), or with tied
        embeddings the embedding table (vocab, d_model)."""
        dtype = dtype_of(self.config.dtype)
        if self.lm_head is None:
            return self.embeddings.embedding[...].astype(dtype), True
        return self.lm_head.kernel[...].astype(dtype), False

    def logits(self, h):
        """Final hidden states (..., d_model) -> logits (..., vocab) in >= float32."""
        weight, vocab_major = self.head()
        return head_logits(h, weight, vocab_major=vocab_major)

    def _collect_aux(self, auxs) -> ModelAux:
        """Per-period MoE aux (stacked over repeats) -> model totals in layer order."""
        if not auxs:
            zero = jnp.zeros((), jnp.float32)
            return ModelAux(zero, zero, jnp.zeros((0, self.config.n_experts), jnp.float32), zero)
        stack = lambda name: jnp.stack([getattr(a, name) for a in auxs], axis=1)  # (R, m, ...)
        load = stack("expert_load").reshape(-1, self.config.n_experts)
        return ModelAux(
            lb_loss=stack("lb_loss").mean(),
            z_loss=stack("z_loss").mean(),
            expert_load=load,
            dropped_frac=stack("dropped_frac").mean(),
        )

    def update_router_bias(self, expert_load, rate: float):
        """Aux-loss-free balancing: nudge each MoE router's bias toward under-loaded experts.

        `expert_load` is `ModelAux.expert_load` (n_moe_layers, n_experts), in layer order.
        """
        moe_slots = [j for j, c in enumerate(self.period) if c == "E"]
        load = expert_load.reshape(self.repeats, len(moe_slots), -1)
        for m, j in enumerate(moe_slots):
            update_router_bias(self.periods.blocks[j].mixer, load[:, m], rate)

    # --- decoding -----------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        """Per-layer decode state, stacked over repeats like the parameters."""
        dtype = dtype_of(self.config.dtype)

        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(period):
            return tuple(
                b.mixer.init_cache(batch, max_len, dtype) if b.letter in CACHED else None
                for b in period.blocks
            )

        return make(self.periods)

    def step(self, tokens, cache, *, prefill: bool):
        """Run a prompt (prefill) or one token per row (decode); returns logits and new cache."""
        x = self.embeddings(tokens)

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run_stack(period, x, caches):
            return period.step(x, caches, prefill)

        x, cache = run_stack(self.periods, x, cache)
        return self.logits(self.norm_f(x)), cache


def continue_states(states, continues):
    """The states a chunk starts from, given those its row's previous chunk ended with (`states`,
    `HybridLM.init_states`' structure): zero for rows whose chunk starts a new document
    (`continues` (B,) 0), as they were for the others (1); no gradient reaches the previous
    chunk (truncated backpropagation through time)."""

    def one(x):  # (repeats, B, ...): rows on axis 1
        keep = continues.astype(bool).reshape(1, -1, *(1,) * (x.ndim - 2))
        return jnp.where(keep, jax.lax.stop_gradient(x), jnp.zeros((), x.dtype))

    return jax.tree.map(one, states)


def _remat_period(remat: str):
    """`Period.__call__` under the rematerialisation `remat` (a HybridConfig.remat value)."""
    if remat == "none":
        return Period.__call__
    if remat in REMAT_POLICIES:
        return nnx.remat(Period.__call__, policy=REMAT_POLICIES[remat])
    policy = None  # "block": nothing inside a block is saved; its input is the residual
    if remat == "offload":
        if host_offload_supported():
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=(),
                names_which_can_be_offloaded=(BLOCK_INPUT,),
                offload_src="device",
                offload_dst="pinned_host",
            )
        else:
            log.warning(
                'remat="offload": the %s backend has no pinned_host memory; block '
                'inputs stay on the device (as remat="block")',
                jax.default_backend(),
            )
    run_block = nnx.remat(Block.__call__, policy=policy)

    def per_block(period, x, segment_ids, positions, token_mask=None, states=None):
        return Period.__call__(period, x, segment_ids, positions, token_mask, states, run_block)

    # "nested": the scan keeps one input per period; its backward recomputes the block inputs
    return nnx.remat(per_block) if remat == "nested" else per_block


def host_offload_supported() -> bool:
    """Whether the default device can offload to pinned host memory (jax memory kinds)."""
    return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())


# --- parameters as a flat name -> array map (export, inspection) --------------------------------
def flat_params(model: HybridLM) -> dict[str, np.ndarray]:
    """Every parameter (and the router bias) as "layers.{i}.<path>" -> array, in layer order."""
    flat = {}
    period = len(model.period)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        name = ".".join(str(p) for p in path)
        value = np.asarray(var.get_value())
        if path[0] != "periods":
            flat[name] = value
            continue
        j, rest = path[2], ".".join(str(p) for p in path[3:])  # periods.blocks.{j}.<rest>
        for r in range(model.repeats):
            flat[f"layers.{r * period + j}.{rest}"] = value[r]
    return flat


def load_flat_params(model: HybridLM, flat: dict[str, np.ndarray]) -> None:
    """Inverse of `flat_params`: set every variable of `model` from `flat` (shapes checked)."""
    expected = flat_params(model)
    missing, unexpected = expected.keys() - flat.keys(), flat.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"load_flat_params: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, value in flat.items():
        if np.shape(value) != expected[name].shape:
            raise ValueError(
                f"load_flat_params: {name} has shape {np.shape(value)}, "
                f"the model expects {expected[name].shape}"
            )
    period = len(model.period)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        name = ".".join(str(p) for p in path)
        if path[0] == "periods":
            j, rest = path[2], ".".join(str(p) for p in path[3:])
            value = np.stack(
                [flat[f"layers.{r * period + j}.{rest}"] for r in range(model.repeats)]
            )
        else:
            value = flat[name]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


# --- sizes --------------------------------------------------------------------------------------
def param_counts(config: HybridConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts; only top_k of n_experts routed experts are
    active per token. Computed from the abstract model, so it always matches the code."""
    model = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
    total = expert = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = int(np.prod(var.get_value().shape))
        total += size
        if "experts" in path:
            expert += size
    active = total - expert + expert * config.top_k // max(config.n_experts, 1)
    return total, active


def flops_per_token(config: HybridConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for the MFU estimate.

    6 x active matmul parameters (embedding lookup excluded, lm_head included), plus the
    sequence-mixing work: causal attention scores and values, the SSD chunked scan and the
    Mamba-3 chunked scan (per head, its (chunk x rank)^2 blocks of q.k and scores.v, and the
    chunk states in and out).
    """
    _, active = param_counts(config)
    # The embedding table is a lookup, not a matmul; a tied table is also the head's matmul.
    matmul = active if config.tie_embeddings else active - config.vocab_size * config.d_model
    n_attn, n_ssm = config.pattern.count("*"), config.pattern.count("M")
    attn = n_attn * 2 * 2 * config.attn_heads * config.head_dim * seq_len / 2  # causal QK^T, AV
    q = min(config.chunk_size, seq_len)
    h, p, n, g = config.mamba_heads, config.mamba_head_dim, config.ssm_state, config.n_groups
    ssd = n_ssm * 2 * (q * g * n + q * h * p + 2 * h * p * n)  # C.B^T, scores.x, states in/out
    q3, r = min(scan_chunk(config), seq_len), config.mamba3_mimo_rank if config.mamba3_mimo else 1
    m3 = config.pattern.count("3") * 2 * h * (q3 * r * r * (n + p) + 2 * r * p * n)
    return 6.0 * matmul + 3.0 * (attn + ssd + m3)
