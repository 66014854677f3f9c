"""Mamba-3 mixer (mamba_ssm 2.3.2.post1 `Mamba3` semantics), SISO or MIMO by config.

    z, x, B, C, dd_dt, dd_A, trap, angles = in_proj(u)     (split in that order)
    B, C = rmsnorm(B), rmsnorm(C) over the state channels  (a weight each, shared by ranks)
    dt = softplus(dd_dt + dt_bias)
    A = min(-act(dd_A), -mamba3_a_floor)                   act: softplus (the 2.3.2 release) or
                                                           heavy_tail (the repository's HEAD:
                                                           1 + x for x >= 0, 1 / (1 - x) below)
    y = mamba3_siso(C, B, x, A dt, dt, trap, C_bias, B_bias, angles, D=D, z=z)     (SISO) or
        mamba3_mimo(..., mimo_x, mimo_z, mimo_o, D=D, z=z)                         (MIMO)
    out = out_proj(y)

No conv1d and no output norm (mamba_ssm's `is_outproj_norm=False`, its default). The angles
(mamba3_angles = ssm_state x mamba3_rope_fraction / 2 of them) are one projection shared by
every head, as mamba_ssm broadcasts them; the scan takes them per head. Head h reads group
h // (H/G) of B and C. With MIMO the scan's chunk is chunk_size // R steps (`scan_chunk`), so a
chunk holds chunk_size (step, rank) rows, as mamba_ssm recommends (64 / R).

Parameters (heads and groups on axes of their own, for tensor parallelism), mamba_ssm's name
or in_proj rows in brackets; kernels are (in, out) = torch weight transposed:
  zx_proj.kernel (d_model, 2, H, P)          z, x        [in_proj rows [0, 2 d_inner)]
  bc_rank_proj.kernel (d_model, 2, R, G, N)  B, C        [the next 2 R G N rows, each "(r g n)"]
  dt_proj.kernel, a_proj.kernel, trap_proj.kernel (d_model, H)   dd_dt, dd_A, trap
  angle_proj.kernel (d_model, S)                         [the last S rows]
  dt_bias (H,)   D (H,)   B_bias, C_bias (H, R, N)   B_norm.weight, C_norm.weight (N,)
  mimo_x, mimo_z, mimo_o (H, R, P)                       (MIMO only)
  out_proj.kernel (H, P, d_model)
R = 1 for SISO (mamba_ssm keeps the rank axis of B_bias and C_bias then too).

Init as mamba_ssm's module inside its MixerModel: in_proj ~ U(-1/sqrt(d_model), 1/sqrt(d_model))
(torch's Linear default; Mamba2Mixer draws transformers' normal(0, initializer_range) instead);
out_proj ~ U(-1/sqrt(d_inner), 1/sqrt(d_inner)) / sqrt(n_layers) (rescale_prenorm_residual);
dt_bias = inverse softplus of dt ~ exp(U[log time_step_min, log time_step_max]) floored at
time_step_floor; B_bias = C_bias = 1; norms 1; D = 1; mimo_x = mimo_o = 1/R, mimo_z = 1.
None of dt_bias, D, the biases, norms and MIMO gains take weight decay (`hybridjax.optim`).

Dtypes: projections in config.dtype; dt, A, the trapezoid and angles, the scan's decays and state
in float32 (float64 for a float64 model). Parameters in config.param_dtype.

Decoding: the cache is the scan's `Mamba3State` (angle, SSM state, last rotated k and last v:
constant size); `prefill` runs the prompt as the forward does and keeps the final state,
`decode` runs the same scan over one token from the cache, so decode equals the forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybridjax.config import HybridConfig
from hybridjax.layers.chunks import recurrent_chunked, runs_in_chunks
from hybridjax.layers.mamba2 import _init_dt_bias, out_projection
from hybridjax.layers.mlp import Dense
from hybridjax.layers.norm import RMSNorm
from hybridjax.ops.mamba3 import Mamba3State, mamba3_mimo, mamba3_siso

Mamba3Cache = Mamba3State


def heavy_tail(x):
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, smooth at 0, and with a
    heavier left tail than softplus (mamba_ssm HEAD's activation for the data-dependent A)."""
    return jnp.maximum(x, 0) + 1 / (1 - jnp.minimum(x, 0))


A_ACTS = {"softplus": jax.nn.softplus, "heavy_tail": heavy_tail}


def scan_chunk(config: HybridConfig) -> int:
    """The scan's chunk length: chunk_size steps (SISO), chunk_size // R (MIMO)."""
    if config.mamba3_mimo:
        return max(config.chunk_size // config.mamba3_mimo_rank, 1)
    return config.chunk_size


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


class Mamba3Mixer(nnx.Module):
    """`Mamba3Mixer(config, *, rngs)(x, segment_ids=None) -> (B, L, d_model)` in config.dtype."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.mimo = config.mamba3_mimo
        self.rank = config.mamba3_mimo_rank if self.mimo else 1
        self.n_heads, self.head_dim = config.mamba_heads, config.mamba_head_dim
        self.n_groups, self.d_state = config.n_groups, config.ssm_state
        self.n_angles = config.mamba3_angles
        self.d_inner = config.d_inner
        self.dtype = jnp.dtype(config.dtype)
        self.acc_dtype = _acc_dtype(self.dtype)
        param_dtype = jnp.dtype(config.param_dtype)
        h, p, g, n, r, d = (
            self.n_heads,
            self.head_dim,
            self.n_groups,
            self.d_state,
            self.rank,
            config.d_model,
        )
        dtype, ct = self.dtype, jnp.result_type(jnp.float32, param_dtype)
        s = self.n_angles

        width = 2 * self.d_inner + 2 * r * g * n + 3 * h + s
        bound = 1.0 / math.sqrt(d)
        in_proj = jax.random.uniform(rngs.params(), (d, width), ct, -bound, bound)
        in_proj = in_proj.astype(param_dtype)
        zx, bc, dt, a, trap, angles = jnp.split(
            in_proj,
            [2 * self.d_inner, *(2 * self.d_inner + 2 * r * g * n + i * h for i in range(4))],
            -1,
        )
        self.zx_proj = Dense(zx.reshape(d, 2, h, p), dtype=dtype)
        self.bc_rank_proj = Dense(bc.reshape(d, 2, r, g, n), dtype=dtype)
        self.dt_proj = Dense(dt, dtype=dtype)
        self.a_proj = Dense(a, dtype=dtype)
        self.trap_proj = Dense(trap, dtype=dtype)
        # mamba3_rope_fraction 0 (no rotation): no angle projection (a zero-size kernel cannot
        # be checkpointed); the scans get (b, l, h, 0) angles
        self.angle_proj = Dense(angles, dtype=dtype) if s else None
        self.dt_bias = nnx.Param(_init_dt_bias(config)(rngs.params(), (h,), param_dtype))
        self.B_bias = nnx.Param(jnp.ones((h, r, n), param_dtype))
        self.C_bias = nnx.Param(jnp.ones((h, r, n), param_dtype))
        norm = lambda: RMSNorm(n, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.B_norm, self.C_norm = norm(), norm()
        if self.mimo:
            self.mimo_x = nnx.Param(jnp.full((h, r, p), 1.0 / r, param_dtype))
            self.mimo_z = nnx.Param(jnp.ones((h, r, p), param_dtype))
            self.mimo_o = nnx.Param(jnp.full((h, r, p), 1.0 / r, param_dtype))
        self.D = nnx.Param(jnp.ones((h,), param_dtype))
        self.out_proj = out_projection(config, rngs)

    def _check(self, x, segment_ids=None):
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"Mamba3Mixer: x has shape {x.shape}, expected (batch, length, "
                f"{self.config.d_model})"
            )
        if segment_ids is not None and segment_ids.shape != x.shape[:2]:
            raise ValueError(
                f"Mamba3Mixer: segment_ids has shape {segment_ids.shape}, expected {x.shape[:2]}"
            )

    def _scan(self, x, segment_ids, initial_state, return_state, impl):
        """x (B, L, d_model) -> y (B, L, d_model) [, final Mamba3State]."""
        b, l, _ = x.shape
        acc = self.acc_dtype
        z, xs = self.zx_proj.part(x, 0), self.zx_proj.part(x, 1)  # (b, l, H, P)
        bc = self.bc_rank_proj(x)  # (b, l, 2, R, G, N)
        B, C = self.B_norm(bc[:, :, 0]), self.C_norm(bc[:, :, 1])
        dt = jax.nn.softplus(self.dt_proj(x).astype(acc) + self.dt_bias[...].astype(acc))
        act = A_ACTS[self.config.mamba3_a_act]
        A = jnp.minimum(-act(self.a_proj(x).astype(acc)), -self.config.mamba3_a_floor)
        trap = self.trap_proj(x).astype(acc)
        raw = self.angle_proj(x) if self.angle_proj is not None else jnp.zeros((b, l, 0))
        angles = jnp.broadcast_to(raw.astype(acc)[:, :, None], (b, l, self.n_heads, self.n_angles))
        kw = {
            "D": self.D[...].astype(acc),
            "z": z,
            "chunk_size": scan_chunk(self.config),
            "initial_state": initial_state,
            "segment_ids": segment_ids,
            "return_final_state": return_state,
            "impl": impl,
        }
        bias = lambda t: t[...].astype(acc)
        if self.mimo:
            out = mamba3_mimo(
                C, B, xs, A * dt, dt, trap, bias(self.C_bias), bias(self.B_bias), angles,
                bias(self.mimo_x), bias(self.mimo_z), bias(self.mimo_o), **kw,
            )  # fmt: skip
        else:
            out = mamba3_siso(
                C[:, :, 0], B[:, :, 0], xs, A * dt, dt, trap, bias(self.C_bias)[:, 0],
                bias(self.B_bias)[:, 0], angles, **kw,
            )  # fmt: skip
        y, state = out if return_state else (out, None)
        return self.out_proj(y.astype(self.dtype)), state

    # --- public API ---------------------------------------------------------------------------
    def __call__(
        self, x, *, segment_ids=None, positions=None, state: Mamba3Cache | None = None, norm=None
    ):
        """x (B, L, d_model), segment_ids (B, L) int | None -> (B, L, d_model). positions unused.

        With `state` (state passing: the cache the row's previous chunk ended with), x continues
        from it and the result is (y, the state after x). `norm` (token-local, e.g. the block's
        RMSNorm) is applied to x first, inside each layer chunk (as Mamba2Mixer's)."""
        del positions
        self._check(x, segment_ids)
        impl = self.config.mamba3_impl
        pre = norm or (lambda x: x)
        if runs_in_chunks(self.config.layer_chunk_size, x.shape[1]):
            start = self.init_cache(x.shape[0]) if state is None else state
            run = lambda x, seg, s: self._scan(pre(x), seg, s, True, impl)
            y, after = recurrent_chunked(run, x, segment_ids, start, self.config.layer_chunk_size)
            return y if state is None else (y, after)
        y, after = self._scan(pre(x), segment_ids, state, state is not None, impl)
        return y if state is None else (y, after)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> Mamba3Cache:
        """Zero decode state (float32, float64 for a float64 model); max_len and dtype are unused
        (the state does not grow and stays in the scan's dtype)."""
        del max_len, dtype
        h, p, n, acc = self.n_heads, self.head_dim, self.d_state, self.acc_dtype
        rank = (self.rank,) if self.mimo else ()
        return Mamba3State(
            angle=jnp.zeros((batch, h, self.n_angles), acc),
            ssm=jnp.zeros((batch, h, p, n), acc),
            k=jnp.zeros((batch, *rank, h, n), acc),
            v=jnp.zeros((batch, h, p), acc),
        )

    def prefill(self, x, cache: Mamba3Cache, *, segment_ids=None, positions=None):
        """Run a prompt from a fresh state; -> (y (B, L, d_model), cache after the prompt)."""
        del positions, cache
        self._check(x, segment_ids)
        return self._scan(x, segment_ids, None, True, self.config.mamba3_impl)

    def decode(self, x, cache: Mamba3Cache, *, positions=None):
        """One token per row: x (B, 1, d_model) -> (y (B, 1, d_model), updated cache): the scan
        over that one step, started from the cache."""
        del positions
        self._check(x)
        if x.shape[1] != 1:
            raise ValueError(f"Mamba3Mixer.decode: x must hold one token per row, got {x.shape}")
        return self._scan(x, None, cache, True, "reference")
