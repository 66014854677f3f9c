"""Dense MLP (NemotronH `NemotronHMLP`) and the activation table shared with the MoE experts.

    relu2 / silu / gelu:  down_proj(act(up_proj(x)))
    swiglu:               down_proj(silu(gate_proj(x)) * up_proj(x))

Parameters live in `config.param_dtype`; the matmuls run in `config.dtype`. Kernels are stored
(in, out) — the transpose of the torch `nn.Linear.weight` — and initialised as `transformers`
does for NemotronH: normal(0, initializer_range); no biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from hybridjax.config import ACTIVATIONS, HybridConfig
from hybridjax.layers.chunks import runs_in_chunks, token_chunked
from hybridjax.ops.remat_names import saved_kernel_output

# Activations whose MLP has a separate gate projection: act(gate_proj(x)) * up_proj(x).
GATED = frozenset({"swiglu"})


def _relu2(x):
    return jnp.square(jax.nn.relu(x))


def _gelu(x):
    # transformers ACT2FN["gelu"] is the exact (erf) GELU.
    return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS = {"relu2": _relu2, "silu": jax.nn.silu, "gelu": _gelu, "swiglu": jax.nn.silu}


def activation(name: str):
    """The elementwise nonlinearity for an activation name in HybridConfig.ACTIVATIONS.

    For the gated "swiglu" this is the function applied to the gate (silu); use `is_gated(name)`
    to know whether the MLP multiplies it by a separate up projection.
    """
    if name not in _ACTIVATIONS:
        allowed = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation: {name!r} is not allowed; choose from {allowed}")
    return _ACTIVATIONS[name]


def is_gated(name: str) -> bool:
    """True when the activation needs a gate projection (swiglu)."""
    activation(name)  # validates the name
    return name in GATED


def linear(
    config: HybridConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, std=None, kernel_init=None
) -> nnx.Linear:
    """An nn.Linear-like nnx.Linear without bias, in the config's dtypes; init normal(std)."""
    if kernel_init is None:
        kernel_init = jax.nn.initializers.normal(config.initializer_range if std is None else std)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=kernel_init,
        rngs=rngs,
    )


class Dense(nnx.Module):
    """A bias-free projection whose kernel keeps its axes' structure: (*in_shape, *out_shape).

    `Dense(kernel, n_in=k, dtype=...)(x)` contracts the last k axes of x with the first k of the
    kernel. Heads and groups stay axes of their own, so the sharding rules can split them whole.
    """

    def __init__(self, kernel, *, n_in: int = 1, dtype):
        self.kernel = nnx.Param(kernel)
        self.n_in = n_in
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x):
        return self._contract(x, self.kernel[...])

    def part(self, x, index: int):
        """The projection onto `kernel[..., index, ...]` (index into the first output axis) alone:
        one matmul over that slice of the kernel. Projections that are split right after (z and x
        of a Mamba mixer) run as one matmul per part, so neither the forward's output nor the
        backward's input gradient is sliced or summed in extra passes over memory."""
        kernel = lax.index_in_dim(self.kernel[...], index, axis=self.n_in, keepdims=False)
        return self._contract(x, kernel)

    def _contract(self, x, kernel):
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.n_in)


class MLP(nnx.Module):
    """Dense MLP. `d_ff` and `act` default to `config.ffn` and `config.mlp_act`.

    The MoE shared expert is `MLP(config, d_ff=config.shared_ffn, act=config.expert_act, rngs=...)`.
    Parameters: `up_proj.kernel (d_model, d_ff)`, `down_proj.kernel (d_ff, d_model)` and, for
    swiglu, `gate_proj.kernel (d_model, d_ff)`.
    """

    def __init__(
        self,
        config: HybridConfig,
        *,
        rngs: nnx.Rngs,
        d_ff: int | None = None,
        act: str | None = None,
    ):
        self.d_ff = config.ffn if d_ff is None else d_ff
        self.act = config.mlp_act if act is None else act
        if self.d_ff <= 0:
            raise ValueError(f"d_ff: must be > 0, got {self.d_ff!r}")
        self.act_fn = activation(self.act)
        self.dtype = jnp.dtype(config.dtype)
        if is_gated(self.act):
            self.gate_proj = linear(config, config.d_model, self.d_ff, rngs=rngs)
        else:
            self.gate_proj = None
        self.up_proj = linear(config, config.d_model, self.d_ff, rngs=rngs)
        self.down_proj = linear(config, self.d_ff, config.d_model, rngs=rngs)
        self.chunk_size = config.layer_chunk_size

    def __call__(self, x, *, segment_ids=None, positions=None, norm=None):
        """x (B, L, d_model) -> (B, L, d_model) in config.dtype. segment_ids/positions unused.
        `norm` (token-local, e.g. the block's RMSNorm) is applied to x first, inside each layer
        chunk, so that no normed copy of the whole row is formed or kept for the backward."""
        del segment_ids, positions
        apply = self._apply if norm is None else lambda x: self._apply(norm(x))
        if not runs_in_chunks(self.chunk_size, x.shape[-2]):
            return apply(x)
        return token_chunked(jax.checkpoint(apply), x, self.chunk_size)

    def _apply(self, x):
        x = x.astype(self.dtype)
        h = self.up_proj(x)
        if self.gate_proj is not None:
            h = self.act_fn(self.gate_proj(x)) * h
        else:
            h = self.act_fn(h)
        # Kept by the matmul-saving remat policies: the down projection's backward reads it.
        return self.down_proj(saved_kernel_output(h))
