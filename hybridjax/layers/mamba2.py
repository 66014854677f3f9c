"""Mamba-2 mixer (transformers `NemotronHMamba2Mixer` semantics, so export is exact).

    z, x = zx_proj(x); B, C = bc_proj(x); dt = dt_proj(x)   (transformers: one in_proj)
    x, B, C = silu(causal depthwise conv1d(x, B, C))   kernel conv_kernel, with bias, SiLU in
                                                       float32 before the one rounding
                                                       head h reads group h // (H/G)
    dt = softplus(dt + dt_bias), clamped below at time_step_min when config.clamp_dt
    A = -exp(A_log)
    y = ssd(x, dt, A, B, C, D=D, ...)                  y includes D * x
    y = rmsnorm(y * silu(z)) over groups of d_inner / G, times norm.weight
    out = out_proj(y)

Parameters keep heads and groups as axes of their own, so tensor parallelism splits them whole
(`hybridjax.sharding`); export concatenates them into transformers' tensors (torch name in
brackets, kernels (in, out) = torch weight transposed):
  zx_proj.kernel (d_model, 2, H, P)       z, x   [in_proj.weight rows [0, 2*d_inner)]
  bc_proj.kernel (d_model, 2, G, N)       B, C   [in_proj.weight rows [2*d_inner, +2*G*N)]
  dt_proj.kernel (d_model, H)                    [in_proj.weight, the last H rows]
  conv_x.kernel (K, H, P), conv_x.bias (H, P)    [conv1d.weight (C, 1, K) / .bias, x channels]
  conv_bc.kernel (K, 2, G, N), conv_bc.bias (2, G, N)   [the B and C channels]
  dt_bias (H,), A_log (H,), D (H,)               [same names; no weight decay]
  norm.weight (H, P)                             [norm.weight (d_inner,); no weight decay]
  out_proj.kernel (H, P, d_model)                [out_proj.weight]

Init (transformers NemotronH `_init_weights`, except A and the conv — see below), drawn in the
transformers layout and split, so the values do not depend on the layout:
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

State passing (truncated backpropagation through time, the trainer's `trainer.state_passing`):
`mixer(x, segment_ids=..., state=cache)` continues from `cache` (the conv window and SSM state the
row reached before x, e.g. its previous chunk's) and returns `(y, state after x)` in the cache's
dtypes; split anywhere, two chunks equal the whole sequence. `config.layer_chunk_size` uses the
same continuation inside one row: the layer runs that many tokens at a time, each chunk
rematerialised, so long rows train in a chunk's memory (not under a "context" mesh axis).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.chunks import recurrent_chunked, runs_in_chunks
from hybridjax.layers.mlp import Dense
from hybridjax.ops.conv1d import causal_conv1d, causal_conv1d_update
from hybridjax.ops.norms import gated_rmsnorm
from hybridjax.ops.remat_names import saved_kernel_output
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
    """Parameters of a causal depthwise conv over channels of any shape: kernel (K, *channels),
    bias (*channels)."""

    def __init__(self, kernel, bias):
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(bias)

    def flat(self):
        """(kernel (K, C), bias (C,)) over the flattened channels."""
        k = self.kernel[...]
        return k.reshape(k.shape[0], -1), self.bias[...].reshape(-1)


def _torch_conv_init(key, kernel_size: int, channels: int, dtype):
    """Kernel (K, C) and bias (C,) drawn from U(-1/sqrt(K), 1/sqrt(K)) as torch's
    Conv1d(C, C, K, groups=C) (fan_in = K) and mamba_ssm."""
    bound = 1.0 / math.sqrt(kernel_size)
    ct = jnp.result_type(jnp.float32, dtype)
    k_kernel, k_bias = key
    kernel = jax.random.uniform(k_kernel, (kernel_size, channels), ct, -bound, bound)
    bias = jax.random.uniform(k_bias, (channels,), ct, -bound, bound)
    return kernel.astype(dtype), bias.astype(dtype)


def out_projection(config: HybridConfig, rngs: nnx.Rngs) -> Dense:
    """A Mamba layer's out_proj (H, P, d_model): kaiming_uniform(a=sqrt(5)) on fan_in = d_inner,
    divided by sqrt(n_layers) (rescale_prenorm_residual), as mamba_ssm and transformers init it."""
    h, p = config.mamba_heads, config.mamba_head_dim
    bound = 1.0 / math.sqrt(config.d_inner)
    out = jax.random.uniform(rngs.params(), (h * p, config.d_model), jnp.float32, -bound, bound)
    out = (out / math.sqrt(config.n_layers)).astype(jnp.dtype(config.param_dtype))
    return Dense(out.reshape(h, p, config.d_model), n_in=2, dtype=jnp.dtype(config.dtype))


class GatedRMSNorm(nnx.Module):
    """NemotronHRMSNormGated: weight (any shape of d elements); rmsnorm(x * silu(z)) over groups of group_size."""

    def __init__(self, shape: tuple, group_size: int, *, eps: float, param_dtype, impl="xla"):
        self.group_size = group_size
        self.eps = eps
        self.impl = impl
        self.weight = nnx.Param(jnp.ones(shape, param_dtype))

    def __call__(self, x, z, out_dtype=None):
        w = self.weight[...].reshape(-1)
        return gated_rmsnorm(
            x, z, w, group_size=self.group_size, eps=self.eps, out_dtype=out_dtype, impl=self.impl
        )


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
        h, p, g, n, d = self.n_heads, self.head_dim, self.n_groups, self.d_state, config.d_model
        dtype = self.dtype

        in_proj = nnx.initializers.normal(config.initializer_range)(
            rngs.params(), (d, self.d_inner + self.conv_dim + h), param_dtype
        )
        zx, bc, dt = jnp.split(in_proj, [2 * self.d_inner, 2 * self.d_inner + 2 * g * n], -1)
        self.zx_proj = Dense(zx.reshape(d, 2, h, p), dtype=dtype)
        self.bc_proj = Dense(bc.reshape(d, 2, g, n), dtype=dtype)
        self.dt_proj = Dense(dt, dtype=dtype)
        kernel, bias = _torch_conv_init(
            (rngs.params(), rngs.params()), config.conv_kernel, self.conv_dim, param_dtype
        )
        k = config.conv_kernel
        self.conv_x = DepthwiseConv1d(
            kernel[:, : self.d_inner].reshape(k, h, p), bias[: self.d_inner].reshape(h, p)
        )
        self.conv_bc = DepthwiseConv1d(
            kernel[:, self.d_inner :].reshape(k, 2, g, n), bias[self.d_inner :].reshape(2, g, n)
        )
        self.dt_bias = nnx.Param(_init_dt_bias(config)(rngs.params(), (h,), param_dtype))
        self.A_log = nnx.Param(_init_A_log(rngs.params(), (h,), param_dtype))
        self.D = nnx.Param(jnp.ones((h,), param_dtype))
        self.norm = GatedRMSNorm(
            (h, p),
            self.d_inner // g,
            eps=config.norm_eps,
            param_dtype=param_dtype,
            impl=config.mamba2_glue_impl,
        )
        self.out_proj = out_projection(config, rngs)

    # --- pieces shared by the forward and the decode step ---------------------------------------
    def _project(self, x):
        """x (..., d_model) -> z, x (..., H, P); B and C (..., G, N) before the conv, flat as
        the conv takes them: xs (..., d_inner), bc (..., 2*G*N); dt_raw (..., H)."""
        bc = self.bc_proj(x)
        lead = x.shape[:-1]
        return (
            self.zx_proj.part(x, 0),
            self.zx_proj.part(x, 1).reshape(*lead, self.d_inner),
            bc.reshape(*lead, -1),
            self.dt_proj(x),
        )

    def _split_bc(self, bc, lead):
        bc = bc.reshape(*lead, 2, self.n_groups, self.d_state)
        return bc[..., 0, :, :], bc[..., 1, :, :]

    def _dt(self, dt_raw):
        acc = self.acc_dtype
        dt = jax.nn.softplus(dt_raw.astype(acc) + self.dt_bias[...].astype(acc))
        if self.config.clamp_dt:
            dt = jnp.maximum(dt, self.config.time_step_min)
        return dt

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(self.acc_dtype))

    def _out(self, y, z):
        """y, z (..., H, P) -> (..., d_model)."""
        lead = y.shape[:-2]
        y = self.norm(y.reshape(*lead, -1), z.reshape(*lead, -1), out_dtype=self.dtype)
        return self.out_proj(saved_kernel_output(y).reshape(*lead, self.n_heads, self.head_dim))

    def _check(self, x):
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"Mamba2Mixer: x has shape {x.shape}, expected (batch, length, "
                f"{self.config.d_model})"
            )

    def _forward(self, x, segment_ids, return_state, initial_state: Mamba2Cache | None = None):
        self._check(x)
        b, l, _ = x.shape
        if segment_ids is not None and segment_ids.shape != (b, l):
            raise ValueError(
                f"Mamba2Mixer: segment_ids has shape {segment_ids.shape}, expected {(b, l)}"
            )
        z, xs, bc, dt_raw = self._project(x)
        conv_x0 = conv_bc0 = ssm0 = None
        if initial_state is not None:  # the window holds [x | B, C] channels, as decode's
            conv_x0, conv_bc0 = jnp.split(initial_state.conv.astype(x.dtype), [self.d_inner], -1)
            ssm0 = initial_state.ssm.astype(self.acc_dtype)
        xs, conv_x_state = self._conv(xs, self.conv_x, segment_ids, return_state, conv_x0)
        bc, conv_bc_state = self._conv(bc, self.conv_bc, segment_ids, return_state, conv_bc0)
        B, C = self._split_bc(bc, (b, l))
        out = ssd(
            xs.reshape(b, l, self.n_heads, self.head_dim),
            self._dt(dt_raw),
            self._A(),
            B,
            C,
            D=self.D[...].astype(self.acc_dtype),
            chunk_size=self.config.chunk_size,
            initial_state=ssm0,
            segment_ids=segment_ids,
            return_final_state=return_state,
            impl=self.config.ssd_impl,
        )
        y, ssm_state = out if return_state else (out, None)
        y = saved_kernel_output(y)
        conv_state = jnp.concatenate([conv_x_state, conv_bc_state], -1) if return_state else None
        return self._out(y, z), conv_state, ssm_state

    def _conv(self, x, conv, segment_ids, return_state, initial_state=None):
        """silu(causal depthwise conv) over flat channels -> (y, final window or None)."""
        kernel, bias = conv.flat()
        out = causal_conv1d(
            x,
            kernel,
            bias,
            segment_ids=segment_ids,
            initial_state=initial_state,
            return_final_state=return_state,
            activation="silu",
            impl=self.config.mamba2_glue_impl,
        )
        y, final = out if return_state else (out, None)
        return saved_kernel_output(y), final

    # --- public API ---------------------------------------------------------------------------
    def __call__(
        self, x, *, segment_ids=None, positions=None, state: Mamba2Cache | None = None, norm=None
    ):
        """x (B, L, d_model), segment_ids (B, L) int | None -> (B, L, d_model). positions unused.

        With `state`, x continues from it (module docstring: state passing) and the result is
        (y, the state after x, in `state`'s dtypes). `norm` (token-local, e.g. the block's
        RMSNorm) is applied to x first: inside each layer chunk, so that no normed copy of the
        whole row is formed or kept for the backward."""
        del positions
        pre = norm or (lambda x: x)
        if runs_in_chunks(self.config.layer_chunk_size, x.shape[1]):
            self._check(x)
            start = self.init_cache(x.shape[0], dtype=self.acc_dtype) if state is None else state
            run = lambda x, seg, s: self._run(pre(x), seg, s, s)
            y, after = recurrent_chunked(run, x, segment_ids, start, self.config.layer_chunk_size)
            return y if state is None else (y, after)
        x = pre(x)
        if state is None:
            return self._forward(x, segment_ids, return_state=False)[0]
        return self._run(x, segment_ids, state, state)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Mamba2Cache:
        """Zero decode state; max_len is unused (the state does not grow)."""
        del max_len
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        return Mamba2Cache(
            conv=jnp.zeros((batch, self.config.conv_kernel - 1, self.conv_dim), dtype),
            ssm=jnp.zeros((batch, self.n_heads, self.head_dim, self.d_state), self.acc_dtype),
        )

    def prefill(self, x, cache: Mamba2Cache, *, segment_ids=None, positions=None):
        """Run a prompt from a fresh state; -> (y (B, L, d_model), cache after the prompt)."""
        del positions
        return self._run(x, segment_ids, None, cache)

    def _run(self, x, segment_ids, initial_state, like: Mamba2Cache):
        """(y, the state after x in `like`'s dtypes), from `initial_state` (None: zero)."""
        y, conv_state, ssm_state = self._forward(x, segment_ids, True, initial_state)
        return y, Mamba2Cache(
            conv=conv_state.astype(like.conv.dtype), ssm=ssm_state.astype(like.ssm.dtype)
        )

    def decode(self, x, cache: Mamba2Cache, *, positions=None):
        """One token per row: x (B, 1, d_model) -> (y (B, 1, d_model), updated cache)."""
        del positions
        self._check(x)
        if x.shape[1] != 1:
            raise ValueError(f"Mamba2Mixer.decode: x must hold one token per row, got {x.shape}")
        b = x.shape[0]
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xs, bc, dt_raw = self._project(x[:, 0])
        (kx, bx), (kbc, bbc) = self.conv_x.flat(), self.conv_bc.flat()
        xbc, conv_state = causal_conv1d_update(
            jnp.concatenate([xs, bc], -1),
            cache.conv.astype(xs.dtype),
            jnp.concatenate([kx, kbc], -1),
            jnp.concatenate([bx, bbc], -1),
            activation="silu",
        )
        xs, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + g * n], -1)
        acc = self.acc_dtype
        xs = xs.reshape(b, h, p).astype(acc)
        B = jnp.repeat(B.reshape(b, g, n), h // g, axis=1).astype(acc)  # (b, h, n)
        C = jnp.repeat(C.reshape(b, g, n), h // g, axis=1).astype(acc)
        dt = self._dt(dt_raw)  # (b, h)
        decay = jnp.exp(dt * self._A())[:, :, None, None]
        state = cache.ssm.astype(acc) * decay + (dt[:, :, None] * xs)[..., None] * B[:, :, None]
        y = jnp.einsum("bhpn,bhn->bhp", state, C) + self.D[...].astype(acc)[:, None] * xs
        y = self._out(y[:, None], z[:, None])
        return y, Mamba2Cache(
            conv=conv_state.astype(cache.conv.dtype), ssm=state.astype(cache.ssm.dtype)
        )
