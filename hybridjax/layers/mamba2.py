"""Mamba-2 mixer (transformers `NemotronHMamba2Mixer` semantics, so export is exact).

    in_proj(x) -> [z (d_inner) | xBC (d_inner + 2*G*N) | dt (H)]
    xBC = silu(causal depthwise conv1d(xBC))           kernel conv_kernel, with bias
    x, B, C = split(xBC, [d_inner, G*N, G*N])          head h reads group h // (H/G)
    dt = softplus(dt + dt_bias), clamped below at time_step_min when config.clamp_dt
    A = -exp(A_log)
    y = ssd(x, dt, A, B, C, D=D, ...)                  y includes D * x
    y = rmsnorm(y * silu(z)) over groups of d_inner / G, times norm.weight
    out = out_proj(y)

Parameters (torch name in brackets; nnx kernels are (in, out) = torch weight transposed):
  in_proj.kernel (d_model, 2*d_inner + 2*G*N + H)   [in_proj.weight]
  conv1d.kernel (conv_kernel, conv_dim), conv1d.bias (conv_dim,)   [conv1d.weight (C,1,K), .bias]
  dt_bias (H,), A_log (H,), D (H,)                  [same names; no weight decay]
  norm.weight (d_inner,)                            [norm.weight; no weight decay]
  out_proj.kernel (d_inner, d_model)                [out_proj.weight]

Init (transformers NemotronH `_init_weights`, except A and the conv — see below):
  in_proj ~ normal(0, initializer_range);
  conv1d kernel and bias ~ U(-1/sqrt(K), 1/sqrt(K)), K = conv_kernel: torch's own Conv1d init
    (depthwise, fan_in = K), which mamba_ssm keeps. transformers 5 re-draws the kernel from
    normal(0, initializer_range) with bias 0 instead; then x, B and C leave the conv at ~3e-3
    rms (d_model 64), a token beyond the conv window reaches the output with ~1e-6 of the
    current token's gain instead of ~5e-4 (test_state_path_is_live_at_init), and the binding
    that MQAR needs (B from the key one step back in the conv window, C from the query key) has
    almost no gradient: a pure Mamba-2 stack stays on the plateau where it knows which values
    occur but not their keys (accuracy ~ 1/pairs) for thousands of steps;
  out_proj ~ U(-1/sqrt(d_inner), 1/sqrt(d_inner)) / sqrt(n_layers) (kaiming_uniform(a=sqrt(5))
    rescaled as `rescale_prenorm_residual=True`, the NemotronH default);
  A = -exp(A_log) with A ~ U[1, 16] as mamba_ssm (transformers uses A = arange(1, H+1));
  dt ~ exp(U[log time_step_min, log time_step_max]) floored at time_step_floor,
  dt_bias = dt + log(-expm1(-dt)) (inverse softplus); D = 1; norm.weight = 1.

Dtypes: matmuls and the conv in config.dtype; dt, A, D, the SSM state and the gated norm in
float32 (float64 when config.dtype is float64). Parameters in config.param_dtype.

Decoding: `init_cache` -> `Mamba2Cache(conv (B, K-1, conv_dim) in dtype, ssm (B, H, P, N) float32)`;
`prefill(x, cache)` runs the whole prompt as the forward does (starting from zero state, as a new
sequence) and returns the final conv window and SSM state; `decode(x (B, 1, d), cache)` is one
recurrence step. With segment_ids in prefill, the cache continues the row's last document.
`clamp_dt` is applied in decode too (transformers' torch decode step skips it; its chunked path
clamps), so decode equals the full forward exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.mlp import linear
from hybridjax.ops.conv1d import causal_conv1d, causal_conv1d_update
from hybridjax.ops.norms import gated_rmsnorm
from hybridjax.ops.ssd import ssd


class Mamba2Cache(NamedTuple):
    conv: jax.Array  # (B, K-1, conv_dim) last K-1 conv inputs, oldest first, compute dtype
    ssm: jax.Array  # (B, H, P, N) SSM state, float32 (float64 for a float64 model)


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _init_A_log(key, shape, dtype):
    ct = jnp.result_type(jnp.float32, dtype)
    return jnp.log(jax.random.uniform(key, shape, ct, 1.0, 16.0)).astype(dtype)


def _init_dt_bias(config: HybridConfig):
    lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)

    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.result_type(jnp.float32, dtype))
        dt = jnp.maximum(jnp.exp(u * (hi - lo) + lo), config.time_step_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


class DepthwiseConv1d(nnx.Module):
    """Parameters of the causal depthwise conv: kernel (K, C), bias (C,), both drawn from
    U(-1/sqrt(K), 1/sqrt(K)) as torch's Conv1d(C, C, K, groups=C) (fan_in = K) and mamba_ssm."""

    def __init__(self, channels: int, kernel_size: int, *, param_dtype, rngs):
        bound = 1.0 / math.sqrt(kernel_size)
        ct = jnp.result_type(jnp.float32, param_dtype)
        self.kernel = nnx.Param(jax.random.uniform(
            rngs.params(), (kernel_size, channels), ct, -bound, bound).astype(param_dtype))
        self.bias = nnx.Param(jax.random.uniform(
            rngs.params(), (channels,), ct, -bound, bound).astype(param_dtype))


class GatedRMSNorm(nnx.Module):
    """NemotronHRMSNormGated: weight (d,); rmsnorm(x * silu(z)) over groups of group_size."""

    def __init__(self, d: int, group_size: int, *, eps: float, param_dtype):
        self.group_size = group_size
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((d,), param_dtype))

    def __call__(self, x, z):
        return gated_rmsnorm(x, z, self.weight[...], group_size=self.group_size, eps=self.eps)


class Mamba2Mixer(nnx.Module):
    """`Mamba2Mixer(config, *, rngs)(x, segment_ids=None) -> (B, L, d_model)` in config.dtype."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.n_heads = config.mamba_heads
        self.head_dim = config.mamba_head_dim
        self.d_inner = config.d_inner
        self.n_groups = config.n_groups
        self.d_state = config.ssm_state
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.dtype = jnp.dtype(config.dtype)
        self.acc_dtype = _acc_dtype(self.dtype)
        param_dtype = jnp.dtype(config.param_dtype)

        self.in_proj = linear(config, config.d_model, self.d_inner + self.conv_dim + self.n_heads,
                              rngs=rngs)
        self.conv1d = DepthwiseConv1d(self.conv_dim, config.conv_kernel,
                                      param_dtype=param_dtype, rngs=rngs)
        self.dt_bias = nnx.Param(_init_dt_bias(config)(rngs.params(), (self.n_heads,),
                                                       param_dtype))
        self.A_log = nnx.Param(_init_A_log(rngs.params(), (self.n_heads,), param_dtype))
        self.D = nnx.Param(jnp.ones((self.n_heads,), param_dtype))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.norm_eps,
                                 param_dtype=param_dtype)
        bound = 1.0 / math.sqrt(self.d_inner)  # kaiming_uniform(a=sqrt(5)) on fan_in = d_inner
        out_init = jax.nn.initializers.uniform(2 * bound)
        self.out_proj = linear(
            config, self.d_inner, config.d_model, rngs=rngs,
            kernel_init=lambda k, s, d: ((out_init(k, s, jnp.float32) - bound)
                                         / math.sqrt(config.n_layers)).astype(d))

    # --- pieces shared by the forward and the decode step ---------------------------------------
    def _split_proj(self, zxbcdt):
        return jnp.split(zxbcdt, [self.d_inner, self.d_inner + self.conv_dim], axis=-1)

    def _dt(self, dt_raw):
        acc = self.acc_dtype
        dt = jax.nn.softplus(dt_raw.astype(acc) + self.dt_bias[...].astype(acc))
        if self.config.clamp_dt:
            dt = jnp.maximum(dt, self.config.time_step_min)
        return dt

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(self.acc_dtype))

    def _out(self, y, z):
        y = self.norm(y.astype(self.acc_dtype), z)
        return self.out_proj(y.astype(self.dtype))

    def _check(self, x):
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"Mamba2Mixer: x has shape {x.shape}, expected (batch, length, "
                             f"{self.config.d_model})")

    def _forward(self, x, segment_ids, return_state):
        self._check(x)
        b, l, _ = x.shape
        if segment_ids is not None and segment_ids.shape != (b, l):
            raise ValueError(f"Mamba2Mixer: segment_ids has shape {segment_ids.shape}, "
                             f"expected {(b, l)}")
        z, xbc, dt_raw = self._split_proj(self.in_proj(x.astype(self.dtype)))
        conv = causal_conv1d(xbc, self.conv1d.kernel[...], self.conv1d.bias[...],
                             segment_ids=segment_ids, return_final_state=return_state)
        xbc, conv_state = conv if return_state else (conv, None)
        xbc = jax.nn.silu(xbc)
        xs, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + self.n_groups * self.d_state], -1)
        out = ssd(xs.reshape(b, l, self.n_heads, self.head_dim), self._dt(dt_raw), self._A(),
                  B.reshape(b, l, self.n_groups, self.d_state),
                  C.reshape(b, l, self.n_groups, self.d_state),
                  D=self.D[...].astype(self.acc_dtype), chunk_size=self.config.chunk_size,
                  segment_ids=segment_ids, return_final_state=return_state,
                  impl=self.config.ssd_impl)
        y, ssm_state = out if return_state else (out, None)
        y = self._out(y.reshape(b, l, self.d_inner), z)
        return y, conv_state, ssm_state

    # --- public API ---------------------------------------------------------------------------
    def __call__(self, x, *, segment_ids=None, positions=None):
        """x (B, L, d_model), segment_ids (B, L) int | None -> (B, L, d_model). positions unused."""
        del positions
        return self._forward(x, segment_ids, return_state=False)[0]

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Mamba2Cache:
        """Zero decode state; max_len is unused (the state does not grow)."""
        del max_len
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        return Mamba2Cache(
            conv=jnp.zeros((batch, self.config.conv_kernel - 1, self.conv_dim), dtype),
            ssm=jnp.zeros((batch, self.n_heads, self.head_dim, self.d_state), self.acc_dtype))

    def prefill(self, x, cache: Mamba2Cache, *, segment_ids=None, positions=None):
        """Run a prompt from a fresh state; -> (y (B, L, d_model), cache after the prompt)."""
        del positions
        y, conv_state, ssm_state = self._forward(x, segment_ids, return_state=True)
        return y, Mamba2Cache(conv=conv_state.astype(cache.conv.dtype),
                              ssm=ssm_state.astype(cache.ssm.dtype))

    def decode(self, x, cache: Mamba2Cache, *, positions=None):
        """One token per row: x (B, 1, d_model) -> (y (B, 1, d_model), updated cache)."""
        del positions
        self._check(x)
        if x.shape[1] != 1:
            raise ValueError(f"Mamba2Mixer.decode: x must hold one token per row, got {x.shape}")
        b = x.shape[0]
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xbc, dt_raw = self._split_proj(self.in_proj(x[:, 0].astype(self.dtype)))
        xbc, conv_state = causal_conv1d_update(xbc, cache.conv.astype(xbc.dtype),
                                               self.conv1d.kernel[...], self.conv1d.bias[...])
        xbc = jax.nn.silu(xbc)
        xs, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + g * n], -1)
        acc = self.acc_dtype
        xs = xs.reshape(b, h, p).astype(acc)
        B = jnp.repeat(B.reshape(b, g, n), h // g, axis=1).astype(acc)  # (b, h, n)
        C = jnp.repeat(C.reshape(b, g, n), h // g, axis=1).astype(acc)
        dt = self._dt(dt_raw)  # (b, h)
        decay = jnp.exp(dt * self._A())[:, :, None, None]
        state = cache.ssm.astype(acc) * decay + (dt[:, :, None] * xs)[..., None] * B[:, :, None]
        y = jnp.einsum("bhpn,bhn->bhp", state, C) + self.D[...].astype(acc)[:, None] * xs
        y = self._out(y.reshape(b, 1, self.d_inner), z[:, None])
        return y, Mamba2Cache(conv=conv_state.astype(cache.conv.dtype),
                              ssm=state.astype(cache.ssm.dtype))
